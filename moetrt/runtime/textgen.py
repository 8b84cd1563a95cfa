"""Text in, text out: what `moetrt generate` does around the generation loop.

Resolves prompts (text through the artifact's tokenizer.json, or explicit token ids), opens the backend,
streams decoded text for a single prompt, and returns one JSON-ready result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from moetrt.artifacts import manifest_config, read_manifest
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.model.tokenizer import Tokenizer
from moetrt.names import MANIFEST, TOKENIZER
from moetrt.runtime.engine import load_backend
from moetrt.runtime.generate import stream
from moetrt.runtime.sampling import SamplingParams


def parse_token_ids(rows: list[str]) -> list[list[int]]:
    """'1,2,3' per row -> [[1, 2, 3]]; a malformed id is a one-line error naming it."""
    parsed = []
    for row in rows:
        try:
            parsed.append([int(tok) for tok in row.replace(" ", "").split(",") if tok])
        except ValueError:
            raise MoetrtError(f"--token-ids {row!r}: expected comma-separated integers such as 1,2,3") from None
    return parsed


def run_generate(
    engine_dir: str | Path,
    prompts: list[str],
    token_ids: list[str],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    stream_to: Console | None = None,
) -> dict[str, Any]:
    """Generate for each prompt; with `stream_to` and a single text prompt, print text as it is produced."""
    engine_dir = Path(engine_dir)
    if bool(prompts) == bool(token_ids):
        raise MoetrtError("generate: give --prompt TEXT or --token-ids 1,2,3 (either may repeat for a batch)")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    is_checkpoint = not (engine_dir / MANIFEST).is_file()
    config = (
        MixtralConfig.from_pretrained(engine_dir)
        if is_checkpoint
        else manifest_config(read_manifest(engine_dir, "engine"))
    )
    tokenizer = _tokenizer(Path(tokenizer_dir or engine_dir), config.bos_token_id, required=bool(prompts))
    rows = [tokenizer.encode(text) for text in prompts] if prompts else parse_token_ids(token_ids)
    options = {"max_batch": len(rows), "max_seq_len": max(map(len, rows)) + max_new_tokens} if is_checkpoint else {}
    backend = load_backend(engine_dir, **options)
    try:
        run = stream(backend, rows, max_new_tokens, sampling, seed=seed)
        decoder = tokenizer.stream() if tokenizer and stream_to and len(rows) == 1 else None
        if decoder and prompts:
            stream_to.print(prompts[0], end="", style="dim", highlight=False)
        for event in run:
            if decoder and event.tokens[0] is not None:
                stream_to.print(decoder.push(event.tokens[0]), end="", highlight=False, markup=False)
        result = run.result()
    finally:
        backend.close()
    texts = [tokenizer.decode(tokens) for tokens in result.tokens] if tokenizer else None
    if stream_to and not decoder:
        for i, tokens in enumerate(result.tokens):
            stream_to.print(f"[{i}] " + (texts[i] if texts else ",".join(map(str, tokens))), highlight=False)
    batch = len(rows) > 1
    return {
        "backend": backend.name,
        "prompt_token_ids": rows if batch else rows[0],
        "token_ids": result.tokens if batch else result.tokens[0],
        "text": (texts if batch else texts[0]) if texts else None,
        "finish_reasons": result.finish_reasons,
        "prefill_ms": result.prefill_ms,
        "ttft_ms": result.ttft_ms,
        "decode_tokens_per_s": result.decode_tokens_per_s,
    }


def _tokenizer(directory: Path, bos_token_id: int | None, required: bool) -> Tokenizer | None:
    """The artifact's tokenizer; optional when the user gave token ids (the output is then ids too)."""
    if not (directory / TOKENIZER).is_file() and not required:
        return None
    return Tokenizer.from_dir(directory, bos_token_id=bos_token_id)
