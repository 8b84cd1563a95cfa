"""Atomic directory writes: build in a temporary sibling, rename into place at the end.

An interrupted or failed export/build/save therefore never leaves a half-written artifact where the
next stage would read it. The temporary sibling is `.<name>.tmp-<pid>-<random>`; one left behind by a
process that was killed (SIGKILL, a power cut) is removed by the next write of the same output. Names are
kept within the file system's name limit (255 bytes): a long output name is shortened, with a hash of it,
in its temporary names.

Ctrl-C: `exit_on_interrupt` (installed by the CLI) removes this process's temporaries and exits with status
130 at once, from Python code between native calls, instead of unwinding a KeyboardInterrupt through
ONNX Runtime / torch / protobuf frames and tearing the interpreter down under their threads (which is where
the crashes on Ctrl-C came from). A rename into place is never cut in half: an interrupt during it takes
effect right after it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from moetrt.errors import MoetrtError

_live: set[Path] = set()  # temporaries this process is writing
_state = {"committing": 0, "pending": False}
_on_interrupt: list[Callable[[], None]] = []


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`, on error it goes."""
    final = Path(final)
    stem = _temporary_stem(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-{os.getpid()}-", dir=final.parent))
        _live.add(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the artifact should get the usual permissions
    except OSError as err:
        raise MoetrtError(f"{final}: cannot write the output directory ({err.strerror})") from None
    try:
        yield tmp
        with _uninterrupted():
            if final.exists():
                old = final.with_name(f".{stem}.old-{os.getpid()}")
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            _live.discard(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _live.discard(tmp)
        raise


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove `final`'s temporary siblings (`.tmp-<pid>-*`, `.old-<pid>`) whose process is gone; returns them."""
    stem = _temporary_stem(final)
    removed = []
    for kind in ("tmp", "old"):
        for path in final.parent.glob(f".{_glob_escape(stem)}.{kind}-*"):
            pid = path.name[len(f".{stem}.{kind}-") :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def exit_on_interrupt(report: Callable[[], None]) -> None:
    """Install the SIGINT handler: remove this process's temporaries, call `report` (which tells the user),
    and leave with exit status 130 (main thread only, as Python's signal handlers are)."""
    _on_interrupt[:] = [report]
    signal.signal(signal.SIGINT, _handle_interrupt)


def _handle_interrupt(_signum: int, _frame: object) -> None:
    if _state["committing"]:
        _state["pending"] = True
        return
    for tmp in list(_live):
        shutil.rmtree(tmp, ignore_errors=True)
    for report in _on_interrupt:
        report()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(130)


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Defer SIGINT (under `exit_on_interrupt`) until the block is done: a rename pair is not cut in half."""
    _state["committing"] += 1
    try:
        yield
    finally:
        _state["committing"] -= 1
        if not _state["committing"] and _state["pending"]:
            _state["pending"] = False
            _handle_interrupt(signal.SIGINT, None)


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory if directory.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temporary_stem(final: Path) -> str:
    """`final`'s name, shortened (with a hash of the whole name) so that `.<stem>.tmp-<pid>-<8 random>` and
    `.<stem>.old-<pid>` fit the file-name limit; a name that does not fit by itself is refused."""
    name_max = _name_max(final.parent)
    encoded = os.fsencode(final.name)
    if len(encoded) > name_max:
        raise MoetrtError(f"{final}: the name is {len(encoded)} bytes; file names are limited to {name_max} bytes")
    room = name_max - len(".") - len(".tmp-") - 10 - len("-") - 8  # pid up to 10 digits, mkdtemp's 8 characters
    if len(encoded) <= room:
        return final.name
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    cut = encoded[: room - len(digest) - 1]
    return os.fsdecode(cut).encode("utf-8", "ignore").decode("utf-8", "ignore") + "~" + digest


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_regular_file(path: Path, what: str) -> None:
    """Refuse, with one line, a `path` that is not a regular file (or a symbolic link to one): missing, a
    directory, a broken symbolic link, a symbolic-link loop, a device or pipe."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        reason = "a broken symbolic link" if path.is_symlink() else "not found"
        raise MoetrtError(f"{path}: {reason}; expected {what}") from None
    except OSError as err:  # ELOOP, EACCES, ENAMETOOLONG
        raise MoetrtError(f"{path}: {err.strerror.lower()}; expected {what}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise MoetrtError(f"{path}: {kind}; expected {what}")


def check_writable_file(path: Path) -> None:
    """Refuse, before any work, an output file path that cannot be written: a directory, or a missing parent."""
    if path.is_dir():
        raise MoetrtError(f"{path}: is a directory; expected a file path to write")
    if not path.parent.is_dir():
        raise MoetrtError(f"{path}: its directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise MoetrtError(f"{path}: its directory {path.parent} is not writable")
