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
        (lambda d: d.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
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
    with pytest.raises(MoetrtError, match="shard listed in model.safetensors.index.json is missing"):
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
    tok = Tokenizer.from_dir(tiny_checkpoint, bos_token_id=1)
    text = "Experts route tokens; caches hold keys. ünïcode ✓"
    ids = tok.encode(text)
    assert ids[0] == 1 and all(0 <= i < 512 for i in ids)
    assert tok.decode(ids) == text
    stream = tok.stream()
    assert "".join(stream.push(i) for i in ids) == text


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
