"""`moetrt routes`: route prompts through an engine (or a checkpoint, eagerly), summarize the expert load, and
optionally replay the same tokens through a second engine to compare their routing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from moetrt.artifacts import manifest_config, read_manifest
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.model.tokenizer import Tokenizer
from moetrt.names import MANIFEST
from moetrt.routes.plot import plot
from moetrt.routes.report import DIVERGENCE, RoutesReport, compare, summarize
from moetrt.routes.trace import RoutedSequence, routing_outputs, trace_sequence
from moetrt.runtime.backend import Backend
from moetrt.runtime.engine import load_backend
from moetrt.validate.inputs import Prompt, load_prompts

TEXT_CHUNK = 256  # --text-file is cut into prompts of at most this many tokens


def run_routes(
    engine: str | Path,
    prompts_file: str | Path | None = None,
    text_file: str | Path | None = None,
    num_random: int = 0,
    max_new_tokens: int = 32,
    compare_with: str | Path | None = None,
    threads: int | None = None,
    seed: int = 0,
    threshold: float = DIVERGENCE,
    json_out: str | Path | None = None,
    plot_out: str | Path | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> RoutesReport:
    """Route the prompts of exactly one source (a prompts file, one per line; a text file, cut into
    TEXT_CHUNK-token prompts; or `num_random` seeded random prompts) through `engine` with greedy decoding of
    `max_new_tokens` tokens each, and, with `compare_with`, the same tokens through that engine. The report
    is also written as JSON to `json_out` and drawn as a PNG heatmap to `plot_out` when given."""
    engine = Path(engine)
    if sum(x is not None for x in (prompts_file, text_file)) + (num_random > 0) != 1:
        raise MoetrtError("routes: give exactly one of --prompts FILE, --text-file FILE or --num-random N")
    if max_new_tokens < 0:
        raise MoetrtError(f"max_new_tokens: expected a non-negative integer, found {max_new_tokens}")
    config = _config(engine)
    other = None if compare_with is None else Path(compare_with)
    other_config = None if other is None else _config(other)
    if other_config is not None and _routing_shape(other_config) != _routing_shape(config):
        raise MoetrtError(f"--compare {other}: a model with other layers, experts or top-k than {engine}")
    prompts = _prompts(engine, config, prompts_file, text_file, num_random, seed)
    length = max(len(p.ids) for p in prompts) + max_new_tokens
    with _open(engine, config, length, threads) as backend:
        sequences = _trace(backend, prompts, None, max_new_tokens, progress)
        report = summarize(str(engine), backend.name, config.num_local_experts, sequences)
    if other is not None and other_config is not None:
        with _open(other, other_config, length, threads) as backend:
            replayed = _trace(backend, prompts, sequences, max_new_tokens, progress)
            comparison = compare(str(other), backend.name, sequences, replayed, config.num_local_experts, threshold)
        report = dataclasses.replace(report, compare=comparison)
    if json_out is not None:
        report.write_json(json_out)
    if plot_out is not None:
        plot(report, plot_out)
    return report


def _routing_shape(config: MixtralConfig) -> tuple[int, int, int]:
    return config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok


def _trace(
    backend: Backend,
    prompts: list[Prompt],
    forced: list[RoutedSequence] | None,
    max_new_tokens: int,
    progress: Callable[[str], None],
) -> list[RoutedSequence]:
    """Each prompt through `backend`: greedy, or replaying `forced`'s generated tokens."""
    out = []
    for i, prompt in enumerate(prompts):
        progress(f"{backend.name}: {prompt.label} ({i + 1}/{len(prompts)})")
        tokens = None if forced is None else forced[i].generated
        stops = backend.config.eos_token_ids
        out.append(trace_sequence(backend, prompt.label, prompt.ids, max_new_tokens, stops, forced=tokens))
    return out


def _config(path: Path) -> MixtralConfig:
    if not path.is_dir():
        raise MoetrtError(f"{path}: not a directory; expected an engine directory or a Hugging Face checkpoint")
    if (path / MANIFEST).is_file():
        return manifest_config(read_manifest(path, "engine"))
    return MixtralConfig.from_pretrained(path)


def _open(path: Path, config: MixtralConfig, length: int, threads: int | None) -> Backend:
    """The backend with the routing outputs, one cache slot; a checkpoint's caches sized for `length` tokens."""
    fixed = {} if (path / MANIFEST).is_file() else {"max_seq_len": length}
    return load_backend(path, max_batch=1, threads=threads, extra_outputs=routing_outputs(config.num_hidden_layers),
                        **fixed)  # fmt: skip


def _prompts(
    engine: Path,
    config: MixtralConfig,
    prompts_file: str | Path | None,
    text_file: str | Path | None,
    num_random: int,
    seed: int,
) -> list[Prompt]:
    if text_file is None:
        return load_prompts(engine, config, prompts_file, num_random, seed)
    path = Path(text_file)
    if not path.is_file():
        raise MoetrtError(f"{path}: text file not found")
    ids = Tokenizer.from_dir(engine, bos_token_id=config.bos_token_id).encode(path.read_text(), add_bos=False)
    if not ids:
        raise MoetrtError(f"{path}: no text to route")
    bos = [] if config.bos_token_id is None else [config.bos_token_id]
    step = TEXT_CHUNK - len(bos)
    return [Prompt(f"text tokens {i}-{i + len(ids[i : i + step]) - 1}", bos + ids[i : i + step])
            for i in range(0, len(ids), step)]  # fmt: skip
