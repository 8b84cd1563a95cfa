"""Every input checked before it is used: hostile config.json, shard indexes, safetensors headers,
manifests and CLI arguments (hypothesis). Each generated input must give a one-line MoetrtError (CLI:
`error: ...`, exit 2) or the right result: never a traceback, a hang, or a silently changed value."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from moetrt.errors import MoetrtError
from moetrt.model.checkpoint import INDEX_FILE, CheckpointReader, load_model
from moetrt.model.config import PRESETS, MixtralConfig
from moetrt.model.testing import make_checkpoint

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TINY = PRESETS["tiny"]

# JSON values a hostile file may hold where a field is expected.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False),
    st.text(max_size=8), st.sampled_from(["1", "false", "true", "4", "abc", "[/b]", "float32"]),
)  # fmt: skip
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=6)  # fmt: skip


def read_or_refuse(checkpoint: Path) -> dict | None:
    """The checkpoint's tensors, or None after checking it was refused with one line (hypothesis events)."""
    try:
        with CheckpointReader(checkpoint) as reader:
            reader.validate()
            got = dict(reader.tensors())
    except MoetrtError as err:
        one_line(err)
        event("refused in one line")
        return None
    event("accepted, tensors identical")
    return got


def one_line(err: BaseException) -> str:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --- kind 1: config.json ------------------------------------------------------------------------------
INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_local_experts", "num_experts_per_tok", "max_position_embeddings")  # fmt: skip
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta")
FIELDS = (*INT_FIELDS, *FLOAT_FIELDS, "num_key_value_heads", "head_dim", "sliding_window", "tie_word_embeddings",
          "bos_token_id", "eos_token_id", "dtype", "architectures", "rope_parameters", "hidden_act")  # fmt: skip


def expected_after_success(field: str, value, config: MixtralConfig) -> None:
    """The parsed config holds exactly what the file said (the oracle for a successful parse)."""
    if field in INT_FIELDS:
        assert is_int(value) and getattr(config, field) == value
    elif field in FLOAT_FIELDS:
        assert (is_int(value) or isinstance(value, float)) and getattr(config, field) == value
        if field == "rope_theta":  # rope_parameters.rope_theta wins, as in transformers
            assert config.rope_theta == TINY.rope_theta
    elif field in ("num_key_value_heads", "head_dim"):
        fallback = TINY.num_attention_heads if field == "num_key_value_heads" else TINY.hidden_size // 4
        assert getattr(config, field) == (fallback if value is None else value) and (value is None or is_int(value))
    elif field == "sliding_window":
        assert value is None or is_int(value)
        assert config.sliding_window == value
    elif field == "tie_word_embeddings":
        assert isinstance(value, bool) and config.tie_word_embeddings is value
    elif field == "bos_token_id":
        assert (value is None or is_int(value)) and config.bos_token_id == value
    elif field == "eos_token_id":
        ids = [] if value is None else value if isinstance(value, list) else [value]
        assert all(is_int(i) for i in ids) and list(config.eos_token_ids) == ids
    elif field == "dtype":
        assert value in ("float32", "float16", "bfloat16") or value is None
        assert config.dtype == (value or "float32")  # torch_dtype (float32) fills in a null dtype
    elif field == "architectures":
        assert value is None or "MixtralForCausalLM" in value
    elif field == "rope_parameters":
        rope = value or {}
        assert isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) in (
            "default", "linear", "dynamic", "yarn", "llama3")  # fmt: skip
    elif field == "hidden_act":
        assert value == "silu"
    if field not in ("rope_theta", "rope_parameters"):
        assert config.rope_theta == TINY.rope_theta and config.rope_scaling is None


plausible = st.one_of(st.integers(0, 64), st.integers(2**20, 2**25), st.floats(1e-7, 1e7), st.booleans(), st.none(),
                      st.sampled_from(["float32", "bfloat16", "silu", ["MixtralForCausalLM"], [2, 3]]))  # fmt: skip


@FAST
@given(field=st.sampled_from(FIELDS), value=st.one_of(json_values, plausible))
def test_config_json_fields_are_checked_or_kept_exactly(tmp_path_factory, field, value):
    d = tmp_path_factory.mktemp("cfg")
    body = TINY.to_hf_dict()
    body[field] = value
    (d / "config.json").write_text(json.dumps(body))
    try:
        config = MixtralConfig.from_pretrained(d)
    except MoetrtError as err:
        message = one_line(err)
        assert "config.json" in message
        event("refused in one line")
        return
    expected_after_success(field, value, config)
    event("accepted, value kept exactly")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_attention_heads", "4", "field 'num_attention_heads': Input should be a valid integer, found '4'"),
        ("num_attention_heads", 0, "field 'num_attention_heads': Input should be greater than or equal to 1"),
        ("rope_theta", "abc", "field 'rope_theta': Input should be a valid number"),
        ("rope_theta", None, "field 'rope_theta': Input should be a valid number, found None"),
        ("architectures", 5, "field 'architectures': Input should be a valid list"),
        ("rope_parameters", "default", "field 'rope_parameters': Input should be a valid dictionary"),
        ("tie_word_embeddings", "false", "field 'tie_word_embeddings': Input should be a valid boolean"),
        ("sliding_window", True, "field 'sliding_window': Input should be a valid integer, found True"),
        ("rms_norm_eps", True, "field 'rms_norm_eps': Input should be a valid number, found True"),
        ("head_dim", 0, "field 'head_dim': Input should be greater than or equal to 1, found 0"),
        ("bos_token_id", "1", "field 'bos_token_id': Input should be a valid integer, found '1'"),
    ],
)
def test_config_examples_of_the_issue(tmp_path, field, value, message):
    body = TINY.to_hf_dict()
    body[field] = value
    (tmp_path / "config.json").write_text(json.dumps(body))
    with pytest.raises(MoetrtError) as err:
        MixtralConfig.from_pretrained(tmp_path)
    assert message in one_line(err.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"vocab_size": ' + "9" * 5000 + "}", "malformed JSON (Exceeds the limit (4300 digits)"),
        ("[" * 100_000 + "]" * 100_000, "malformed JSON (nested too deeply)"),
        ('{"vocab_size": ' + "9" * 4000 + "}", "field 'vocab_size': Input should be less than or equal to 16777216"),
        ("[1, 2]", "Input should be a valid dictionary"),
        (b"\xff\xfe{}", "malformed JSON (not UTF-8"),
    ],
)
def test_config_json_huge_ints_and_deep_nesting(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(MoetrtError) as err:
        MixtralConfig.from_pretrained(tmp_path)
    assert message in one_line(err.value)


def test_valid_configs_round_trip():
    for config in PRESETS.values():
        assert MixtralConfig.from_dict(config.to_dict()) == config
        assert MixtralConfig.from_hf_dict(config.to_hf_dict()) == config


# --- kind 1: the shard index --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("sharded") / "ck", TINY, seed=3, max_shard_bytes=400_000)
    index = json.loads((path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 2
    with CheckpointReader(path) as reader:
        reference = {name: t.clone() for name, t in reader.tensors()}
    return path, index, reference


def copy_checkpoint(src, dst):
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).symlink_to(file) if file.suffix == ".safetensors" else (dst / file.name).write_bytes(
            file.read_bytes())  # fmt: skip


index_mutations = st.one_of(
    st.tuples(st.just("weight_map"), json_values),
    st.tuples(st.just("metadata"), json_values),
    st.tuples(st.just("remap"), st.integers(0, 10_000), st.sampled_from(["model-00001-of-00002.safetensors",
              "model-00002-of-00002.safetensors", "../ck/model.safetensors", "missing.safetensors", "", "/etc/x"])),
    st.tuples(st.just("drop"), st.integers(0, 10_000)),
    st.tuples(st.just("document"), json_values),
)  # fmt: skip


@FAST
@given(mutation=index_mutations)
def test_shard_index_is_checked_or_read_exactly(sharded, tmp_path_factory, mutation):
    path, index, reference = sharded
    d = tmp_path_factory.mktemp("idx") / "ck"
    copy_checkpoint(path, d)
    body = json.loads(json.dumps(index))
    names = sorted(body["weight_map"])
    if mutation[0] in ("weight_map", "metadata"):
        body[mutation[0]] = mutation[1]
    elif mutation[0] == "remap":
        body["weight_map"][names[mutation[1] % len(names)]] = mutation[2]
    elif mutation[0] == "drop":
        del body["weight_map"][names[mutation[1] % len(names)]]
    else:
        body = mutation[1]
    (d / INDEX_FILE).write_text(json.dumps(body))
    got = read_or_refuse(d)
    if got is None:
        return
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[name], reference[name]) for name in reference)


def test_shard_index_examples(sharded, tmp_path):
    path, index, _ = sharded
    d = tmp_path / "ck"
    copy_checkpoint(path, d)
    (d / INDEX_FILE).write_text(json.dumps({**index, "weight_map": list(index["weight_map"].items())}))
    with pytest.raises(MoetrtError, match=r"field 'weight_map': Input should be a valid dictionary"):
        CheckpointReader(d)
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in set(index["weight_map"].values()) if s != shard)
    (d / INDEX_FILE).write_text(json.dumps({**index, "weight_map": {**index["weight_map"], name: other}}))
    with pytest.raises(MoetrtError, match=rf"field 'weight_map.{name}' names {other}, which has no such tensor"):
        CheckpointReader(d)


# --- kind 2: RoPE variants and integer weights ---------------------------------------------------------
ROPE_CASES = {
    # the issue's example: rope_scaling next to a default rope_parameters; transformers lets rope_scaling win
    "linear_next_to_default": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"},
                               "rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 1e4},
    "dynamic": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}},
    "yarn": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 64}},
    "llama3": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
}  # fmt: skip
HF_BASE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    head_dim=16, rms_norm_eps=1e-5, architectures=["MixtralForCausalLM"], model_type="mixtral",
)  # fmt: skip


def hf_checkpoint(tmp_path, rope: dict):
    """A seeded transformers Mixtral saved to tmp_path, its config.json rewritten to carry `rope` verbatim."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**HF_BASE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path)
    body = json.loads((tmp_path / "config.json").read_text())
    body.pop("rope_parameters", None)
    body.pop("rope_scaling", None)
    (tmp_path / "config.json").write_text(json.dumps({**body, **rope}))
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    return hf, tmp_path


@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_variants_match_transformers(tmp_path, case):
    from moetrt.model.mixtral import KVCache

    hf, path = hf_checkpoint(tmp_path, ROPE_CASES[case])
    ours = load_model(path)
    assert ours.config.rope_scaling is not None
    prompt = torch.randint(3, 300, (1, 60), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(60)[None]
    with torch.no_grad():
        want = hf(prompt).logits
    with torch.inference_mode():
        cache = KVCache(ours.config, 1, 64, torch.float32)
        got, _, _ = ours(prompt, positions, cache.k, cache.v)
        plain = load_model(path)
        object.__setattr__(plain.config, "rope_scaling", None)
        wrong, _, _ = plain(prompt, positions, cache.k, cache.v)
    assert (got - want).abs().max().item() <= 1e-4
    if case != "dynamic":  # dynamic NTK equals plain RoPE below max_position_embeddings
        assert (wrong - want).abs().max().item() > 1e-2  # the variant matters at these positions


rope_dicts = st.fixed_dictionaries(
    {"rope_type": st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope", "proportional", "x"])},
    optional={
        "rope_theta": st.sampled_from([1e4, 5e5, 1e6, 0.0, -1.0, True]),
        "factor": st.one_of(st.floats(0.5, 64), st.sampled_from([1, 2, None, "2", True])),
        "original_max_position_embeddings": st.sampled_from([16, 32, 128, 256, 512, 0, None]),
        "low_freq_factor": st.sampled_from([1.0, 2.0, 4.0, 0.0]),
        "high_freq_factor": st.sampled_from([1.0, 4.0, 8.0]),
        "beta_fast": st.sampled_from([32, 16.0, 0.5]),
        "beta_slow": st.sampled_from([1, 2.0, 64.0]),
        "attention_factor": st.sampled_from([0.5, 1.0, 1.3]),
        "mscale": st.sampled_from([0.5, 1.0, 0.707]),
        "mscale_all_dim": st.sampled_from([0.5, 1.0, 0.707]),
        "truncate": st.booleans(),
        "partial_rotary_factor": st.sampled_from([0.5, 1.0]),
    },
)


valid_rope_dicts = st.one_of(
    st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "dynamic"]), "factor": st.floats(1, 16)}),
    st.fixed_dictionaries(
        {"rope_type": st.just("yarn"), "factor": st.floats(1, 16)},
        optional={"original_max_position_embeddings": st.sampled_from([16, 64, 256]),
                  "beta_fast": st.sampled_from([16, 32.0]), "beta_slow": st.sampled_from([1, 2.0]),
                  "attention_factor": st.floats(0.5, 2), "mscale": st.floats(0.5, 1.5),
                  "mscale_all_dim": st.floats(0.5, 1.5), "truncate": st.booleans(), "rope_theta": st.just(5e5)},
    ),
    st.fixed_dictionaries(
        {"rope_type": st.just("llama3"), "factor": st.floats(1, 16), "low_freq_factor": st.floats(0.5, 2),
         "high_freq_factor": st.floats(2.5, 8)},
        optional={"original_max_position_embeddings": st.sampled_from([16, 64, 256]), "rope_theta": st.just(5e5)},
    ),
)  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(rope=st.one_of(rope_dicts, valid_rope_dicts), as_scaling=st.booleans())
def test_rope_resolution_matches_transformers_or_is_refused(rope, as_scaling):
    """Our (inv_freq, attention scaling) equal transformers' MixtralRotaryEmbedding's for every rope dict we
    accept; whatever we refuse is refused with one line."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    from moetrt.model.rope import rope_frequencies

    body = {**TINY.to_hf_dict(), "rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    body["rope_scaling" if as_scaling else "rope_parameters"] = rope
    try:
        config = MixtralConfig.from_hf_dict(json.loads(json.dumps(body)))
    except MoetrtError as err:
        one_line(err)
        event("refused in one line")
        return
    event(f"accepted {config.rope_scaling.rope_type if config.rope_scaling else 'default'}, equal to transformers")
    hf_config = transformers.MixtralConfig.from_dict(json.loads(json.dumps(body)))
    hf = MixtralRotaryEmbedding(hf_config)
    inv_freq, scaling = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.allclose(inv_freq, hf.inv_freq, rtol=1e-6, atol=0), (config.rope_scaling, hf_config.rope_parameters)
    assert math.isclose(scaling, hf.attention_scaling, rel_tol=1e-9)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint32, torch.int64, torch.bool])
def test_integer_weights_are_refused(tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "ck", TINY, seed=0)
    state = load_file(path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].to(dtype)
    save_file(state, path / "model.safetensors")
    with pytest.raises(MoetrtError) as err:
        load_model(path)
    message = one_line(err.value)
    assert "'model.layers.0.self_attn.q_proj.weight' has dtype" in message and "floating-point" in message
    with pytest.raises(MoetrtError), CheckpointReader(path) as reader:
        reader.validate()


# --- kind 4: files that are not what their names say, safetensors headers -------------------------------
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("single") / "ck", TINY, seed=5)
    with CheckpointReader(path) as reader:
        reference = {name: t.clone() for name, t in reader.tensors()}
    return path, reference


def damaged_copy(src, dst, weights: bytes | None = None):
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    return dst


header_mutations = st.one_of(
    st.tuples(st.just("field"), st.integers(0, 1000), st.sampled_from(["dtype", "shape", "data_offsets"]), json_values),
    st.tuples(st.just("field"), st.integers(0, 1000), st.just("dtype"),
              st.sampled_from(["I32", "U32", "I64", "BOOL", "F16", "BF16", "F64", "U8", "F8_E4M3", "XX"])),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, 100_000)),
    st.tuples(st.just("metadata"), json_values),
)  # fmt: skip


@FAST
@given(mutation=header_mutations)
def test_safetensors_headers_are_checked_or_read_exactly(single, tmp_path_factory, mutation):
    path, reference = single
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    if mutation[0] == "field":
        names = sorted(k for k in header if k != "__metadata__")
        header[names[mutation[1] % len(names)]][mutation[2]] = mutation[3]
    elif mutation[0] == "metadata":
        header["__metadata__"] = mutation[1]
    if mutation[0] == "length":
        weights = mutation[1].to_bytes(8, "little") + raw[8:]
    elif mutation[0] == "truncate":
        weights = raw[: mutation[1] % len(raw)]
    else:
        text = json.dumps(header).encode()
        weights = len(text).to_bytes(8, "little") + text + data
    d = damaged_copy(path, tmp_path_factory.mktemp("st") / "ck", weights)
    got = read_or_refuse(d)
    if got is None:
        return
    # accepted: the same tensors (a float dtype relabelled with the same byte size would not be)
    assert all(torch.equal(got[name].float(), reference[name].float()) for name in reference)


def test_files_named_safetensors_that_are_not_files(single, tmp_path):
    path, _ = single
    cases = {
        "directory": lambda p: p.mkdir(),
        "broken symbolic link": lambda p: p.symlink_to(p.parent / "nowhere"),
        "symbolic link loop": lambda p: p.symlink_to(p),
    }
    for case, make in cases.items():
        d = damaged_copy(path, tmp_path / case.replace(" ", "_"))
        (d / "model.safetensors").unlink()
        make(d / "model.safetensors")
        with pytest.raises(MoetrtError) as err:
            load_model(d)
        message = one_line(err.value)
        assert "model.safetensors" in message and "expected a safetensors file" in message
    # a stray directory named *.safetensors beside the real weights is not read, nor hashed
    from moetrt.model.checkpoint import checkpoint_hash

    d = damaged_copy(path, tmp_path / "stray")
    (d / "extra.safetensors").mkdir()
    assert checkpoint_hash(d) == checkpoint_hash(path)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, single):
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint

    root = tmp_path_factory.mktemp("engine")
    export = export_checkpoint(single[0], root / "export", max_seq_len=64, max_batch=2, progress=False)
    return single[0], build_ort_engine(export, root / "engine", progress=False, threads=1), export


def engine_copy(engine_dir, dst):
    dst.mkdir()
    for file in engine_dir.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["missing", "directory", "truncated", "data missing", "data broken link"])
def test_validate_runs_the_engine_checks_generate_runs(engine, tmp_path, damage):
    from moetrt.names import DATA_FILE, MODEL_FILE
    from moetrt.runtime.engine import load_backend
    from moetrt.validate import validate

    checkpoint, engine_dir, _ = engine
    d = engine_copy(engine_dir, tmp_path / "engine")
    model, data = d / MODEL_FILE, d / DATA_FILE
    if damage == "missing":
        model.unlink()
    elif damage == "directory":
        model.unlink()
        model.mkdir()
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif damage == "data missing":
        data.unlink()
    else:
        data.unlink()
        data.symlink_to(d / "nowhere")
    with pytest.raises(MoetrtError) as generate_err:
        load_backend(d)
    with pytest.raises(MoetrtError) as validate_err:
        validate(checkpoint, d, num_random=1, steps=1, batch=1)
    assert one_line(validate_err.value) == one_line(generate_err.value)


# --- kinds 3, 5, 6: the command line -------------------------------------------------------------------
def cli(*args: str):
    """Run the CLI in-process (click's CliRunner on moetrt's own entry group): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from moetrt.cli import app

    result = CliRunner().invoke(app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_usage_error(code: int, stderr: str) -> str:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


TOKEN_IDS = __import__("re").compile(r"\s*[0-9]+(\s*,\s*[0-9]+)*\s*,?\s*")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    token_ids=st.one_of(st.text(alphabet="0123456789 ,_-+.x٣\t", max_size=12), st.just("5, 6"), st.just("7,")),
    max_new_tokens=st.one_of(st.integers(-3, 4).map(str), st.sampled_from(["abc", "1.5", "", "1e3", "٣", "0x2"])),
    seed=st.one_of(st.integers(-(2**70), 2**70).map(str), st.sampled_from(["-1", "x", "2.0"])),
)
def test_generate_arguments_are_refused_in_one_line_or_used_exactly(single, token_ids, max_new_tokens, seed):
    checkpoint, _ = single
    args = ("generate", str(checkpoint), "--token-ids", token_ids, "--max-new-tokens", max_new_tokens, "--seed", seed)
    code, stdout, stderr = cli(*args, "--json")
    if code != 0:
        assert_usage_error(code, stderr)
        event("refused in one line")
        return
    event("accepted, arguments used exactly")
    result = json.loads(stdout)
    ids = [int(t) for t in token_ids.split(",") if t.strip()]
    assert TOKEN_IDS.fullmatch(token_ids) and all(0 <= i < TINY.vocab_size for i in ids)
    assert result["prompt_token_ids"] == ids
    assert max_new_tokens.isascii() and int(max_new_tokens) >= 1 and len(result["token_ids"]) <= int(max_new_tokens)
    assert seed.isdigit() and seed.isascii() and len(seed) <= 30


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seed", "-1"], "error: Invalid value for '--seed': -1 is out of range; expected an integer >= 0"),
        (["--seed", "5_0"], "error: Invalid value for '--seed': '5_0' is not an integer (decimal digits, at most 30)"),
        (["--max-new-tokens", "abc"], "error: Invalid value for '--max-new-tokens': 'abc' is not an integer"),
        (["--temperature", "1_0"], "error: Invalid value for '--temperature': '1_0' is not a decimal number"),
        (["--temperature", "nan"], "error: sampling temperature must be a finite number"),
        (["--token-ids", "5 6"], "--token-ids '5 6': expected comma-separated integers"),
        (["--token-ids", "5_0"], "--token-ids '5_0': expected comma-separated integers"),
        (["--prompt", "caf\udce9"], "error: Invalid value for '--prompt': not valid UTF-8"),
        (["--nope"], "error: No such option: --nope"),
    ],
)
def test_cli_examples_of_the_issue(single, args, message):
    checkpoint, _ = single
    base = ["--token-ids", "1,2"] if "--token-ids" not in args and "--prompt" not in args else []
    code, _, stderr = cli("generate", str(checkpoint), *base, *args)
    assert message in assert_usage_error(code, stderr)


def test_validate_arguments_are_checked_before_the_run(engine, tmp_path):
    checkpoint, engine_dir, _ = engine
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"caf\xe9\n")
    code, _, stderr = cli("validate", str(checkpoint), str(engine_dir), "--prompts", str(prompts))
    assert "prompts.txt: not UTF-8 text (byte 3)" in assert_usage_error(code, stderr)
    code, _, stderr = cli("validate", str(checkpoint), str(engine_dir), "--json", str(tmp_path))
    assert "is a directory; expected a file path to write" in assert_usage_error(code, stderr)


def test_usage_errors_through_the_real_entry_point(single):
    import os
    import subprocess
    import sys

    checkpoint, _ = single
    for extra in ([b"--max-new-tokens", b"abc"], [b"--prompt", b"caf\xe9"]):
        proc = subprocess.run(
            [sys.executable.encode(), b"-m", b"moetrt", b"generate", os.fsencode(checkpoint), *extra],
            capture_output=True, timeout=300,
        )  # fmt: skip
        assert_usage_error(proc.returncode, proc.stderr.decode())


def test_resource_bounds(single, engine, tmp_path):
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint
    from moetrt.runtime.engine import load_backend

    checkpoint, _ = single
    _, _, export = engine
    code, _, stderr = cli("build", str(export), "-o", str(tmp_path / "e"), "--threads", str(10**12))
    assert "'--threads': 1000000000000 is out of range; expected an integer in [1, 4096]" in assert_usage_error(
        code, stderr
    )
    for threads in (0, 10**12):
        with pytest.raises(MoetrtError, match=rf"threads: expected an integer in \[1, 4096\], found {threads}"):
            build_ort_engine(export, tmp_path / "e", threads=threads, progress=False)
    code, _, stderr = cli("export", str(checkpoint), "-o", str(tmp_path / "x"), "--max-batch", str(10**12))
    assert "'--max-batch'" in assert_usage_error(code, stderr)
    with pytest.raises(MoetrtError, match=r"max_batch: expected an integer in \[1, 65536\]"):
        export_checkpoint(checkpoint, tmp_path / "x", max_batch=10**12, progress=False)
    body = TINY.to_hf_dict()
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps({**body, "num_hidden_layers": 10**12}))
    code, _, stderr = cli("inspect", str(tmp_path / "big"))
    assert "field 'num_hidden_layers': Input should be less than or equal to 1024" in assert_usage_error(code, stderr)
    # memory is checked before allocating, with how much was needed
    with pytest.raises(MoetrtError, match=r"KV cache of 1 rows x 1000000000 tokens: needs 476\.8 GiB, this machine"):
        load_backend(checkpoint, max_seq_len=10**9)
    assert not (tmp_path / "e").exists() and not (tmp_path / "x").exists()


def test_text_is_printed_literally(single, engine, tmp_path):
    checkpoint, _ = single
    _, _, export = engine
    marked = tmp_path / "ck[/x]"
    marked.mkdir(parents=True)  # "ck[" holding "x]": the path reads ck[/x] as rich markup would
    (marked / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    code, stdout, stderr = cli("inspect", str(marked))
    assert code == 0 and "ck[/x]" in stdout.replace("\n", ""), stderr
    out = tmp_path / "out[/x]y"
    code, stdout, stderr = cli("build", str(export), "-o", str(out), "--threads", "1")
    assert code == 0, stderr
    assert f"ort engine written to {out}" in stdout.replace("\n", "")


# --- kind 7: engine integrity ---------------------------------------------------------------------------
def manifest_of(d):
    return json.loads((d / "moetrt.json").read_text())


def test_manifest_records_sizes_and_digests_written_with_the_files(engine):
    import hashlib

    _, engine_dir, export = engine
    for d in (engine_dir, export):
        records = manifest_of(d)["file_records"]
        assert set(records) == {"model.onnx", "model.onnx.data"}
        for name, record in records.items():
            data = (d / name).read_bytes()
            assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_tampered_weights_are_caught(engine, tmp_path):
    from moetrt.artifacts import verify_artifact
    from moetrt.runtime.engine import load_backend

    checkpoint, engine_dir, _ = engine
    d = engine_copy(engine_dir, tmp_path / "flipped")
    data = bytearray((d / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.onnx.data").write_bytes(bytes(data))
    load_backend(d).close()  # same size: loads (sizes are checked on every load, digests on request)
    code, _, stderr = cli("verify", str(d))
    assert "model.onnx.data: content differs from the sha256 the manifest records" in assert_usage_error(code, stderr)
    code, _, stderr = cli("generate", str(d), "--token-ids", "1,2", "--max-new-tokens", "2", "--verify")
    assert "content differs" in assert_usage_error(code, stderr)
    code, stdout, stderr = cli("verify", str(engine_dir))
    assert code == 0 and "2 files" in stdout, stderr
    # the same-shaped weights of another engine
    from moetrt.engines.ort import build_ort_engine
    from moetrt.export import export_checkpoint

    other = make_checkpoint(tmp_path / "other", TINY, seed=9)
    export = export_checkpoint(other, tmp_path / "other-export", max_seq_len=64, max_batch=2, progress=False)
    other_engine = build_ort_engine(export, tmp_path / "other-engine", threads=1, progress=False)
    d = engine_copy(engine_dir, tmp_path / "swapped")
    (d / "model.onnx.data").write_bytes((other_engine / "model.onnx.data").read_bytes())
    with pytest.raises(MoetrtError, match="model.onnx.data: content differs"):
        verify_artifact(d)
    # truncated or grown: refused on every load
    for cut in (-1, 1):
        d = engine_copy(engine_dir, tmp_path / f"size{cut}")
        raw = (d / "model.onnx.data").read_bytes()
        (d / "model.onnx.data").write_bytes(raw[:cut] if cut < 0 else raw + b"\0")
        with pytest.raises(MoetrtError) as err:
            load_backend(d)
        assert "the manifest records" in one_line(err.value) and "re-create it" in str(err.value)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("max_seq_len",), "abc", "field 'max_seq_len': Input should be a valid integer, found 'abc'"),
        (("dtype",), "float16", "field 'dtype' is 'float16', the engine's graph runs float32"),
        (("config", "vocab_size"), 511, "field 'config.vocab_size' is 511, the engine's graph has 512 logits"),
        (("config", "num_hidden_layers"), "2", "field 'config.num_hidden_layers': Input should be a valid integer"),
        (("file_records", "model.onnx.data", "size"), -1, "field 'file_records.model.onnx.data.size'"),
        (("max_batch",), 10**12, "field 'max_batch': Input should be less than or equal to 65536"),
    ],
)
def test_tampered_manifest_values_are_named(engine, tmp_path, path, value, message):
    from moetrt.runtime.engine import load_backend

    _, engine_dir, _ = engine
    d = engine_copy(engine_dir, tmp_path / "engine")
    body = manifest_of(d)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    (d / "moetrt.json").write_text(json.dumps(body))
    with pytest.raises(MoetrtError) as err:
        load_backend(d)
    assert message in one_line(err.value)


MANIFEST_FIELDS = ("max_seq_len", "max_batch", "dtype", "threads", "device", "backend", "io", "parent", "precision",
                   "file_records", "config.vocab_size", "config.num_hidden_layers", "config.head_dim",
                   "config.rope_theta", "config.eos_token_ids", "config.tie_word_embeddings",
                   "config.rope_scaling")  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(MANIFEST_FIELDS), value=st.one_of(json_values, plausible))
def test_manifests_are_checked_or_the_engine_computes_the_same(engine, tmp_path_factory, field, value):
    import numpy as np

    from moetrt.runtime.engine import load_backend

    _, engine_dir, _ = engine
    d = tmp_path_factory.mktemp("m") / "engine"
    d.mkdir()
    for file in engine_dir.iterdir():
        (d / file.name).symlink_to(file) if file.name != "moetrt.json" else None
    body = manifest_of(engine_dir)
    target, *rest = field.split(".")
    if rest:
        body[target][rest[0]] = value
    else:
        body[target] = value
    (d / "moetrt.json").write_text(json.dumps(body))
    ids, pos = np.array([[1, 5, 9]]), np.array([[0, 1, 2]])
    try:
        backend = load_backend(d, max_batch=1)
        got = backend.step(ids, pos)
        backend.close()
    except MoetrtError as err:
        one_line(err)
        event("refused in one line")
        return
    event("accepted, logits identical")
    with load_backend(engine_dir, max_batch=1) as reference:
        want = reference.step(ids, pos)
    np.testing.assert_array_equal(got, want)


# --- kind 8: interrupts and temporary names ---------------------------------------------------------------
def test_temporary_names_fit_the_file_name_limit(tmp_path):
    from moetrt.fsutil import atomic_dir

    out = tmp_path / ("o" * 250)
    with atomic_dir(out) as tmp:
        assert len(tmp.name.encode()) <= 255 and tmp.parent == tmp_path
        (tmp / "x").write_text("1")
    with atomic_dir(out) as tmp:  # overwrite: the `.old-<pid>` name fits too
        (tmp / "x").write_text("2")
    assert (out / "x").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == [out.name]
    too_long = "the name is 256 bytes; file names are limited to 255 bytes"
    with pytest.raises(MoetrtError, match=too_long), atomic_dir(tmp_path / ("o" * 256)):
        pass
    long = tmp_path / ("é" * 127)  # 254 bytes, multi-byte characters
    with atomic_dir(long) as tmp:
        (tmp / "x").write_text("3")
    assert (long / "x").read_text() == "3"


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    from moetrt.fsutil import atomic_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "out"
    stale = [tmp_path / f".out.tmp-{dead_pid}-abcd1234", tmp_path / f".out.old-{dead_pid}"]
    live = tmp_path / f".out.tmp-{os.getpid()}-live0000"
    other = tmp_path / f".outer.tmp-{dead_pid}-abcd1234"
    for d in (*stale, live, other):
        d.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert not any(d.exists() for d in stale)
    assert live.exists() and other.exists()  # a live writer's, another output's


def wait_for(predicate, proc, timeout=600.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_interrupted_export_leaves_the_old_output_and_no_temporaries(single, engine, tmp_path, signal_name):
    import shutil
    import signal
    import subprocess
    import sys

    checkpoint, _ = single
    _, _, export = engine
    out = tmp_path / "export"
    shutil.copytree(export, out)
    before = (out / "moetrt.json").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moetrt", "export", str(checkpoint), "-o", str(out), "--max-seq-len", "64"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        started = wait_for(lambda: any(p.name.startswith(".export.tmp-") for p in tmp_path.iterdir()), proc)
        assert started, proc.communicate(timeout=60)
        proc.send_signal(getattr(signal, signal_name))
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (out / "moetrt.json").read_bytes() == before  # the earlier export is intact
    if signal_name == "SIGINT":
        assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
        assert "Traceback" not in stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    else:
        assert proc.returncode == -signal.SIGKILL
        assert any(p.name.startswith(".export.tmp-") for p in tmp_path.iterdir())
        from moetrt.fsutil import remove_stale_temporaries

        assert remove_stale_temporaries(out)  # what the next write of this output does first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
