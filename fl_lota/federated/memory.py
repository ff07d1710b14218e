"""This process's host memory: resident size now, and its peak since ``reset_peak``.

Linux keeps both in ``/proc/self/status`` (VmRSS, VmHWM), and writing 5 to
``/proc/self/clear_refs`` starts the peak afresh, so a server can give each round its own
peak. Elsewhere the figures are None: a peak over the process's whole life would be read
as a round's, so none is given.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

__all__ = ["peak_mb", "reset_peak", "rss_mb"]

_STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def rss_mb() -> float | None:
    """Resident memory now (MiB), or None where /proc is not there."""
    return _status_mb("VmRSS")


def peak_mb() -> float | None:
    """Peak resident memory since the last ``reset_peak`` (MiB), or None where it cannot be
    reset (not Linux)."""
    return _status_mb("VmHWM")


def reset_peak() -> bool:
    """Start the peak afresh at the current resident size; False where that cannot be done
    (then ``peak_mb`` is None)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
