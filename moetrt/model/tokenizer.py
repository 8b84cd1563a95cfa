"""The checkpoint's tokenizer, read the way transformers' fast tokenizer reads it.

Files (a Hugging Face checkpoint's, carried into every moetrt artifact):
    tokenizer.json           the `tokenizers` pipeline (normalizer, model, decoder, post-processor)
    tokenizer.model          a sentencepiece model; used only when tokenizer.json is missing, converted to the
                             same pipeline as the Hub's Llama/Mistral tokenizer.json (`from_sentencepiece`)
    tokenizer_config.json    bos_token / eos_token / unk_token / pad_token, add_bos_token / add_eos_token,
                             chat_template (a string, or a list of {name, template}: "default" is used)
    special_tokens_map.json  special tokens that tokenizer_config.json does not name (transformers' precedence)
    chat_template.jinja      the chat template as a file; wins over tokenizer_config.json's, as in transformers

Rules (transformers' defaults, so ids match `AutoTokenizer` on the same files):
- BOS/EOS are the checkpoint's tokens. `encode` adds BOS when tokenizer_config.json says `add_bos_token: true`
  and EOS when it says `add_eos_token: true`; where it says neither, tokenizer.json's post-processor decides
  (what `encode(add_special_tokens=True)` would add). A caller may override BOS per call.
- Special-token text typed in a prompt ("<s>", "</s>", or any other added token) is parsed as that special
  token, as transformers does by default (`split_special_tokens=False`): "<s>hi" encodes to [BOS, ...].
  A rendered chat template writes its own BOS text, so it is encoded with `add_bos=False`.
- `decode` skips special tokens by default; `detokenizer` streams exactly the text that decoding the prompt
  and the new tokens together adds after the prompt's text (tokenizers' `DecodeStream`), so the space a
  sentencepiece tokenizer writes as the leading "▁" of a word is kept and no UTF-8 character is split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from moetrt.errors import MoetrtError
from moetrt.model.chat_template import render_chat
from moetrt.names import CHAT_TEMPLATE, SENTENCEPIECE_MODEL, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
SPIECE_UNDERLINE = "▁"  # sentencepiece's word-boundary mark (U+2581)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the checkpoint's special-token rules and chat template."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        special_tokens: dict[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_template: str | None = None,
    ):
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens or {})  # {"bos_token": "<s>", ...}: the names transformers uses
        self.chat_template = chat_template
        self.bos_token_id = self._id(self.special_tokens.get("bos_token"))
        self.eos_token_id = self._id(self.special_tokens.get("eos_token"))
        added = self._post_processor_adds()
        self.add_bos_token = added[0] if add_bos_token is None else add_bos_token and self.bos_token_id is not None
        self.add_eos_token = added[1] if add_eos_token is None else add_eos_token and self.eos_token_id is not None

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint or artifact directory (see the module docstring for the files).
        Raises MoetrtError (one line) when there is none or a file is malformed."""
        directory = Path(directory)
        config = _read_json(directory / TOKENIZER_CONFIG)
        special_map = _read_json(directory / SPECIAL_TOKENS_MAP)
        special = {}
        for key in SPECIAL_TOKEN_KEYS:  # tokenizer_config.json first, special_tokens_map.json fills the gaps
            text = _token_text(config.get(key)) or _token_text(special_map.get(key))
            if text:
                special[key] = text
        template_file = directory / CHAT_TEMPLATE
        template = template_file.read_text() if template_file.is_file() else _chat_template(config, directory)
        return cls(
            _load_pipeline(directory),
            special,
            add_bos_token=_flag(config, "add_bos_token", directory),
            add_eos_token=_flag(config, "add_eos_token", directory),
            chat_template=template,
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`: BOS first when `add_bos`, EOS last when `add_eos` (each defaults to the
        checkpoint's add_bos_token / add_eos_token). Special-token text inside `text` becomes that token."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos_token if add_bos is None else add_bos:
            ids.insert(0, _required(self.bos_token_id, "bos_token"))
        if self.add_eos_token if add_eos is None else add_eos:
            ids.append(_required(self.eos_token_id, "eos_token"))
        return ids

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered with the checkpoint's chat template
        (moetrt.model.chat_template: sandboxed, as transformers renders it)."""
        return render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """`render_chat`, encoded without adding BOS or EOS: the template writes its own, and transformers'
        apply_chat_template encodes with add_special_tokens=False too."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False, add_eos=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> Detokenizer:
        """Incremental decoding of the tokens that follow `prompt_ids` (see `Detokenizer`)."""
        return Detokenizer(self._tok, prompt_ids, skip_special_tokens)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """(BOS, EOS): whether tokenizer.json's post-processor adds them around a single sequence."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = full.index(plain[0]) if plain and plain[0] in full else 0
        head, tail = full[:start], full[start + len(plain) :]
        return (self.bos_token_id is not None and self.bos_token_id in head,
                self.eos_token_id is not None and self.eos_token_id in tail)  # fmt: skip


class Detokenizer:
    """Text of generated tokens, one token at a time, built on `tokenizers.decoders.DecodeStream` seeded with
    the prompt's ids.

    The concatenation of `push` results equals `decode(prompt + new)[len(decode(prompt)):]`: a leading
    sentencepiece "▁" becomes the space it stands for, and bytes of a character split over several
    byte-fallback tokens are held back until the character is whole (never a lone U+FFFD piece).
    """

    def __init__(self, tokenizer: _HFTokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self._tok = tokenizer
        self._stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        """The new text that `token_id` completes ("" while a character is still incomplete)."""
        return self._stream.step(self._tok, token_id) or ""


def from_sentencepiece(model_file: str | Path) -> _HFTokenizer:
    """A `tokenizers` pipeline equal to a Llama/Mistral sentencepiece BPE model, in the layout of the Hub's
    legacy Llama tokenizer.json: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with
    byte fallback, decoder Replace("▁", " ") / ByteFallback / Fuse / Strip(1 left), post-processor "<s> $A".

    BPE merges are every split of a normal piece into two pieces of the vocabulary, ranked by the merged
    piece's sentencepiece score (higher first): sentencepiece merges the pair whose result scores highest.
    Other sentencepiece models (Unigram, or normalization this layout does not express) are refused with one
    line naming the converter to run instead. Needs the `sentencepiece` package (its model protobuf).
    """
    path = Path(model_file)
    hint = "convert it with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes tokenizer.json"
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise MoetrtError(
            f"{path}: reading a sentencepiece model needs `pip install sentencepiece`, or {hint}"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf's DecodeError and friends
        raise MoetrtError(f"{path}: not a sentencepiece model ({err})") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if (
        trainer.model_type != sentencepiece_model_pb2.TrainerSpec.BPE
        or not trainer.byte_fallback
        or not norm.add_dummy_prefix
        or norm.remove_extra_whitespaces
        or norm.precompiled_charsmap
    ):
        raise MoetrtError(f"{path}: only Llama/Mistral-style BPE sentencepiece models are read directly; {hint}")
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    ranked = []
    for piece in proto.pieces:
        if piece.type != normal:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = proto.pieces[trainer.unk_id].piece
    tok = _HFTokenizer(
        models.BPE(
            vocab=vocab, merges=[(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    control = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    specials = [p.piece for p in proto.pieces if p.type == control or p.piece == unk]
    tok.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in specials])
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    if trainer.bos_id >= 0:
        bos = proto.pieces[trainer.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)]
        )
    return tok


def _required(token_id: int | None, name: str) -> int:
    if token_id is None:
        raise MoetrtError(f"the tokenizer has no {name} (tokenizer_config.json / special_tokens_map.json) to add")
    return token_id


def _load_pipeline(directory: Path) -> _HFTokenizer:
    path = directory / TOKENIZER
    if path.is_file():
        try:
            return _HFTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise MoetrtError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
    if (directory / SENTENCEPIECE_MODEL).is_file():
        return from_sentencepiece(directory / SENTENCEPIECE_MODEL)
    raise MoetrtError(f"{path}: not found; the checkpoint directory needs a tokenizer.json (or tokenizer.model)")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoetrtError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise MoetrtError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _flag(config: dict[str, Any], key: str, directory: Path) -> bool | None:
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        raise MoetrtError(f"{directory / TOKENIZER_CONFIG}: field '{key}' must be true or false, found {value!r}")
    return value


def _chat_template(config: dict[str, Any], directory: Path) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (the "default" one)."""
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise MoetrtError(
        f"{directory / TOKENIZER_CONFIG}: field 'chat_template' must be a string or a list with a 'default' template"
    )
