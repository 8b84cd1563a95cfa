"""Config and checkpoint I/O: both HF layouts, sharding, dtypes, and one-line errors on bad input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetrt.errors import MoetrtError
from moetrt.model.checkpoint import CheckpointReader, checkpoint_hash, load_model
from moetrt.model.config import PRESETS, MixtralConfig
from moetrt.model.testing import make_checkpoint
from moetrt.model.tokenizer import Tokenizer


def test_presets_match_published_sizes():
    counts = PRESETS["mixtral-8x7b"].param_counts()
    assert round(counts["total_params"] / 1e9, 1) == 46.7
    assert round(counts["active_params"] / 1e9, 1) == 12.9
    counts = PRESETS["mixtral-8x22b"].param_counts()
    assert round(counts["total_params"] / 1e9) == 141
    assert round(counts["active_params"] / 1e9) == 39
    assert round(PRESETS["mid"].param_counts()["total_params"] / 1e9, 2) == 0.79


def test_config_reads_both_generations(tmp_path):
    body = PRESETS["mixtral-8x7b"].to_hf_dict()
    del body["rope_parameters"], body["dtype"], body["head_dim"]
    body["rope_theta"] = 5e5
    body["torch_dtype"] = "float16"
    (tmp_path / "config.json").write_text(json.dumps(body))
    cfg = MixtralConfig.from_pretrained(tmp_path)
    assert (cfg.rope_theta, cfg.dtype, cfg.head_dim) == (5e5, "float16", 128)
    assert MixtralConfig.from_hf_dict(PRESETS["tiny"].to_hf_dict()) == PRESETS["tiny"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("hidden_size"), "missing field 'hidden_size'"),
        (lambda d: d.update(architectures=["LlamaForCausalLM"]), "field 'architectures'"),
        (lambda d: d.update(num_key_value_heads=3), "'num_key_value_heads'"),
        (lambda d: d.update(num_experts_per_tok=9), "'num_experts_per_tok'"),
        (lambda d: d.update(rope_parameters={"rope_type": "longrope", "factor": 4.0}), "rope_type"),
        (lambda d: d.update(dtype="int8", torch_dtype="int8"), "'dtype'"),
    ],
)
def test_bad_config_fields_are_named(tmp_path, mutate, message):
    body = PRESETS["tiny"].to_hf_dict()
    mutate(body)
    (tmp_path / "config.json").write_text(json.dumps(body))
    with pytest.raises(MoetrtError, match=message) as err:
        MixtralConfig.from_pretrained(tmp_path)
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_config(tmp_path):
    with pytest.raises(MoetrtError, match="config.json: not found"):
        MixtralConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MoetrtError, match="malformed JSON"):
        MixtralConfig.from_pretrained(tmp_path)


def test_sharded_fused_and_bf16_checkpoints_load_the_same_weights(tmp_path, tiny_config):
    plain = load_model(make_checkpoint(tmp_path / "a", tiny_config, seed=3))
    sharded = load_model(make_checkpoint(tmp_path / "b", tiny_config, seed=3, fused=True, max_shard_bytes=200_000))
    assert len(list((tmp_path / "b").glob("*.safetensors"))) > 1
    for (name, a), (_, b) in zip(plain.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    bf16 = make_checkpoint(tmp_path / "c", dataclasses.replace(tiny_config, dtype="bfloat16"))
    model = load_model(bf16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert load_model(bf16, dtype="float32").lm_head.weight.dtype == torch.float32


def test_checkpoint_missing_tensor_and_wrong_shape(tmp_path, tiny_config):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    missing = dict(tensors)
    del missing[name]
    save_file(missing, path / "model.safetensors")
    with pytest.raises(MoetrtError, match=f"missing tensor '{name}'"):
        load_model(path)
    with pytest.raises(MoetrtError, match=f"missing tensor '{name}'"), CheckpointReader(path) as reader:
        reader.validate()
    wrong = dict(tensors)
    wrong[name] = torch.zeros(3, 4)
    save_file(wrong, path / "model.safetensors")
    with pytest.raises(MoetrtError, match=rf"'{name}' has shape \[3, 4\], expected \[128, 64\]"):
        load_model(path)


def test_missing_shard_and_corrupt_file(tmp_path, tiny_config):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config, max_shard_bytes=200_000)
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(MoetrtError, match="not found; expected a safetensors shard listed in model.safetensors.index"):
        CheckpointReader(path)
    single = make_checkpoint(tmp_path / "single", tiny_config)
    (single / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(MoetrtError, match="not a readable safetensors file"):
        load_model(single)


def test_checkpoint_hash_tracks_weights_and_config(tmp_path, tiny_config):
    a = make_checkpoint(tmp_path / "a", tiny_config, seed=1)
    b = make_checkpoint(tmp_path / "b", tiny_config, seed=1)
    c = make_checkpoint(tmp_path / "c", dataclasses.replace(tiny_config, rope_theta=1e4))
    d = make_checkpoint(tmp_path / "d", tiny_config, seed=2)  # same shapes and headers, other weights
    assert checkpoint_hash(a) == checkpoint_hash(b) != checkpoint_hash(c)
    assert checkpoint_hash(d) != checkpoint_hash(a)


def test_tokenizer_round_trip_and_stream(tiny_checkpoint):
    tok = Tokenizer.from_dir(tiny_checkpoint)
    text = "Experts route tokens; caches hold keys. ünïcode ✓"
    ids = tok.encode(text)
    assert ids[0] == 1 and all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text
    stream = tok.detokenizer(ids[:1])
    assert "".join(stream.push(i) for i in ids[1:]) == text


def test_missing_tokenizer(tmp_path):
    with pytest.raises(MoetrtError, match="tokenizer.json: not found"):
        Tokenizer.from_dir(tmp_path)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moetrt", *args], capture_output=True, text=True, timeout=120)


def test_inspect_preset_json():
    result = run_cli("inspect", "--preset", "mixtral-8x7b", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert round(info["total_params"] / 1e9, 1) == 46.7
    assert round(info["active_params"] / 1e9, 1) == 12.9
    assert info["kv_cache_bytes_per_token"]["bfloat16"] == 2 * 32 * 8 * 128 * 2


def test_inspect_checkpoint_table_and_errors(tiny_checkpoint, tmp_path):
    result = run_cli("inspect", str(tiny_checkpoint))
    assert result.returncode == 0 and "active_params" in result.stdout
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "config.json: not found" in result.stderr
    assert "Traceback" not in result.stderr


FP8_SCHEMES = {  # how each scheme's scale is shaped for a weight [N, K], and config.json's extra fields
    "per-tensor": (lambda w: w.abs().amax().reshape(1), {}),
    "per-channel": (lambda w: w.abs().amax(dim=-1, keepdim=True), {}),
    "block": (lambda w: w.unflatten(0, (-1, 16)).unflatten(-1, (-1, 16)).abs().amax(dim=(1, 3)),
              {"weight_block_size": [16, 16]}),
}  # fmt: skip


def fp8_checkpoint(source, out, scheme: str):
    """`source` with every attention and expert weight stored as float8_e4m3fn plus a `_scale` multiplier
    (`_scale_inv` for the block scheme, transformers' FineGrainedFP8 name); router, norms, embeddings and
    lm_head unquantized, as published fp8 checkpoints keep them. Returns the hand-dequantized weights."""
    scale_of, extra = FP8_SCHEMES[scheme]
    tensors = load_file(source / "model.safetensors")
    expected = {}
    for name in [n for n in tensors if n.endswith("proj.weight") or ".experts." in n]:
        w = tensors[name].float()
        scale = (scale_of(w) / 448.0).float()  # float8_e4m3fn's largest finite value maps to max |w|
        full = scale.repeat_interleave(16, 0).repeat_interleave(16, 1) if scheme == "block" else scale
        q = (w / full).to(torch.float8_e4m3fn)
        tensors[name] = q
        tensors[name + ("_scale_inv" if scheme == "block" else "_scale")] = scale
        expected[name] = q.float() * full
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    body = json.loads((source / "config.json").read_text())
    body["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", **extra}
    (out / "config.json").write_text(json.dumps(body))
    return expected


@pytest.mark.parametrize("scheme", list(FP8_SCHEMES))
def test_fp8_checkpoint_is_dequantized_at_load(tiny_checkpoint, tmp_path, scheme):
    expected = fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8", scheme)
    model = load_model(tmp_path / "fp8", dtype="float32")
    reference = load_model(tiny_checkpoint, dtype="float32")
    layer = model.layers[1]
    q = expected["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(layer.self_attn.q_proj.weight, q)
    w2 = torch.stack([expected[f"model.layers.1.block_sparse_moe.experts.{j}.w2.weight"] for j in range(4)])
    assert torch.equal(layer.block_sparse_moe.w2, w2)
    # the scales were applied: close to the unquantized weights (float8 e4m3 keeps 3 mantissa bits) ...
    for ours, theirs in ((layer.block_sparse_moe.w2, reference.layers[1].block_sparse_moe.w2),
                         (layer.self_attn.q_proj.weight, reference.layers[1].self_attn.q_proj.weight)):  # fmt: skip
        assert (ours - theirs).abs().max() <= 0.07 * theirs.abs().max()
    # ... and the unquantized tensors are read as they are
    assert torch.equal(layer.block_sparse_moe.gate.weight, reference.layers[1].block_sparse_moe.gate.weight)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", None])
def test_other_quantization_methods_are_refused_in_one_line(tiny_checkpoint, tmp_path, method):
    ckpt = tmp_path / "q"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(tiny_checkpoint / "model.safetensors")
    body = json.loads((tiny_checkpoint / "config.json").read_text())
    body["quantization_config"] = {"bits": 4} if method is None else {"quant_method": method, "bits": 4}
    (ckpt / "config.json").write_text(json.dumps(body))
    with pytest.raises(MoetrtError, match=f"quant_method is {method!r}") as err:
        load_model(ckpt)
    assert "\n" not in str(err.value) and "config.json" in str(err.value)


def test_fp8_tensor_without_its_scale_is_refused(tiny_checkpoint, tmp_path):
    fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8", "per-tensor")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(MoetrtError, match=r"'model.layers.0.self_attn.k_proj.weight' has no .*_scale"):
        load_model(tmp_path / "fp8")
