"""Text in, text out: what `moetrt generate` does around the generation loop.

One request is plain prompts (`--prompt`, BOS per the checkpoint unless `add_bos` overrides), a chat (`--chat`
with an optional `--system`, or a messages JSON file; rendered with the checkpoint's chat template), or
explicit token ids. Generation stops at the checkpoint's stop ids (generation_config.json, else config.json),
after max_new_tokens (given, else generation_config.json's, else 64), or at a stop string. Each row's text is
`decode(prompt + new)[len(decode(prompt)):]` cut before the first stop string; a single row is streamed
through `on_text` as it is produced. Nothing here prints.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moetrt.artifacts import open_artifact
from moetrt.errors import MoetrtError
from moetrt.model.chat_template import check_messages
from moetrt.runtime.engine import open_backend
from moetrt.runtime.generate import stream
from moetrt.runtime.generation_config import GenerationDefaults
from moetrt.runtime.stops import StopMatcher
from moetrt.runtime.text_model import TextModel, load_tokenizer

DEFAULT_MAX_NEW_TOKENS = 64

_TOKEN_IDS = re.compile(r"\s*[0-9]+(\s*,\s*[0-9]+)*\s*,?\s*")


def parse_token_ids(rows: list[str]) -> list[list[int]]:
    """'1,2,3' (spaces around commas allowed) per row -> [[1, 2, 3]]; anything else ('5 6', '5_0', '-1', digits
    of other scripts) is a one-line error: ids are never glued together or read in another notation."""
    parsed = []
    for row in rows:
        if not _TOKEN_IDS.fullmatch(row) or len(row) > 10_000_000:
            raise MoetrtError(f"--token-ids {row[:80]!r}: expected comma-separated integers such as 1,2,3")
        parsed.append([int(tok) for tok in row.split(",") if tok.strip()])
    return parsed


def chat_messages(
    chat: str | None, system: str | None, messages_file: str | Path | None
) -> list[dict[str, str]] | None:
    """The conversation of a request: [system?, user] from `--chat`/`--system`, or a JSON file holding a list
    of {"role", "content"} objects (or {"messages": [...]}, the OpenAI request shape). None when neither."""
    if messages_file is not None:
        if chat is not None or system is not None:
            raise MoetrtError("generate: give --messages FILE or --chat TEXT [--system TEXT], not both")
        path = Path(messages_file)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoetrtError(f"{path}: not found; expected a JSON list of chat messages") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MoetrtError(f"{path}: not valid JSON ({err})") from None
        messages = data.get("messages") if isinstance(data, dict) else data
        try:
            check_messages(messages)
        except MoetrtError as err:
            raise MoetrtError(f"{path}: {err}") from None
        return messages
    if chat is None:
        if system is not None:
            raise MoetrtError("generate: --system needs --chat TEXT")
        return None
    return ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": chat}]


def run_generate(
    engine_dir: str | Path,
    prompts: Sequence[str] = (),
    token_ids: Sequence[str] = (),
    chat: str | None = None,
    system: str | None = None,
    messages_file: str | Path | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    add_bos: bool | None = None,
    stop: Sequence[str] = (),
    on_prompt: Callable[[str], None] | None = None,
    on_text: Callable[[str], None] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Generate for each prompt (or the chat of `chat_messages(chat, system, messages_file)`, or token-id rows)
    and return one JSON-ready result.

    Sampling parameters left None come from the checkpoint's generation_config.json (greedy unless it says
    do_sample). With one text row, `on_prompt` gets its prompt text (a chat as its template rendered it) before
    generation starts and `on_text` its new text piece by piece as it is produced (never a split character,
    never any part of a stop string). verify: check the engine's file digests first. Raises MoetrtError
    (one line)."""
    messages = chat_messages(chat, system, messages_file)
    given = [name for name, value in (("--prompt", prompts), ("--token-ids", token_ids), ("a chat", messages)) if value]
    if len(given) != 1:
        raise MoetrtError("generate: give one of --prompt TEXT, --token-ids 1,2,3 (either may repeat for a batch), "
                          "--chat TEXT or --messages FILE")  # fmt: skip
    artifact = open_artifact(engine_dir)
    text_dir = Path(tokenizer_dir) if tokenizer_dir is not None else artifact.path
    tokenizer = load_tokenizer(text_dir, required=bool(tokenizer_dir or prompts or messages or stop))
    generation = GenerationDefaults.from_dir(text_dir, artifact.config)
    sampling = generation.sampling(temperature, top_k, top_p)
    max_new_tokens = max_new_tokens or generation.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if messages:
        texts, rows = [tokenizer.render_chat(messages)], [tokenizer.encode_chat(messages)]
    elif prompts:
        texts = list(prompts)
        rows = [tokenizer.encode(text, add_bos=add_bos) for text in prompts]
    else:
        texts, rows = [], parse_token_ids(list(token_ids))
    if on_prompt and len(texts) == 1:
        on_prompt(texts[0])
    matchers = [StopMatcher(stop) for _ in rows]
    options: dict[str, Any] = {}
    if artifact.kind == "checkpoint":  # size the eager KV cache for this request, not max_position_embeddings
        options = {"max_batch": len(rows), "max_seq_len": max(map(len, rows)) + max_new_tokens}
    with TextModel(artifact, open_backend(artifact, verify=verify, **options), tokenizer, generation) as model:
        run = stream(model.backend, rows, max_new_tokens, sampling, stop_token_ids=model.stop_token_ids, seed=seed)
        detokenizers = [model.detokenizer(row) for row in rows] if tokenizer else []
        pieces: list[list[str]] = [[] for _ in rows]
        for event in run:
            for row, detok in enumerate(detokenizers):
                token = event.tokens[row]
                if token is None or matchers[row].matched is not None:
                    continue
                piece = matchers[row].push(detok.push(token))
                if matchers[row].matched is not None:
                    run.stop(row)
                pieces[row].append(piece)
                if on_text and piece and len(rows) == 1:
                    on_text(piece)
        result = run.result()
        backend_name = model.backend.name
    for row, matcher in enumerate(matchers[: len(detokenizers)]):
        tail = matcher.flush()
        pieces[row].append(tail)
        if on_text and tail and len(rows) == 1:
            on_text(tail)
    outputs = ["".join(p) for p in pieces] if tokenizer else None
    batch = len(rows) > 1
    return {
        "backend": backend_name,
        "prompt_token_ids": rows if batch else rows[0],
        "token_ids": result.tokens if batch else result.tokens[0],
        "text": (outputs if batch else outputs[0]) if outputs else None,
        "finish_reasons": [
            "stop" if matcher.matched is not None else reason
            for matcher, reason in zip(matchers, result.finish_reasons, strict=True)
        ],
        "sampling": {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p},
        "stop_token_ids": sorted(generation.stop_token_ids),
        "prefill_ms": result.prefill_ms,
        "ttft_ms": result.ttft_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s,
    }
