"""The checkpoint's `generation_config.json` (transformers' GenerationConfig): stop ids and sampling defaults.

Fields read (transformers' names and defaults):
    eos_token_id     an id or a list of ids; generation stops at any of them. Missing: config.json's
                     eos_token_id (which may be a list too).
    do_sample        false (default): greedy, whatever temperature/top_k/top_p say, as in transformers
    temperature      1.0      top_k  50      top_p  1.0     (used when do_sample is true)
    max_new_tokens   missing: the caller's default (moetrt does not read `max_length`, whose transformers
                     default of 20 counts the prompt too)
A caller's explicit value overrides each field (`sampling`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.names import GENERATION_CONFIG
from moetrt.runtime.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationDefaults:
    stop_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int | None = None

    @classmethod
    def from_dir(cls, directory: str | Path, config: MixtralConfig) -> GenerationDefaults:
        """Read `directory/generation_config.json` if there is one; stop ids fall back to `config`'s EOS ids."""
        path = Path(directory) / GENERATION_CONFIG
        raw: dict[str, Any] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise MoetrtError(f"{path}: not valid JSON ({err})") from None
            if not isinstance(raw, dict):
                raise MoetrtError(f"{path}: expected a JSON object")
        eos = raw.get("eos_token_id")
        stop = config.eos_token_ids if eos is None else eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop):
            raise MoetrtError(f"{path}: field 'eos_token_id' must be a token id or a list of token ids, found {eos!r}")
        fields = {"do_sample": bool, "temperature": float, "top_k": int, "top_p": float, "max_new_tokens": int}
        values = {}
        for name, kind in fields.items():
            value = raw.get(name)
            if value is None:
                continue
            if isinstance(value, bool) != (kind is bool) or not isinstance(
                value, (int, float) if kind is float else kind
            ):
                raise MoetrtError(f"{path}: field '{name}' must be {kind.__name__}, found {value!r}")
            values[name] = kind(value)
        return cls(stop_token_ids=tuple(dict.fromkeys(stop)), **values)

    def sampling(
        self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None
    ) -> SamplingParams:
        """The sampling parameters: the checkpoint's (greedy unless do_sample), each given argument overriding."""
        base = (
            SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
            if self.do_sample
            else SamplingParams()
        )
        return SamplingParams(
            temperature=base.temperature if temperature is None else temperature,
            top_k=base.top_k if top_k is None else top_k,
            top_p=base.top_p if top_p is None else top_p,
        )
