"""The `moetrt.json` manifest every artifact directory carries (exports, engines).

It says what the directory holds and what it was made from, so each stage can refuse, with one line,
an artifact it cannot use: another kind, another moetrt or op-contract version, a corrupt file.

    kind              "export" | "engine"
    moetrt_version    moetrt.__version__ of the writer
    contract_version  moetrt.plugins.contract.CONTRACT_VERSION (the TopKMoE op contract)
    created_at        UTC, ISO 8601
    config            MixtralConfig.to_dict()
    dtype             the graph's / engine's dtype or precision
    max_seq_len, max_batch
    io                {"inputs": {name: {"shape": [...], "dtype": ...}}, "outputs": {...}}; symbolic dims
                      are strings ("batch", "seq")
    parent            hash of what it was made from (`checkpoint_hash` for exports, `artifact_hash` of the
                      export for engines)
    checkpoint        engines: the `checkpoint_hash` their export was made from (`lineage`), so validation can
                      tell, without the export at hand, whether an engine comes from the checkpoint it is given
Stages may add fields of their own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import moetrt
from moetrt.errors import MoetrtError
from moetrt.model.config import MixtralConfig
from moetrt.names import MANIFEST, TOKENIZER
from moetrt.plugins import contract

KINDS = ("export", "engine")
REQUIRED = ("config", "dtype", "max_seq_len", "max_batch", "io", "parent")


def write_manifest(directory: str | Path, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Write `directory/moetrt.json`: the versions and timestamp, then `body` (which holds `REQUIRED`)."""
    if kind not in KINDS:
        raise ValueError(f"manifest kind {kind!r} is not one of {KINDS}")
    missing = [name for name in REQUIRED if name not in body]
    if missing:
        raise ValueError(f"manifest body lacks {missing}")
    manifest = {
        "kind": kind,
        "moetrt_version": moetrt.__version__,
        "contract_version": contract.CONTRACT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **body,
    }
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path, kind: str) -> dict[str, Any]:
    """The manifest of an artifact of `kind` made by this moetrt under this op contract, or a MoetrtError."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise MoetrtError(f"{path}: not found; expected a moetrt {kind} directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoetrtError(f"{path}: corrupt manifest ({err})") from None
    if not isinstance(manifest, dict):
        raise MoetrtError(f"{path}: corrupt manifest (expected a JSON object)")
    if manifest.get("kind") != kind:
        raise MoetrtError(f"{path}: this is a {manifest.get('kind')!r} artifact, expected {kind!r}")
    if manifest.get("moetrt_version") != moetrt.__version__:
        raise MoetrtError(
            f"{path}: written by moetrt {manifest.get('moetrt_version')}, this is moetrt {moetrt.__version__}; "
            "re-create the artifact"
        )
    if manifest.get("contract_version") != contract.CONTRACT_VERSION:
        raise MoetrtError(
            f"{path}: TopKMoE contract version {manifest.get('contract_version')}, this moetrt implements "
            f"{contract.CONTRACT_VERSION}; re-create the artifact"
        )
    missing = [name for name in REQUIRED if name not in manifest]
    if missing:
        raise MoetrtError(f"{path}: corrupt manifest (missing field '{missing[0]}')")
    try:
        MixtralConfig.from_dict(manifest["config"])
    except (TypeError, ValueError, MoetrtError) as err:
        raise MoetrtError(f"{path}: corrupt manifest (field 'config': {err})") from None
    return manifest


def manifest_config(manifest: dict[str, Any]) -> MixtralConfig:
    """The model config recorded in a manifest returned by `read_manifest`."""
    return MixtralConfig.from_dict(manifest["config"])


def check_output_dir(output_dir: Path, source_dir: Path, source: str) -> None:
    """Refuse to replace anything but an earlier artifact (the atomic rename would delete what is there) or
    to write into the `source` directory the artifact is made from."""
    if output_dir.resolve() == source_dir.resolve():
        raise MoetrtError(f"{output_dir}: the output directory must differ from the {source} directory")
    if output_dir.exists() and not (
        output_dir.is_dir() and (not any(output_dir.iterdir()) or (output_dir / MANIFEST).is_file())
    ):
        raise MoetrtError(f"{output_dir}: exists and is not a moetrt artifact; choose another output directory")


def artifact_hash(directory: str | Path) -> str:
    """sha256 of an artifact's manifest: the `parent` a child artifact records."""
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def lineage(export_dir: str | Path, export_manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest fields an engine built from `export_dir` records about where it comes from: `parent` (the
    export's `artifact_hash`) and `checkpoint` (the export's own parent, the checkpoint's hash)."""
    return {"parent": artifact_hash(export_dir), "checkpoint": export_manifest["parent"]}


def carry_tokenizer(source_dir: str | Path, artifact_dir: str | Path) -> None:
    """Copy the source's tokenizer.json (if it has one) so every artifact can turn text into ids on its own."""
    source = Path(source_dir) / TOKENIZER
    if source.is_file():
        shutil.copyfile(source, Path(artifact_dir) / TOKENIZER)
