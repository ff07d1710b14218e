"""fl_lota.federated.reaper: what a process killed with SIGKILL leaves running is stopped, and nothing else."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from fl_lota.federated import reaper
    # a grandchild in its own session, as Ray's agents end up: a kill of the parent does not reach it
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    if sys.argv[1] == "watch":
        reaper.watch(interval=0.2, grace=2.0)
    print(child.pid, flush=True)
    time.sleep(300)
    """
)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("watched", [True, False])
def test_what_a_killed_process_leaves_running_is_stopped(watched):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "watch" if watched else "no"], stdout=subprocess.PIPE, text=True
    )
    grandchild = int(parent.stdout.readline())
    try:
        time.sleep(0.5)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + (15 if watched else 4)
        while _running(grandchild) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _running(grandchild) is not watched
        assert bystander.poll() is None  # a process that was never the dead one's descendant runs on
    finally:
        for pid in (grandchild, bystander.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        bystander.wait()


LATE = textwrap.dedent(
    """
    import subprocess, sys, time
    from fl_lota.federated import reaper
    reaper.watch(interval=5.0, grace=2.0)  # its first record holds no child yet; the next is 5 s away
    # started after that record by a child that exits at once: the grandchild is reparented,
    # out of reach of the dead process's tree, before the watchdog looks again
    code = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); "
        "print(p.pid, flush=True)"
    )
    mid = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    print(int(mid.stdout.readline()), flush=True)
    mid.wait()
    time.sleep(300)
    """
)


def test_a_process_started_after_the_last_record_and_reparented_is_stopped_by_its_tag():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    parent = subprocess.Popen([sys.executable, "-c", LATE], stdout=subprocess.PIPE, text=True)
    late = int(parent.stdout.readline())
    try:
        assert psutil.Process(late).ppid() != parent.pid  # the tree no longer leads to it
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while _running(late) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(late), "a process the killed one started after the last record still runs"
        assert bystander.poll() is None
    finally:
        for pid in (late, bystander.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        bystander.wait()
