"""`moetrt validate`: does an engine compute what the eager model computes, within its precision's tolerances?

    report = validate(checkpoint_dir, engine_dir, prompts_file=None, num_random=4, steps=16, batch=2)
    report.passed                  # the CLI exits 0 / 1 on it

Pieces, Polygraphy-style: `inputs` (prompts, batches, feed dicts), `runners` (the eager runner and the
engine's graph runner), `checks` (one function per check), `tolerances` (the one table), `report`,
`suite` (the two passes that tie them together). See docs/validation.md.
"""

from __future__ import annotations

from pathlib import Path

from moetrt.artifacts import read_manifest
from moetrt.errors import MoetrtError
from moetrt.fsutil import check_writable_file
from moetrt.model.checkpoint import checkpoint_hash, load_model
from moetrt.model.config import MixtralConfig
from moetrt.names import MANIFEST
from moetrt.registry import backend_entry
from moetrt.runtime.engine import load_backend
from moetrt.validate.inputs import check_fits, load_prompts
from moetrt.validate.report import ValidationReport
from moetrt.validate.runners import EngineUnderTest, open_backend_engine
from moetrt.validate.suite import run_suite
from moetrt.validate.tolerances import TOLERANCES

__all__ = ["ValidationReport", "open_engine", "validate", "validate_engine"]


def validate(
    checkpoint_dir: str | Path,
    engine_dir: str | Path,
    prompts_file: str | Path | None = None,
    num_random: int = 4,
    steps: int = 16,
    batch: int = 2,
    json_out: str | Path | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Validate the engine in `engine_dir` against the eager model of `checkpoint_dir`.

    Prompts: the lines of `prompts_file` (tokenized with the checkpoint's tokenizer) followed by
    `num_random` seeded random prompts of unequal lengths, run `batch` at a time; greedy decoding runs
    `steps` tokens. Refuses (MoetrtError, one line) an engine built from another model. Writes the JSON
    report to `json_out` when given.
    """
    checkpoint_dir, engine_dir = Path(checkpoint_dir), Path(engine_dir)
    if json_out is not None:
        check_writable_file(Path(json_out))  # before the run, not after it
    engine = open_engine(engine_dir, checkpoint_dir)
    report = validate_engine(checkpoint_dir, engine, prompts_file, num_random, steps, batch, seed)
    if json_out is not None:
        report.write_json(json_out)
    return report


def validate_engine(
    checkpoint_dir: str | Path,
    engine: EngineUnderTest,
    prompts_file: str | Path | None = None,
    num_random: int = 4,
    steps: int = 16,
    batch: int = 2,
    seed: int = 0,
) -> ValidationReport:
    """`validate` for an already opened engine (tests wrap its backend or runner to inject faults)."""
    model = load_model(checkpoint_dir, dtype=engine.dtype)
    prompts = load_prompts(checkpoint_dir, model.config, prompts_file, num_random, seed)
    check_fits(prompts, steps, engine.max_seq_len)
    results = run_suite(model, engine, prompts, steps, batch, TOLERANCES[engine.precision])
    inputs = {"prompts": len(prompts), "prompts_file": None if prompts_file is None else str(prompts_file),
              "random": num_random, "batch": batch, "steps": steps, "seed": seed}  # fmt: skip
    return ValidationReport(str(checkpoint_dir), engine.name, engine.precision, inputs, results)


def open_engine(engine_dir: Path, checkpoint_dir: Path) -> EngineUnderTest:
    """Open an engine directory for validation, refusing (one line) one built from a model other than the
    checkpoint's config, or from other weights: the engine's manifest records the hash of the checkpoint its
    export was made from (`moetrt.artifacts.lineage`)."""
    config = MixtralConfig.from_pretrained(checkpoint_dir)
    manifest = read_manifest(engine_dir, "engine")
    built_for = MixtralConfig.from_dict(manifest["config"])
    if built_for != config:
        field = next(k for k, v in built_for.to_dict().items() if config.to_dict().get(k) != v)
        raise MoetrtError(
            f"{engine_dir}: engine built from another model ({field} = {getattr(built_for, field)!r} in its "
            f"manifest, {getattr(config, field)!r} in the checkpoint's config.json)"
        )
    recorded, actual = manifest.get("checkpoint"), checkpoint_hash(checkpoint_dir)
    if recorded != actual:
        raise MoetrtError(
            f"{engine_dir}: engine not built from {checkpoint_dir} (its manifest records checkpoint hash "
            f"{str(recorded)[:12]}, this checkpoint's is {actual[:12]}: other weights); validate it against the "
            "checkpoint it was exported from"
        )
    backend_entry(manifest.get("backend"), f"{engine_dir / MANIFEST}: field 'backend'").require()
    load_backend(engine_dir, max_batch=1).close()  # the checks `generate` runs: files, sizes, graph vs manifest
    return open_backend_engine(engine_dir, manifest)
