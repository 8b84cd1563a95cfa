"""How long-running library work (export, engine builds, benchmarks) reports progress without printing.

A `Progress` callback receives (what, done, total): `what` says what is being worked on, `done` and `total`
count its units (bytes for weights); total 0 means a step of unknown length (e.g. tracing). The library
never prints; the CLI and the demo turn these calls into progress bars (rich), and a caller that passes
nothing gets silence.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]


def silent(what: str, done: int, total: int) -> None:
    """The default `Progress`: reports nothing."""
