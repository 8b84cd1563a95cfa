"""Atomic directory writes: build in a temporary sibling, rename into place at the end.

An interrupted or failed export/build/save therefore never leaves a half-written artifact where the
next stage would read it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moetrt.errors import MoetrtError


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final`, on error it goes."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the artifact should get the usual permissions
    except OSError as err:
        raise MoetrtError(f"{final}: cannot write the output directory ({err.strerror})") from None
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
