"""The server's one contact with the text model: open a TextModel (tokenizer, chat template, generation
defaults, stop ids, backend) for serving.

INTERIM: `moetrt.runtime.text_model.TextModel` is not on main yet. Until it is, `_InterimTextModel` provides
the part of its agreed API the server uses (encode, encode_chat, detokenizer, stop_token_ids, generation,
name, backend, close); when it lands, `open_text_model` returns `TextModel.open(...)` and this class goes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream

from moetrt.errors import MoetrtError
from moetrt.model.tokenizer import Tokenizer
from moetrt.runtime.engine import load_backend
from moetrt.runtime.sampling import SamplingParams


def open_text_model(path: str | Path, slots: int | None = None, threads: int | None = None) -> _InterimTextModel:
    """The text model of an engine directory (or a checkpoint, run eagerly) with `slots` KV slots."""
    return _InterimTextModel(Path(path), slots, threads)


@dataclass(frozen=True)
class _Generation:
    max_new_tokens: int | None = None

    def sampling(self, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None):
        return SamplingParams(temperature=temperature or 0.0, top_k=top_k or 0, top_p=1.0 if top_p is None else top_p)


class _Detokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self._tok = tokenizer._tok
        self._stream = DecodeStream(ids=prompt_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""


class _InterimTextModel:
    def __init__(self, path: Path, slots: int | None, threads: int | None):
        self.backend = load_backend(path, max_batch=slots, threads=threads)
        self.config = self.backend.config
        self.name = path.resolve().name
        self.tokenizer = Tokenizer.from_dir(path, bos_token_id=self.config.bos_token_id)
        config_file = path / "tokenizer_config.json"
        raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.chat_template = raw.get("chat_template")
        self.generation = _Generation()
        self.stop_token_ids = frozenset(self.config.eos_token_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=True if add_bos is None else add_bos)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if self.chat_template is None:
            raise MoetrtError("the tokenizer has no chat_template (tokenizer_config.json)")

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
            )
        except TemplateError as err:
            raise MoetrtError(f"the chat template refused the messages: {err}") from None
        return self.encode(text, add_bos=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids)

    def detokenizer(self, prompt_ids: list[int]) -> _Detokenizer:
        return _Detokenizer(self.tokenizer, prompt_ids)

    def close(self) -> None:
        self.backend.close()
