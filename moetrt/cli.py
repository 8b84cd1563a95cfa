"""The `moetrt` command line: it parses arguments and calls one library function per command.

User errors (`MoetrtError`) print as one `error: ...` line on stderr with exit status 2; tables go to the
terminal by default and `--json` prints one JSON object instead.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from moetrt.errors import MoetrtError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
console = Console()


@app.callback()
def _root() -> None:
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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def key_value_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    return table


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


def main() -> None:
    app()
