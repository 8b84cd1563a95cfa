"""The checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`), with incremental decoding
for streaming output."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from moetrt.errors import MoetrtError
from moetrt.names import TOKENIZER


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, bos_token_id: int | None):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path, bos_token_id: int | None = None) -> Tokenizer:
        path = Path(checkpoint_dir) / TOKENIZER
        if not path.is_file():
            raise MoetrtError(f"{path}: not found; the checkpoint directory needs a tokenizer.json")
        try:
            return cls(_HFTokenizer.from_file(str(path)), bos_token_id)
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise MoetrtError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] if add_bos and self.bos_token_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing token list into text pieces, holding back bytes that do not yet form whole characters."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self._emitted = text[self._emitted :], len(text)
        return piece
