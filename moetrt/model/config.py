"""`MixtralConfig`: the architecture hyper-parameters, read from a Hugging Face `config.json`.

Accepts both config generations: transformers < 5 (top-level `rope_theta`, `torch_dtype`) and
transformers 5 (`rope_parameters={"rope_theta": ...}`, `dtype`). Anything that is not a plain Mixtral
(another architecture, a non-default RoPE type, a missing field) is refused with an error naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError

DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM",)
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_local_experts",
    "num_experts_per_tok",
)


@dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok",
            "max_position_embeddings",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MoetrtError(f"config field '{name}': expected a positive integer, found {value!r}")
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
        if self.dtype not in DTYPES:
            raise MoetrtError(f"config field 'dtype': expected one of {', '.join(DTYPES)}, found {self.dtype!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise MoetrtError(
                f"config field 'sliding_window': expected null or a positive integer, found {self.sliding_window!r}"
            )

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
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MixtralConfig:
        """Inverse of `to_dict` (used for manifests)."""
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-5 style `config.json` body (also readable by transformers 4)."""
        eos = list(self.eos_token_ids)
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
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
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
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> MixtralConfig:
        """Build from a Hugging Face config body; `source` names the file in error messages."""
        archs = raw.get("architectures")
        model_type = raw.get("model_type")
        if archs is not None and not any(a in _SUPPORTED_ARCHITECTURES for a in archs):
            raise MoetrtError(f"{source}: field 'architectures' is {archs}; moetrt supports MixtralForCausalLM")
        if archs is None and model_type != "mixtral":
            raise MoetrtError(
                f"{source}: field 'architectures' is missing and model_type is {model_type!r}; "
                "expected a Mixtral config"
            )
        for name in _REQUIRED:
            if name not in raw:
                raise MoetrtError(f"{source}: missing field '{name}'")
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise MoetrtError(
                f"{source}: field 'rope_parameters.rope_type' is {rope_type!r}; only 'default' RoPE is supported"
            )
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        eos = raw.get("eos_token_id", 2)
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        try:
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_hidden_layers=raw["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=raw.get("num_key_value_heads") or heads,
                head_dim=head_dim,
                num_local_experts=raw["num_local_experts"],
                num_experts_per_tok=raw["num_experts_per_tok"],
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope_theta),
                max_position_embeddings=raw.get("max_position_embeddings", 32768),
                sliding_window=raw.get("sliding_window"),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                dtype=str(dtype).replace("torch.", ""),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except MoetrtError as err:
            raise MoetrtError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path) -> MixtralConfig:
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise MoetrtError(f"{path}: not found; expected a Hugging Face config.json in the checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MoetrtError(f"{path}: malformed JSON ({err})") from None
        if not isinstance(raw, dict):
            raise MoetrtError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        return cls.from_hf_dict(raw, source=str(path))


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
