"""A model as text in, text out: the artifact's config, its tokenizer, chat template and generation config,
and an opened backend. The CLI's `generate`, the demo and the server share it; nothing here prints.

The checkpoint's own files are the truth (see moetrt.model.tokenizer for BOS/EOS and special-token text,
moetrt.model.chat_template for chats, moetrt.runtime.generation_config for stop ids and sampling defaults);
every artifact carries them beside its tokenizer.json (moetrt.artifacts.carry_tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from moetrt.artifacts import Artifact, open_artifact
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.model.tokenizer import Detokenizer, Tokenizer
from moetrt.names import SENTENCEPIECE_MODEL, TOKENIZER
from moetrt.runtime.backend import Backend, ClosingContext
from moetrt.runtime.engine import open_backend
from moetrt.runtime.generation_config import GenerationDefaults


class TextModel(ClosingContext):
    """config + backend + the artifact's tokenizer (None when it has none) + generation defaults. `open` reads
    them all from a directory; the constructor takes parts a caller has already read (it then owns `backend`).
    The backend is None for the text side alone (`open_text`): a server front end whose engine runs elsewhere."""

    def __init__(
        self, artifact: Artifact, backend: Backend | None, tokenizer: Tokenizer | None, generation: GenerationDefaults
    ):
        self.artifact = artifact
        self.config: MixtralConfig = artifact.config
        self.backend = backend
        self.tokenizer = tokenizer
        self.generation = generation
        self.name = artifact.path.resolve().name  # the model name APIs report

    @classmethod
    def open(
        cls,
        path: str | Path | Artifact,
        max_batch: int | None = None,
        threads: int | None = None,
        extra_outputs: Sequence[str] = (),
        tokenizer_dir: str | Path | None = None,
        max_seq_len: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
    ) -> TextModel:
        """Open an engine or checkpoint directory (or an `Artifact` already opened by `open_artifact`) once:
        its text files (from `tokenizer_dir` when given), then its backend (`moetrt.runtime.engine.open_backend`
        takes the remaining arguments). Raises MoetrtError (one line)."""
        model = cls.open_text(path, tokenizer_dir)
        model.backend = open_backend(model.artifact, max_batch, threads, extra_outputs, max_seq_len, dtype, device)
        return model

    @classmethod
    def open_text(cls, path: str | Path | Artifact, tokenizer_dir: str | Path | None = None) -> TextModel:
        """The text side of an engine or checkpoint directory, without opening its backend (see `open`)."""
        artifact = path if isinstance(path, Artifact) else open_artifact(path)
        text_dir = Path(tokenizer_dir) if tokenizer_dir is not None else artifact.path
        tokenizer = load_tokenizer(text_dir, required=tokenizer_dir is not None)
        generation = GenerationDefaults.from_dir(text_dir, artifact.config)
        return cls(artifact, None, tokenizer, generation)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template if self.tokenizer else None

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """generation_config.json's eos_token_id (an id or a list), else config.json's."""
        return frozenset(self.generation.stop_token_ids)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of a plain prompt; BOS per the checkpoint's add_bos_token unless `add_bos` says otherwise."""
        return self._tokenizer().encode(text, add_bos=add_bos)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered with the checkpoint's chat template (see
        moetrt.model.chat_template: sandboxed, as transformers renders it; a system message the template
        refuses is folded into the first user turn). MoetrtError (one line) for what the template refuses."""
        return self._tokenizer().render_chat(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """`render_chat` encoded without adding a second BOS (the template writes its own)."""
        return self._tokenizer().encode_chat(messages, add_generation_prompt)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer().decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: Sequence[int]) -> Detokenizer:
        """Incremental text of the tokens generated after `prompt_ids` (see moetrt.model.tokenizer.Detokenizer)."""
        return self._tokenizer().detokenizer(prompt_ids)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise MoetrtError(f"{self.artifact.path}: no {TOKENIZER} or {SENTENCEPIECE_MODEL}; text needs a tokenizer")
        return self.tokenizer


def load_tokenizer(directory: str | Path, required: bool = False) -> Tokenizer | None:
    """The directory's tokenizer; None when it has neither tokenizer.json nor tokenizer.model, unless
    `required` (then MoetrtError)."""
    directory = Path(directory)
    if not required and not (directory / TOKENIZER).is_file() and not (directory / SENTENCEPIECE_MODEL).is_file():
        return None
    return Tokenizer.from_dir(directory)
