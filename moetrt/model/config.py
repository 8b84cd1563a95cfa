"""`MixtralConfig`: the architecture hyper-parameters, read from a Hugging Face `config.json`.

Accepts both config generations: transformers < 5 (top-level `rope_theta`, `torch_dtype`, `rope_scaling`)
and transformers 5 (`rope_parameters={"rope_theta": ..., "rope_type": ...}`, `dtype`). Every field is parsed
by a strict schema (`moetrt.schema`): a wrong type, an out-of-range value, another architecture or a RoPE
variant transformers' Mixtral would not run the same way is refused with one line naming the field; nothing
is coerced (`"false"` is not False, `true` is not a window of 1).

RoPE: the types transformers 5's `MixtralRotaryEmbedding` honours through `ROPE_INIT_FUNCTIONS`
(transformers/modeling_rope_utils.py) and that are static for positions below max_position_embeddings:
"default", "linear", "dynamic" (NTK: identical to default until a sequence outgrows max_position_embeddings,
which moetrt never runs), "yarn" and "llama3". "longrope" (switches frequencies with the sequence length) and
"proportional"/partial rotation (Mixtral rotates the whole head) are refused. `rope_scaling` next to
`rope_parameters` is resolved as transformers resolves it: `rope_scaling` wins, and the top-level
`rope_theta` (default 1e6, `MixtralConfig.default_theta`) fills in a missing `rope_theta`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from moetrt.errors import MoetrtError
from moetrt.schema import (
    STRICT,
    Dim,
    Layers,
    Positions,
    PositiveFloat,
    Strict,
    TokenId,
    Vocab,
    load_json,
    parse,
    schema_error,
)

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
Dtype = Literal["float32", "float16", "bfloat16"]
PRECISION_OF_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # the engines' short names


def parse_dtype(value: str, field: str = "dtype") -> str:
    """A dtype given by its name or its short precision name ("bf16" or "bfloat16") -> the name (`DTYPES`);
    a one-line MoetrtError naming `field` for anything else."""
    names = {**{short: name for name, short in PRECISION_OF_DTYPE.items()}, **{name: name for name in DTYPES}}
    if value not in names:
        choices = ", ".join(f"{short}/{name}" for name, short in PRECISION_OF_DTYPE.items())
        raise MoetrtError(f"{field}: expected one of {choices}, found {value!r}")
    return names[value]


_SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
DEFAULT_ROPE_THETA = 1e6  # transformers' MixtralConfig.default_theta
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


def _list_to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class RopeScaling(Strict):
    """A non-default RoPE variant, with the parameters transformers' rope init function for it reads
    (optional ones resolved as transformers resolves them, so the values here are the ones used)."""

    model_config = ConfigDict(**STRICT, extra="forbid")

    rope_type: Literal["linear", "dynamic", "yarn", "llama3"]
    factor: Annotated[float, Field(ge=1.0)]
    original_max_position_embeddings: Positions | None = None  # yarn, llama3
    attention_factor: PositiveFloat | None = None  # yarn
    beta_fast: PositiveFloat = 32.0  # yarn
    beta_slow: PositiveFloat = 1.0  # yarn
    mscale: PositiveFloat | None = None  # yarn
    mscale_all_dim: PositiveFloat | None = None  # yarn
    truncate: bool = True  # yarn
    low_freq_factor: PositiveFloat | None = None  # llama3
    high_freq_factor: PositiveFloat | None = None  # llama3

    @model_validator(mode="after")
    def _required(self) -> RopeScaling:
        needs = {"yarn": ("original_max_position_embeddings",),
                 "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")}  # fmt: skip
        for name in needs.get(self.rope_type, ()):
            if getattr(self, name) is None:
                raise ValueError(f"rope_type {self.rope_type!r} needs '{name}'")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 RoPE needs high_freq_factor > low_freq_factor")
        if self.rope_type == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError("yarn RoPE needs beta_fast >= beta_slow")
        return self


@dataclass(frozen=True, config=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"))
class MixtralConfig:
    vocab_size: Vocab
    hidden_size: Dim
    intermediate_size: Dim
    num_hidden_layers: Layers
    num_attention_heads: Dim
    num_key_value_heads: Dim
    head_dim: Dim
    num_local_experts: Dim
    num_experts_per_tok: Dim
    rms_norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = DEFAULT_ROPE_THETA
    max_position_embeddings: Positions = 32768
    sliding_window: Positions | None = None
    tie_word_embeddings: bool = False
    dtype: Dtype = "bfloat16"
    bos_token_id: TokenId | None = 1
    eos_token_ids: Annotated[tuple[TokenId, ...], BeforeValidator(_list_to_tuple)] = (2,)
    rope_scaling: RopeScaling | None = None  # None: default RoPE

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise MoetrtError(
                f"config field 'num_key_value_heads': {self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise MoetrtError(
                f"config field 'num_experts_per_tok': {self.num_experts_per_tok} exceeds "
                f"num_local_experts={self.num_local_experts}"
            )
        if self.head_dim % 2:
            raise MoetrtError(f"config field 'head_dim': RoPE needs an even head_dim, found {self.head_dim}")

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        """Query heads per KV head (grouped-query attention): query head h reads KV head h // n_rep."""
        return self.num_attention_heads // self.num_key_value_heads

    def param_counts(self) -> dict[str, int]:
        """Parameter counts: total, active per token (top-k of E experts), and by part."""
        h, f, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        attn = h * self.num_attention_heads * self.head_dim * 2 + h * self.num_key_value_heads * self.head_dim * 2
        expert = 3 * h * f
        router = e * h
        norms = 2 * h
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        per_layer_fixed = attn + router + norms
        layers = self.num_hidden_layers
        total = embed + lm_head + h + layers * (per_layer_fixed + e * expert)
        active = embed + lm_head + h + layers * (per_layer_fixed + self.num_experts_per_tok * expert)
        return {
            "total_params": total,
            "active_params": active,
            "embedding_params": embed,
            "lm_head_params": lm_head,
            "attention_params": layers * attn,
            "expert_params": layers * e * expert,
            "router_params": layers * router,
        }

    def kv_cache_bytes_per_token(self, dtype: str | None = None) -> int:
        """Bytes of K and V cache one token occupies over all layers (batch 1)."""
        dtype = dtype or self.dtype
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * DTYPE_BYTES[dtype]

    # --- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.model_dump()
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "config", within: str = "") -> MixtralConfig:
        """Inverse of `to_dict` (used for manifests); a one-line MoetrtError naming `source` and the field
        (`within`: where `d` sits in its file, e.g. "config")."""
        if not isinstance(d, dict):
            where = f"field '{within}'" if within else "the config"
            raise MoetrtError(f"{source}: {where}: expected a JSON object, found {type(d).__name__}")
        try:
            return cls(**d)
        except ValidationError as err:
            raise schema_error(source, err, within) from None
        except MoetrtError as err:
            raise MoetrtError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style `config.json` body (also readable by transformers 4)."""
        eos = list(self.eos_token_ids)
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling.model_dump(exclude_none=True))
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "torch_dtype": self.dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "hidden_act": "silu",
            "router_aux_loss_coef": 0.02,
            "output_router_logits": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, raw: Any, source: str = "config.json") -> MixtralConfig:
        """Build from a Hugging Face config body; `source` names the file in error messages."""
        return parse(HFMixtralConfig, raw, source).to_config(source)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> MixtralConfig:
        path = Path(checkpoint_dir) / "config.json"
        if not path.exists():
            raise MoetrtError(f"{path}: not found; expected a Hugging Face config.json in the checkpoint directory")
        return cls.from_hf_dict(load_json(path, "a Hugging Face config.json"), source=str(path))


class HFRopeParameters(Strict):
    """`rope_parameters` / `rope_scaling` as transformers writes them (every key its RoPE code reads)."""

    model_config = ConfigDict(**STRICT, extra="forbid")

    rope_type: str | None = None
    type: str | None = None  # the transformers < 4.45 spelling of rope_type
    rope_theta: PositiveFloat | None = None
    partial_rotary_factor: Annotated[float, Field(ge=1.0, le=1.0)] | None = None  # Mixtral rotates whole heads
    factor: float | None = None
    original_max_position_embeddings: Positions | None = None
    attention_factor: PositiveFloat | None = None
    beta_fast: PositiveFloat | None = None
    beta_slow: PositiveFloat | None = None
    mscale: PositiveFloat | None = None
    mscale_all_dim: PositiveFloat | None = None
    truncate: bool | None = None
    low_freq_factor: PositiveFloat | None = None
    high_freq_factor: PositiveFloat | None = None
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None


class HFMixtralConfig(Strict):
    """The fields of a Hugging Face Mixtral `config.json` that decide the computation (others are kept
    unread: training-only fields, `transformers_version`, ...)."""

    architectures: list[str] | None = None
    model_type: str | None = None
    vocab_size: Vocab
    hidden_size: Dim
    intermediate_size: Dim
    num_hidden_layers: Layers
    num_attention_heads: Dim
    num_key_value_heads: Dim | None = None  # null: num_attention_heads (multi-head attention)
    head_dim: Dim | None = None  # null: hidden_size // num_attention_heads
    num_local_experts: Dim
    num_experts_per_tok: Dim
    rms_norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = DEFAULT_ROPE_THETA
    rope_parameters: HFRopeParameters | None = None
    rope_scaling: HFRopeParameters | None = None
    partial_rotary_factor: Annotated[float, Field(ge=1.0, le=1.0)] | None = None
    max_position_embeddings: Positions = 32768
    sliding_window: Positions | None = None
    tie_word_embeddings: bool = False
    dtype: Dtype | None = None
    torch_dtype: Dtype | None = None
    bos_token_id: TokenId | None = None
    eos_token_id: TokenId | list[TokenId] | None = 2
    hidden_act: Literal["silu"] = "silu"

    @model_validator(mode="after")
    def _mixtral(self) -> HFMixtralConfig:
        if self.architectures is not None and not any(a in _SUPPORTED_ARCHITECTURES for a in self.architectures):
            raise ValueError(f"field 'architectures' is {self.architectures}; moetrt supports MixtralForCausalLM")
        if self.architectures is None and self.model_type != "mixtral":
            raise ValueError(
                f"field 'architectures' is missing and model_type is {self.model_type!r}; expected a Mixtral config"
            )
        return self

    def to_config(self, source: str) -> MixtralConfig:
        heads = self.num_attention_heads
        if self.head_dim is None and self.hidden_size % heads:
            raise MoetrtError(
                f"{source}: field 'head_dim' is null and hidden_size {self.hidden_size} is not a multiple of {heads}"
            )
        eos = self.eos_token_id
        fields = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads if self.num_key_value_heads is None else self.num_key_value_heads,
            head_dim=self.hidden_size // heads if self.head_dim is None else self.head_dim,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self._rope_theta(source),
            max_position_embeddings=self.max_position_embeddings,
            sliding_window=self.sliding_window,
            tie_word_embeddings=self.tie_word_embeddings,
            dtype=self.dtype or self.torch_dtype or "bfloat16",
            bos_token_id=self.bos_token_id,
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            rope_scaling=self._rope_scaling(source),
        )
        try:
            return MixtralConfig(**fields)
        except MoetrtError as err:  # a cross-field check of MixtralConfig
            raise MoetrtError(f"{source}: {err}") from None

    def _rope(self) -> tuple[str, HFRopeParameters]:
        """transformers' `convert_rope_params_to_dict`: a non-empty `rope_scaling` replaces `rope_parameters`."""
        chosen = "rope_scaling" if self.rope_scaling and self.rope_scaling.model_fields_set else "rope_parameters"
        return chosen, getattr(self, chosen) or HFRopeParameters()

    def _rope_theta(self, source: str) -> float:
        """The RoPE base: the rope dict's, else the top-level field's. Both given and different is refused
        (which one a reader takes differs between transformers versions: never a silent choice)."""
        field, rope = self._rope()
        if rope.rope_theta is None:
            return self.rope_theta
        if "rope_theta" in self.model_fields_set and self.rope_theta != rope.rope_theta:
            raise MoetrtError(
                f"{source}: field 'rope_theta' is {self.rope_theta} but '{field}.rope_theta' is {rope.rope_theta}; "
                "expected one value"
            )
        return rope.rope_theta

    def _rope_scaling(self, source: str) -> RopeScaling | None:
        field, rope = self._rope()
        rope_type = rope.rope_type or rope.type or "default"
        if rope_type == "default":
            return None
        if rope_type not in ROPE_TYPES:
            raise MoetrtError(
                f"{source}: field '{field}.rope_type' is {rope_type!r}; moetrt runs {', '.join(ROPE_TYPES)} RoPE "
                "(longrope switches frequencies with the sequence length, proportional rotates part of a head)"
            )
        read_elsewhere = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
        params = rope.model_dump(exclude_none=True, exclude=read_elsewhere)
        if rope_type in ("yarn", "llama3"):
            params.setdefault("original_max_position_embeddings", self.max_position_embeddings)
        if rope_type != "yarn":
            params = {k: v for k, v in params.items() if k in _PARAMS_READ[rope_type]}
        try:
            return RopeScaling(rope_type=rope_type, **params)
        except ValidationError as err:
            raise schema_error(source, err, within=field) from None


# The keys transformers' init function of each RoPE type reads (yarn reads every RopeScaling field).
_PARAMS_READ = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


PRESETS: dict[str, MixtralConfig] = {
    "mixtral-8x7b": MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
    ),
    "mixtral-8x22b": MixtralConfig(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, head_dim=128, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=65536,
    ),
    # The benchmark configuration of the issues (0.79B parameters): big enough for bandwidth-bound decode.
    "mid": MixtralConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096, dtype="float32",
    ),
    # Small enough for tests and `moetrt demo` (a few MB).
    "tiny": MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=512, dtype="float32",
    ),
}  # fmt: skip


def preset(name: str) -> MixtralConfig:
    if name not in PRESETS:
        raise MoetrtError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return PRESETS[name]
