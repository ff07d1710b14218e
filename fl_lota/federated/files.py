"""Files replaced whole: a reader (or a restarted run) finds the old file or the new one,
never half of one. The files fl-lota writes one at a time (JSON records, masks, spilled
updates, a checkpoint's LATEST) go through ``write_atomic``; a checkpoint's folder is
written the same way, whole (``checkpoint.save_checkpoint``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = ["fsync_dir", "fsync_file", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = True) -> None:
    """``data`` (a str as UTF-8) into ``path``: written beside it under a hidden temporary
    name, then renamed over it. ``durable``: the file and the rename are flushed to disk
    first (state a restarted run reads back); without it a crash may lose the new file
    but never leaves half of one (files that can be made again, such as large update
    copies, where a flush per round would cost seconds). The folder is made if missing;
    on an error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush the folder ``path`` itself to disk: the names made or renamed in it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
