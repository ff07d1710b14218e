"""Stop what a process leaves running when it dies without cleaning up.

Flower's simulation engine starts Ray (its GCS, raylet, agents and the ClientApp workers)
from the process that runs the ServerApp. When that process is killed hard (``kill -9``, the
OOM killer), Ray cannot shut down: its agents and workers are reparented and keep running,
holding memory. ``watch()`` starts a small detached watchdog that records the descendants of a
process every ``interval`` seconds and, once that process is gone, terminates the ones it
recorded that still run (SIGTERM, then SIGKILL after ``grace`` seconds). A process is matched
by its PID and start time, so a PID reused by an unrelated program is never touched.

A process started between the last record and the death (a Ray worker being spawned) is not
in the record, and once its parent is stopped it is reparented out of reach of the tree. So
``watch()`` of the calling process also puts a random tag in that process's environment:
everything it starts from then on inherits the tag, and the watchdog's final sweep stops the
processes carrying it (and the descendants of the recorded ones) wherever they now hang.

    python -m fl_lota.federated.reaper PID [--interval 1] [--grace 5] [--tag TAG]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import select
import subprocess
import sys
import time

import psutil

# the environment variable that marks the processes started by a watched process
TAG = "FL_LOTA_REAPER_TAG"
# sweeps after the death: a process stopped in one may have started another meanwhile
SWEEPS = 4


def watch(
    pid: int | None = None, *, interval: float = 1.0, grace: float = 5.0, ready: float = 30.0
) -> subprocess.Popen:
    """Start the watchdog for ``pid`` (this process by default) and return its handle once
    it has recorded ``pid``'s descendants a first time (at most ``ready`` seconds). It runs
    in its own session, so signals sent to this process's group do not reach it. Watching
    this process also tags its environment (``TAG``), so that what it starts later is found
    however it is reparented."""
    own = pid is None or pid == os.getpid()
    pid = os.getpid() if pid is None else pid
    cmd = [
        sys.executable,
        "-m",
        "fl_lota.federated.reaper",
        str(pid),
        "--interval",
        str(interval),
        "--grace",
        str(grace),
    ]
    if own:
        tag = secrets.token_hex(8)
        os.environ[TAG] = tag
        cmd += ["--tag", tag]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    assert proc.stdout is not None
    if select.select([proc.stdout], [], [], ready)[0]:
        proc.stdout.readline()
    proc.stdout.close()
    return proc


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def follow(pid: int, *, interval: float = 1.0, on_first=None) -> dict[int, float]:
    """Record ``pid``'s descendants (PID -> start time) until ``pid`` ends; returns them.
    ``on_first()`` is called after the first record."""
    seen: dict[int, float] = {}
    try:
        target = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return seen
    me = os.getpid()
    while _alive(target):
        try:
            children = target.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            if child.pid == me:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                seen[child.pid] = child.create_time()
        if on_first is not None:
            on_first()
            on_first = None
        time.sleep(interval)
    return seen


def sweep(seen: dict[int, float], tag: str = "") -> dict[int, float]:
    """``seen`` with what it has started since: the live descendants of its processes that
    still run and, with a ``tag``, every process whose environment carries it."""
    found, me = dict(seen), os.getpid()
    for pid, born in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != born:
                continue
            for child in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    found[child.pid] = child.create_time()
        except psutil.Error:
            continue
    if tag:
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            with contextlib.suppress(psutil.Error):  # other users' processes: access denied
                if proc.environ().get(TAG) == tag:
                    found[proc.pid] = proc.create_time()
    found.pop(me, None)
    return found


def stop(seen: dict[int, float], *, grace: float = 5.0) -> list[int]:
    """Terminate the recorded processes that still run (same PID and start time); kill the
    ones that outlive ``grace`` seconds. Returns the PIDs signalled."""
    procs = []
    for pid, born in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == born and _alive(proc):
                procs.append(proc)
        except psutil.Error:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return [p.pid for p in procs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fl_lota.federated.reaper", description=__doc__.split("\n\n")[0])
    parser.add_argument("pid", type=int)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--tag", default="", help=f"also stop the processes whose {TAG} is this")
    args = parser.parse_args(argv)
    seen = follow(args.pid, interval=args.interval, on_first=_ready)
    for _ in range(SWEEPS):
        seen = sweep(seen, args.tag)
        if not stop(seen, grace=args.grace):
            break
    return 0


def _ready() -> None:
    """Tell ``watch()`` the first record is taken (its parent may be gone: ignore that)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
