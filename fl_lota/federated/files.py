"""Files replaced whole: a reader (or a restarted run) finds the old file or the new one,
never half of one. Every small state file fl-lota keeps goes through ``write_atomic``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """``data`` (a str as UTF-8) into ``path``: written beside it under a hidden temporary
    name, flushed to disk, then renamed over it. The folder is made if missing; on an error
    the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
