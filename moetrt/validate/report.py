"""The validation report: every figure for people (the CLI draws it as tables) and machines (JSON), and a
one-line verdict.

The JSON's top level is `passed` (bool), `verdict`, `first_failure` ({check, layer} or null), what was
compared (`checkpoint`, `engine`, `precision`, `inputs`) and `checks`: one entry per check with its
figures, its tolerance, its pass/fail and, for per-layer checks, `first_failing_layer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
