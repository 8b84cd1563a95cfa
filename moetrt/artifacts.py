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
    file_records      {file name: {"size": bytes, "sha256": hex}} of the files the artifact's graph and weights
                      live in, hashed while they are written (`FileDigest`)
Stages may add fields of their own. `read_manifest` checks the recorded sizes on every read (a truncated,
grown or swapped file is refused at once); `verify_artifact` also checks the digests (flipped bytes, the
same-sized weights of another engine), which reads every byte, so it runs on request (`moetrt verify`,
`--verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

import moetrt
from moetrt.errors import MoetrtError
from moetrt.fsutil import check_regular_file
from moetrt.model.config import Dtype, MixtralConfig
from moetrt.names import MANIFEST, TEXT_FILES
from moetrt.plugins import contract
from moetrt.schema import MAX_BATCH, MAX_THREADS, Positions, Strict, load_json, parse

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


class FileRecord(Strict):
    """A file of the artifact as it was written: its size in bytes and the sha256 of its content."""

    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Manifest(Strict):
    """The fields every stage reads (strict types and ranges); stages' own fields are kept as written."""

    kind: Literal["export", "engine"]
    moetrt_version: str
    contract_version: int
    created_at: str
    config: dict[str, Any]  # MixtralConfig.to_dict(), validated by MixtralConfig.from_dict
    dtype: Dtype
    max_seq_len: Positions
    max_batch: Annotated[int, Field(ge=1, le=MAX_BATCH)]
    io: dict[str, Any]
    parent: str
    backend: str | None = None  # engines: the `moetrt.registry` entry that built it
    precision: str | None = None
    threads: Annotated[int, Field(ge=1, le=MAX_THREADS)] | None = None
    device: str | None = None
    file_records: dict[Annotated[str, Field(pattern=r"^[^/\\]+$")], FileRecord] | None = None


def read_manifest(directory: str | Path, kind: str | tuple[str, ...]) -> dict[str, Any]:
    """The manifest of an artifact of `kind` (or one of several kinds) made by this moetrt under this op
    contract, or a MoetrtError.

    Every field a stage reads is checked against `Manifest` (strict types and ranges), the config against
    `MixtralConfig`, and each file in `file_records` for its recorded size (a cheap check that catches a
    truncated or swapped weight file; `verify_artifact` checks the digests)."""
    path = Path(directory) / MANIFEST
    kinds = (kind,) if isinstance(kind, str) else kind
    expected = " or ".join(repr(k) for k in kinds) or "no moetrt artifact"
    what = f"a moetrt {' or '.join(kinds)}"
    if not os.path.lexists(path):
        raise MoetrtError(f"{path}: not found; expected {what} directory")
    check_regular_file(path, f"{what} manifest")
    manifest = load_json(path, f"{what} manifest", problem="corrupt manifest")
    if not isinstance(manifest, dict):
        raise MoetrtError(f"{path}: corrupt manifest (expected a JSON object)")
    if manifest.get("kind") not in kinds:
        raise MoetrtError(f"{path}: this is a {manifest.get('kind')!r} artifact, expected {expected}")
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
    parsed = parse(Manifest, manifest, f"{path}: corrupt manifest")
    MixtralConfig.from_dict(parsed.config, source=f"{path}: corrupt manifest", within="config")
    for name, record in (parsed.file_records or {}).items():
        file = Path(directory) / name
        check_regular_file(file, f"the artifact's {name} (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != record.size:
            raise MoetrtError(
                f"{file}: {size} bytes, the manifest records {record.size}; the artifact is damaged, re-create it"
            )
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


class FileDigest:
    """sha256 and size of a file as its writer writes it, front to back, from the bytes it writes: `add`
    takes each tensor's bytes at its offset (alignment gaps, which read back as zeros, hash as zeros), so no
    second pass over a 100 GB weight file is made after the build. `record` also works alone, for a small
    finished file (it then reads it)."""

    CHUNK = 1 << 24

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sha = hashlib.sha256()
        self._done = 0

    def add(self, offset: int, data: Any) -> None:
        """The bytes `data` (bytes-like) written at `offset` (at or past everything added so far)."""
        if offset < self._done:
            raise AssertionError(f"{self.path}: write at {offset} before the hashed end {self._done}")
        self._zeros(offset)
        view = memoryview(data).cast("B")
        self._sha.update(view)
        self._done += view.nbytes

    def record(self) -> dict[str, Any]:
        """{"size", "sha256"} of the finished file; a file nothing was added to is read now."""
        size = self.path.stat().st_size
        if self._done == 0:
            with open(self.path, "rb") as fh:
                while chunk := fh.read(self.CHUNK):
                    self._sha.update(chunk)
                    self._done += len(chunk)
        self._zeros(size)
        if self._done != size:
            raise AssertionError(f"{self.path}: {size} bytes on disk, {self._done} hashed")
        return {"size": size, "sha256": self._sha.hexdigest()}

    def _zeros(self, end: int) -> None:
        while self._done < end:
            n = min(self.CHUNK, end - self._done)
            self._sha.update(bytes(n))
            self._done += n


def file_records(directory: Path, digests: dict[str, FileDigest | None]) -> dict[str, dict[str, Any]]:
    """The manifest's `file_records` for `directory`'s files: each name's digest (None: hash the finished,
    small file now, e.g. the graph)."""
    return {name: (digest or FileDigest(Path(directory) / name)).record() for name, digest in digests.items()}


def verify_artifact(directory: str | Path, kind: str | None = None) -> dict[str, dict[str, Any]]:
    """Check every file the manifest records against its sha256 (reads each byte once); returns the records
    checked, or raises a one-line MoetrtError naming the first file whose content changed. kind None: the
    manifest's own kind (an export or an engine)."""
    directory = Path(directory)
    if kind is None:
        path = directory / MANIFEST
        check_regular_file(path, "a moetrt artifact manifest")
        peek = load_json(path, "a moetrt artifact manifest", problem="corrupt manifest")
        kind = peek.get("kind") if isinstance(peek, dict) and peek.get("kind") in KINDS else KINDS[-1]
    records = read_manifest(directory, kind).get("file_records")
    if not records:
        raise MoetrtError(f"{directory / MANIFEST}: records no file digests (made by an older moetrt); re-create it")
    for name, record in records.items():
        found = FileDigest(directory / name).record()["sha256"]
        if found != record["sha256"]:
            raise MoetrtError(
                f"{directory / name}: content differs from the sha256 the manifest records "
                f"({found[:12]}... vs {record['sha256'][:12]}...); the artifact is damaged, re-create it"
            )
    return records


def artifact_hash(directory: str | Path) -> str:
    """sha256 of an artifact's manifest: the `parent` a child artifact records."""
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def lineage(export_dir: str | Path, export_manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest fields an engine built from `export_dir` records about where it comes from: `parent` (the
    export's `artifact_hash`) and `checkpoint` (the export's own parent, the checkpoint's hash)."""
    return {"parent": artifact_hash(export_dir), "checkpoint": export_manifest["parent"]}


def carry_tokenizer(source_dir: str | Path, artifact_dir: str | Path) -> None:
    """Copy the source's text files (`moetrt.names.TEXT_FILES`: tokenizer.json, tokenizer.model,
    tokenizer_config.json, special_tokens_map.json, chat_template.jinja, generation_config.json; those it has)
    so every artifact turns text into ids and back, renders chats and stops as its checkpoint does."""
    for name in TEXT_FILES:
        source = Path(source_dir) / name
        if source.is_file():
            shutil.copyfile(source, Path(artifact_dir) / name)


@dataclass(frozen=True)
class Artifact:
    """What a directory holds, read once: a Hugging Face checkpoint (no manifest) or a moetrt artifact."""

    path: Path
    kind: str  # "checkpoint" | "export" | "engine"
    config: MixtralConfig
    manifest: dict[str, Any] | None  # None for a checkpoint


def open_artifact(path: str | Path, kinds: tuple[str, ...] = ("engine", "checkpoint")) -> Artifact:
    """Decide once what `path` is and read its config: an artifact of one of `kinds` (its manifest checked by
    `read_manifest`), or a checkpoint (config.json, no manifest) when "checkpoint" is among `kinds`.
    Raises MoetrtError (one line) otherwise."""
    path = Path(path)
    names = [
        ("a Hugging Face checkpoint (config.json)" if k == "checkpoint" else f"an {k} ({MANIFEST})") for k in kinds
    ]
    if not path.is_dir():
        raise MoetrtError(f"{path}: not a directory; expected {' or '.join(names)} directory")
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, tuple(kind for kind in kinds if kind != "checkpoint"))
        return Artifact(path, manifest["kind"], manifest_config(manifest), manifest)
    if "checkpoint" in kinds and (path / "config.json").is_file():
        return Artifact(path, "checkpoint", MixtralConfig.from_pretrained(path), None)
    raise MoetrtError(f"{path}: neither {' nor '.join(names)} directory")
