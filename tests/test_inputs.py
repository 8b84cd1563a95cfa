"""Every input checked before it is used: hostile config.json, shard indexes, safetensors headers,
manifests and CLI arguments (hypothesis). Each generated input must give a one-line MoetrtError (CLI:
`error: ...`, exit 2) or the right result: never a traceback, a hang, or a silently changed value."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrt.errors import MoetrtError
from moetrt.model.checkpoint import INDEX_FILE, CheckpointReader
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


@FAST
@given(field=st.sampled_from(FIELDS), value=json_values)
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
        return
    expected_after_success(field, value, config)


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
    try:
        with CheckpointReader(d) as reader:
            reader.validate()
            got = dict(reader.tensors())
    except MoetrtError as err:
        one_line(err)
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
