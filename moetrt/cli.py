"""The `moetrt` command line: it parses arguments and calls one library function per command.

User errors (`MoetrtError`, and click's usage errors: an unknown option, `--max-new-tokens abc`) print as
one `error: ...` line on stderr with exit status 2; tables go to the terminal by default and `--json` prints
one JSON object instead. Paths, prompts and config values are printed literally (never as rich markup).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from moetrt.bench.prepare import bench_backends
from moetrt.errors import MoetrtError
from moetrt.progress import Progress
from moetrt.registry import BACKENDS, DEFAULT_BACKEND, backend_entry
from moetrt.schema import MAX_BATCH, MAX_THREADS

try:  # typer >= 0.24 runs on its own copy of click; older typer on click itself
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions


class _OneLineErrors(typer.core.TyperGroup):
    """click's usage errors as one `error: ...` line with exit status 2 (not click's multi-line usage box)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click_exceptions.NoArgsIsHelpError as err:
            print(err.ctx.get_help(), file=sys.stderr)
            result = 2
        except click_exceptions.UsageError as err:
            print(f"error: {err.format_message()}", file=sys.stderr)
            result = 2
        except typer.Abort:
            print("interrupted", file=sys.stderr)
            result = 130
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


if TYPE_CHECKING:
    from moetrt.validate.report import ValidationReport

app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()
PRECISIONS_HELP = "; ".join(f"{name}: {' | '.join(entry.precisions)}" for name, entry in BACKENDS.items())


def _print_version(value: bool) -> None:
    if value:
        import moetrt

        print(f"moetrt {moetrt.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Graph-compiled deployment of Mixtral-class sparse MoE models."""


def command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register `fn` as a sub-command whose MoetrtErrors become one-line messages."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MoetrtError as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(2) from None

    return app.command()(wrapper)


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A `moetrt.progress.Progress` callback drawn as a transient bar on stderr (text shown literally)."""
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(), TimeElapsedColumn())
    stderr = Console(stderr=True)
    with RichProgress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        task = bar.add_task("", total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total or None)

        yield update


CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def print_literal(text: str, style: str | None = None, end: str = "", out: Console | None = None) -> None:
    """Print user, file or model text as it is: no rich markup, emoji codes or highlighting; control characters
    (which a terminal would act on) are shown as escapes such as \\x1b."""
    text = CONTROL_CHARS.sub(lambda m: repr(m.group())[1:-1], text)
    (out or console).out(text, style=style, highlight=False, end=end)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def key_value_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=Text.from_markup(literal(title)), show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows.items():
        text = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(Text.from_markup(literal(key)), Text.from_markup(literal(text)))
    return table


def literal(value: object) -> str:
    """`value` as markup that prints literally: rich markup escaped, undecodable path bytes backslash-escaped."""
    return escape(str(value).encode("utf-8", "backslashreplace").decode("utf-8"))


def integer(low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    """An integer option's parser: decimal digits with an optional minus sign and nothing else (click would
    take `5_0` as 50 and `2.0` as 2), within [low, high]."""

    def parse(text: Any) -> int | None:
        if text is None or isinstance(text, int):  # a default value
            return text
        if not re.fullmatch(r"-?[0-9]{1,30}", text):
            raise typer.BadParameter(f"{text[:40]!r} is not an integer (decimal digits, at most 30)")
        value = int(text)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise typer.BadParameter(f"{value} is out of range; expected an integer {bounds}")
        return value

    return parse


def number(text: Any) -> float | None:
    """A float option's parser: a decimal number (no `1_0`, `0x1p3`); `inf` and `nan` pass to the library,
    which refuses them with what it needs (e.g. a finite temperature)."""
    if text is None or isinstance(text, float):
        return text
    decimal = r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?"
    if not (re.fullmatch(decimal, text) or re.fullmatch(r"[-+]?(inf|infinity|nan)", text, re.IGNORECASE)):
        raise typer.BadParameter(f"{text[:40]!r} is not a decimal number")
    return float(text)


def text_option(values: list[str] | str | None) -> list[str] | str | None:
    """Refuse text that is not valid Unicode (lone surrogates: bytes that were not UTF-8 on the command line)."""
    for value in [values] if isinstance(values, str) else values or []:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise typer.BadParameter(f"not valid UTF-8 (undecodable byte at character {err.start})") from None
    return values


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@command
def inspect(
    checkpoint_dir: Annotated[Path | None, typer.Argument(help="Hugging Face checkpoint directory")] = None,
    preset: Annotated[
        str | None, typer.Option(help="a built-in config: mixtral-8x7b, mixtral-8x22b, mid, tiny")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Show a model's configuration, parameter counts (total and active per token) and memory needs."""
    from moetrt.inspect import load_config, summary

    if (checkpoint_dir is None) == (preset is None):
        raise MoetrtError("inspect: give exactly one of CHECKPOINT_DIR or --preset NAME")
    config, label = load_config(checkpoint_dir, preset)
    info = summary(config)
    if as_json:
        print_json({"source": label, **info})
        return
    console.print(key_value_table(f"Mixtral config ({label})", info["config"]))
    params = {k: v for k, v in info.items() if k.endswith("_params")}
    params["total (B)"] = f"{info['total_params'] / 1e9:.1f}B"
    params["active per token (B)"] = f"{info['active_params'] / 1e9:.1f}B"
    console.print(key_value_table("Parameters", params))
    memory = {f"weights {k}": human_bytes(v) for k, v in info["weight_bytes"].items()}
    memory.update({f"KV cache per token {k}": human_bytes(v) for k, v in info["kv_cache_bytes_per_token"].items()})
    console.print(key_value_table("Memory", memory))


@command
def export(
    checkpoint_dir: Annotated[Path, typer.Argument(help="Hugging Face checkpoint directory")],
    output: Annotated[Path, typer.Option("--output", "-o", help="export directory to write")],
    max_seq_len: Annotated[
        int | None, typer.Option(help="KV-cache length (default: max_position_embeddings)", parser=integer(1))
    ] = None,
    max_batch: Annotated[
        int, typer.Option(help="largest batch engines are built for", parser=integer(1, MAX_BATCH))
    ] = 1,
    dtype: Annotated[
        str | None, typer.Option(help="fp32 | fp16 | bf16, or float32 | float16 | bfloat16 (default: the checkpoint's)")
    ] = None,
) -> None:
    """Lower a checkpoint to ONNX: one moetrt::TopKMoE node per layer, static KV-cache I/O, external weights."""
    from moetrt.export import export_checkpoint

    with progress_bar() as progress:
        notice = lambda line: console.print(Text(line))  # noqa: E731
        path = export_checkpoint(checkpoint_dir, output, max_seq_len, max_batch, dtype, progress, notice=notice)
    console.print(Text.assemble("export written to ", (str(path), "bold")))


@command
def build(
    export_dir: Annotated[Path, typer.Argument(help="directory written by `moetrt export`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="engine directory to write")],
    backend: Annotated[str, typer.Option(help=f"{' | '.join(BACKENDS)}")] = DEFAULT_BACKEND,
    precision: Annotated[str | None, typer.Option(help=PRECISIONS_HELP)] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="ort: serving threads; fp32 experts are sliced for them (default: all CPUs)",
            parser=integer(1, MAX_THREADS),
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="ort: cpu | cuda (needs onnxruntime-gpu)")] = None,
) -> None:
    """Build an ONNX Runtime or TensorRT engine from an export."""
    with progress_bar() as progress:
        path = backend_entry(backend, "--backend").build(export_dir, output, precision, threads, device, progress)
    console.print(Text.assemble(f"{backend} engine written to ", (str(path), "bold")))


@command
def generate(
    engine_dir: Annotated[Path, typer.Argument(help="engine directory (or a checkpoint directory: eager)")],
    prompt: Annotated[
        list[str] | None, typer.Option(help="prompt text; repeat for a batch", callback=text_option)
    ] = None,
    chat: Annotated[
        str | None,
        typer.Option(help="a user message, rendered with the model's chat template", callback=text_option),
    ] = None,
    system: Annotated[str | None, typer.Option(help="a system message before --chat", callback=text_option)] = None,
    messages: Annotated[
        Path | None, typer.Option(help='a JSON file of chat messages: [{"role": "user", "content": "..."}, ...]')
    ] = None,
    token_ids: Annotated[list[str] | None, typer.Option(help="comma-separated ids; repeat for a batch")] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(help="tokens to generate per row (default: generation_config.json's, else 64)", parser=integer(1)),
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="0 = greedy (default: generation_config.json's; greedy unless do_sample)", parser=number),
    ] = None,
    top_k: Annotated[
        int | None, typer.Option(help="0 = no top-k filter (default: generation_config.json's)", parser=integer(0))
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(help="1 = no nucleus filter (default: generation_config.json's)", parser=number)
    ] = None,
    seed: Annotated[int, typer.Option(help="sampling seed", parser=integer(0))] = 0,
    stop: Annotated[
        list[str] | None,
        typer.Option(help="stop before this text (repeatable); it is not printed", callback=text_option),
    ] = None,
    bos: Annotated[
        bool | None, typer.Option("--bos/--no-bos", help="add BOS to --prompt (default: tokenizer_config.json's)")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="directory with the tokenizer files (default: the engine's, from its checkpoint)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of streaming")] = False,
    verify: Annotated[bool, typer.Option(help="check the engine files' sha256 digests before loading")] = False,
) -> None:
    """Generate from a prompt or a chat message, streaming the text, then print prefill ms and decode tokens/s.

    Stops at the model's end-of-sequence ids (generation_config.json), after --max-new-tokens, or before a
    --stop text. Text typed in a prompt such as "</s>" is read as that special token, as transformers does."""
    from moetrt.runtime.textgen import run_generate

    stream_one = not as_json and len(prompt or []) + len(token_ids or []) <= 1
    result = run_generate(
        engine_dir, prompts=prompt or [], token_ids=token_ids or [], chat=chat, system=system, messages_file=messages,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        tokenizer_dir=tokenizer, add_bos=bos, stop=stop or [], verify=verify,
        on_prompt=(lambda text: print_literal(text, style="dim")) if stream_one else None,
        on_text=print_literal if stream_one else None,
    )  # fmt: skip
    if as_json:
        print_json(result)
        return
    if not stream_one or result["text"] is None:
        batch = isinstance(result["token_ids"][0], list)
        tokens = result["token_ids"] if batch else [result["token_ids"]]
        texts = result["text"] if batch else [result["text"]]
        for i, row in enumerate(tokens):
            print_literal(f"[{i}] " + (texts[i] if texts[0] is not None else ",".join(map(str, row))), end="\n")
    console.print(
        f"\n[dim]prefill {result['prefill_ms']:.1f} ms, first token {result['ttft_ms']:.1f} ms, "
        f"decode {result['decode_tokens_per_s']:.1f} tokens/s ({result['backend']})[/dim]"
    )


@command
def verify(
    artifact_dir: Annotated[Path, typer.Argument(help="engine (or export) directory")],
) -> None:
    """Check every file of an engine or export against the size and sha256 its manifest recorded when written."""
    from moetrt.artifacts import verify_artifact

    records = verify_artifact(artifact_dir, kind=None)
    total = sum(record["size"] for record in records.values())
    console.print(f"{literal(artifact_dir)}: {len(records)} files, {total:,} bytes match their sha256 digests")


@command
def demo() -> None:
    """The whole pipeline on a small built-in model: checkpoint, export, engine, streamed generation, validation."""
    from moetrt.demo import run_demo

    if not run_demo(console):
        raise typer.Exit(1)


@command
def bench(
    checkpoint_dir: Annotated[Path | None, typer.Argument(help="Hugging Face checkpoint directory")] = None,
    preset: Annotated[str | None, typer.Option(help="benchmark a seeded checkpoint of this preset (cached)")] = None,
    backends: Annotated[str, typer.Option(help=f"comma-separated: {', '.join(bench_backends())}")] = (
        "eager,ort-fp32,ort-int8,ort-int4"
    ),
    prompt_len: Annotated[int, typer.Option(help="prompt tokens per row", parser=integer(1))] = 128,
    new_tokens: Annotated[int, typer.Option(help="tokens generated per row", parser=integer(1))] = 128,
    batch: Annotated[int, typer.Option(help="rows per batch", parser=integer(1, MAX_BATCH))] = 1,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: physical cores)", parser=integer(1, MAX_THREADS))
    ] = None,
    rounds: Annotated[int, typer.Option(help="interleaved rounds; figures are medians", parser=integer(1))] = 1,
    workdir: Annotated[Path | None, typer.Option(help="where exports and engines go (default: in the cache)")] = None,
    reuse: Annotated[bool, typer.Option(help="keep artifacts in --workdir made from the same parent")] = False,
    as_json: Annotated[Path | None, typer.Option("--json", help="write the rows as a JSON list")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG bar chart (needs matplotlib)")] = None,
    max_seq_len: Annotated[
        int | None,
        typer.Option(
            help="KV capacity of the engines (default: the model's max_position_embeddings, as `moetrt export`)"
        ),
    ] = None,
    contexts: Annotated[
        str | None,
        typer.Option(help="context sweep, e.g. 256,1024,2048,4000: prompt = context - new tokens, per context"),
    ] = None,
) -> None:
    """Measure each backend in its own process (prefill, first token, decode tokens/s, peak memory) vs eager."""
    from moetrt.bench.run import run_bench

    rows, title = run_bench(
        checkpoint_dir, preset, backends, prompt_len, new_tokens, batch, threads, rounds, workdir, reuse, as_json,
        plot, say=lambda line: console.print(Text(line)), max_seq_len=max_seq_len, contexts=contexts,
    )  # fmt: skip
    # Piped output (logs, CI) gets a fixed width: rich would otherwise squeeze the 12 columns into 80.
    console.print(bench_table(rows, title), width=None if console.is_terminal else 170)


def bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The benchmark rows (moetrt.bench.report.COLUMNS) as a table; the title is printed literally."""
    from moetrt.bench.report import COLUMNS

    out = Table(title=Text(title))
    for name, _ in COLUMNS:
        out.add_column(name, justify="left" if name == "backend" else "right", no_wrap=True)
    for row in rows:
        out.add_row(*(cell(row) for _, cell in COLUMNS))
    return out


@command
def validate(
    checkpoint_dir: Annotated[Path, typer.Argument(help="the Hugging Face checkpoint the engine was made from")],
    engine_dir: Annotated[Path, typer.Argument(help="engine directory written by `moetrt build`")],
    prompts: Annotated[Path | None, typer.Option(help="a text file, one prompt per line")] = None,
    num_random: Annotated[int, typer.Option(help="seeded random prompts to add", parser=integer(0))] = 4,
    steps: Annotated[int, typer.Option(help="greedy decode steps compared", parser=integer(1))] = 16,
    batch: Annotated[int, typer.Option(help="prompts run together", parser=integer(1, MAX_BATCH))] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full report as JSON")] = None,
) -> None:
    """Check an engine against the eager reference: logits, per-layer states, routing, greedy tokens, KV cache.

    Exits 0 when every check is within its precision's tolerance, 1 when one is not."""
    from moetrt.validate import validate as run_validation

    report = run_validation(checkpoint_dir, engine_dir, prompts, num_random, steps, batch, json_out)
    print_validation(report, console)
    if not report.passed:
        raise typer.Exit(1)


@command
def routes(
    engine_dir: Annotated[Path, typer.Argument(help="engine directory (or a checkpoint directory: eager)")],
    prompts: Annotated[Path | None, typer.Option(help="a text file, one prompt per line")] = None,
    text_file: Annotated[Path | None, typer.Option(help="a text file routed as consecutive 256-token prompts")] = None,
    num_random: Annotated[int, typer.Option(help="seeded random prompts")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens generated (and routed) per prompt")] = 32,
    compare: Annotated[
        Path | None, typer.Option("--compare", help="a second engine (or checkpoint) replaying the same tokens")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: the engine's)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the random prompts")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report as JSON")] = None,
    plot: Annotated[Path | None, typer.Option(help="write a layer x expert share heatmap (PNG)")] = None,
) -> None:
    """Expert load per layer (shares, balancedness, entropy, co-selected pairs, consecutive-token repetition) over
    prompt and generated tokens; with --compare, per-layer agreement with a second engine on the same tokens."""
    from moetrt.routes.run import run_routes

    with console.status("routing", spinner="dots") as status:
        report = run_routes(
            engine_dir, prompts_file=prompts, text_file=text_file, num_random=num_random,
            max_new_tokens=max_new_tokens, compare_with=compare, threads=threads, seed=seed, json_out=json_out,
            plot_out=plot, progress=lambda text: status.update(Text(text)),
        )  # fmt: skip
    print_routes(report)


def print_routes(report: Any) -> None:
    """The `moetrt routes` tables: one per part (prompt, generated), then the comparison."""
    for part, layers in report.layers.items():
        if not layers[0].tokens:
            continue
        table = Table(title=Text(f"{part} tokens: {report.engine} ({report.backend}, top-{report.top_k})"))
        for column in ("layer", "tokens", "balance", "entropy", "hottest", "coldest", "top pair", "same 1st",
                       "same any"):  # fmt: skip
            table.add_column(column, justify="right")
        for i, s in enumerate(layers):
            order = sorted(range(report.num_experts), key=lambda e: -s.shares[e])
            pair = f"{s.top_pairs[0][0]}+{s.top_pairs[0][1]} {s.top_pairs[0][2]:.0%}" if s.top_pairs else "-"
            table.add_row(
                str(i), str(s.tokens), f"{s.balancedness:.2f}", f"{s.entropy_bits:.2f} b",
                f"{order[0]} {s.shares[order[0]]:.0%}", f"{order[-1]} {s.shares[order[-1]]:.0%}", pair,
                f"{s.same_first:.0%} ({s.same_first_chance_load:.0%})",
                f"{s.same_any:.0%} ({s.same_any_chance_load:.0%})",
            )  # fmt: skip
        console.print(table)
    console.print(
        Text("balance = mean/max tokens per expert; entropy in bits (max log2 E); same 1st / same any: consecutive "
             "tokens sharing the first choice / any expert (chance given the load in brackets)", style="dim")
    )  # fmt: skip
    if report.compare is not None:
        c = report.compare
        table = Table(title=Text(f"vs {c.engine} ({c.backend}) on the same tokens"))
        for column in ("layer", "same expert set", "same 1st", "largest share change"):
            table.add_column(column, justify="right")
        for i, layer in enumerate(c.layers):
            e = max(range(report.num_experts), key=lambda j: abs(layer.share_delta[j]))
            table.add_row(str(i), f"{layer.set_agreement:.1%}", f"{layer.first_agreement:.1%}",
                          f"expert {e} {layer.share_delta[e]:+.1%}")  # fmt: skip
        console.print(table)
        verdict = "no layer" if c.diverging_layer is None else f"layer {c.diverging_layer}"
        console.print(Text(f"first layer below {c.threshold:.0%} expert-set agreement: {verdict}"))


@command
def serve(
    engine_dir: Annotated[Path, typer.Argument(help="engine directory (or a checkpoint directory: eager)")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    slots: Annotated[
        int | None, typer.Option(help="KV slots = requests decoded together (default: the engine's max batch)")
    ] = None,
    max_queue: Annotated[int, typer.Option(help="requests waiting for a slot before 429s")] = 64,
    api_key: Annotated[str | None, typer.Option(help="require 'Authorization: Bearer KEY' on /v1")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="model id in the API (default: the dir name)")] = None,
    threads: Annotated[int | None, typer.Option(help="engine CPU threads (default: the engine's)")] = None,
    expert_metrics: Annotated[bool, typer.Option(help="per-layer expert load on /metrics")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="serve engine replicas on a Ray Serve cluster")] = False,
    replicas: Annotated[int | None, typer.Option(help="--ray: engine replicas (default 1)")] = None,
    autoscale: Annotated[str | None, typer.Option(help="--ray: MIN:MAX replicas, scaled by load")] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="--ray: the cluster to join (`ray start --head` prints it; default: a new one)")
    ] = None,
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, streaming) with continuous batching."""

    def report(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    if ray:
        if expert_metrics:
            raise MoetrtError("--expert-metrics is not available with --ray")
        from moetrt.serve.ray_serve import RayOptions, serve_on_ray

        options = RayOptions(
            replicas=1 if replicas is None else replicas, autoscale=parse_min_max(autoscale, replicas), slots=slots,
            threads=threads, max_queue=max_queue, api_key=api_key, served_model_name=served_model_name,
        )  # fmt: skip
        serve_on_ray(engine_dir, host=host, port=port, options=options, ray_address=ray_address, progress=report)
        return
    if replicas is not None or autoscale is not None or ray_address is not None:
        raise MoetrtError("--replicas, --autoscale and --ray-address need --ray")
    from moetrt.serve.server import serve as run_server

    run_server(
        engine_dir, host=host, port=port, slots=slots, max_queue=max_queue, api_key=api_key,
        served_model_name=served_model_name, threads=threads, expert_metrics=expert_metrics, progress=report,
    )  # fmt: skip


def parse_min_max(autoscale: str | None, replicas: int | None) -> tuple[int, int] | None:
    """--autoscale MIN:MAX as two integers (not together with --replicas)."""
    if autoscale is None:
        return None
    if replicas is not None:
        raise MoetrtError("--replicas and --autoscale exclude each other")
    low, sep, high = autoscale.partition(":")
    if not (sep and low.strip().isdigit() and high.strip().isdigit()):
        raise MoetrtError(f"--autoscale: expected MIN:MAX (two integers), found {autoscale!r}")
    return int(low), int(high)


def _tolerance(tolerance: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in tolerance.items())


def print_validation(report: ValidationReport, console: Console) -> None:
    """The checks as a table, a per-layer table when a layer failed, and the verdict line."""
    table = Table(title=Text(f"moetrt validate: {report.engine} ({report.precision}) vs eager {report.checkpoint}"))
    for column in ("check", "result", "figures", "tolerance", "layer"):
        table.add_column(column, overflow="fold")
    for c in report.checks:
        result = "[green]PASS[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name, result, Text(c.summary), _tolerance(c.tolerance), "" if c.layer is None else str(c.layer))
    console.print(table)
    layers = next(c for c in report.checks if c.name == "layers")
    if not report.passed:
        console.print(_layer_table(report, len(layers.figures)))
    console.print(Text(report.verdict(), style=f"bold {'green' if report.passed else 'red'}"))


def _layer_table(report: ValidationReport, num_layers: int) -> Table:
    """Per layer, the relative errors of every layer-wise figure: where the divergence starts and grows."""
    by_name = {c.name: c for c in report.checks}
    layers, routing, kv = by_name["layers"], by_name["routing"], by_name["kv_cache"]
    table = Table(title="per layer (relative errors; routing: clear flips / tokens)")
    values = list(layers.figures["0"])
    for column in ("layer", *values, "routing", "kv k", "kv v"):
        table.add_column(column, justify="right")
    for i in range(num_layers):
        row = layers.figures[str(i)]
        cells = [_rel(row[v]) for v in values]
        r = routing.figures[str(i)]
        kv_row = kv.figures[str(i)]
        table.add_row(str(i), *cells, f"{r['clear_flips']}/{r['tokens']}", _rel(kv_row["k"]), _rel(kv_row["v"]))
    return table


def _rel(error: dict[str, Any]) -> str:
    text = "n/a" if error["rel"] is None else f"{error['rel']:.2g}"
    return text if error["passed"] else f"[red]{text}[/]"


def main() -> None:
    from moetrt.fsutil import exit_on_interrupt

    exit_on_interrupt(lambda: print("interrupted", file=sys.stderr))  # Ctrl-C: exit 130, no half-written output
    app()
