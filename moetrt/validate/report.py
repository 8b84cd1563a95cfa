"""The validation report: a rich table for people, JSON with every figure for machines, a one-line verdict.

The JSON's top level is `passed` (bool), `verdict`, `first_failure` ({check, layer} or null), what was
compared (`checkpoint`, `engine`, `precision`, `inputs`) and `checks`: one entry per check with its
figures, its tolerance, its pass/fail and, for per-layer checks, `first_failing_layer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from moetrt.validate.checks import CheckResult


@dataclass
class ValidationReport:
    checkpoint: str
    engine: str
    precision: str
    inputs: dict[str, Any]  # prompts, batch, steps, seed
    checks: list[CheckResult]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def first_failure(self) -> CheckResult | None:
        """The first failing check in report order; with layers, the one naming the earliest layer."""
        failed = [c for c in self.checks if not c.passed]
        with_layer = [c for c in failed if c.layer is not None]
        if with_layer:
            return min(with_layer, key=lambda c: c.layer)
        return failed[0] if failed else None

    def verdict(self) -> str:
        n = self.inputs["prompts"]
        if self.passed:
            return (f"PASS: {self.engine} ({self.precision}) agrees with eager within {self.precision} tolerances "
                    f"on {n} prompts ({len(self.checks)} checks)")  # fmt: skip
        failed = ", ".join(c.name for c in self.checks if not c.passed)
        first = self.first_failure
        assert first is not None
        return f"FAIL ({failed}): {first.name}: {first.summary}"

    def to_dict(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "passed": self.passed,
            "verdict": self.verdict(),
            "first_failure": None if first is None else {"check": first.name, "layer": first.layer},
            "checkpoint": self.checkpoint,
            "engine": self.engine,
            "precision": self.precision,
            "inputs": self.inputs,
            "checks": [c.to_dict() for c in self.checks],
        }

    def write_json(self, path: str | Path) -> None:
        """Write the JSON report, atomically (a temporary sibling renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False, default=_json_number) + "\n")
        tmp.replace(path)


def _json_number(value: Any) -> Any:
    """numpy scalars to Python numbers (json cannot serialise them)."""
    return value.item()


def _tolerance(tolerance: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in tolerance.items())


def render(report: ValidationReport, console: Console) -> None:
    """The checks as a table, a per-layer table when a layer failed, and the verdict line."""
    table = Table(title=Text(f"moetrt validate: {report.engine} ({report.precision}) vs eager {report.checkpoint}"))
    for column in ("check", "result", "figures", "tolerance", "layer"):
        table.add_column(column, overflow="fold")
    for c in report.checks:
        result = "[green]PASS[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(c.name, result, c.summary, _tolerance(c.tolerance), "" if c.layer is None else str(c.layer))
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
