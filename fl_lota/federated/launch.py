"""Launching a Flower app the way a user does (``flwr run``), and waiting for its outcome.

``flwr run`` (Flower >= 1.26) submits the run to a local SuperLink it starts in the
background, and can exit 0 when the run itself failed; ``launch`` therefore reads the run's
final status from ``flwr list --format json`` and raises ``RunFailed`` with Flower's reason.
The library never imports flwr: this module drives its command line.

The SuperLink keeps the environment of its first launch. ``launch`` sets
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (use this environment's packages, do not
build one per run) and ``FLWR_TELEMETRY_ENABLED=0`` for it unless the caller's environment
says otherwise; ``flwr_home`` isolates its state (tests use a temporary one and
``stop_local_superlink`` afterwards).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RunFailed",
    "RunOutcome",
    "executable",
    "free_port",
    "launch",
    "run_config_file",
    "run_status",
    "stop_local_superlink",
    "stop_run",
    "toml_overrides",
    "wait_finished",
]


class RunFailed(RuntimeError):
    """A Flower run that did not finish as completed."""


@dataclass
class RunOutcome:
    run_id: str
    status: str
    seconds: float
    log: str


def executable(name: str) -> str:
    """A Flower command (``flwr``, ``flower-superlink`` ...): the one installed beside this
    Python first (the same environment), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    exe = str(beside) if beside.exists() else shutil.which(name)
    if exe is None:
        raise FileNotFoundError(f"the {name!r} command is not installed; pip install 'flwr[simulation]==1.41.0'")
    return exe


def _flwr() -> list[str]:
    return [executable("flwr")]


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    raise TypeError(f"run config values must be str, int, float or bool, got {v!r}")


def toml_overrides(config: Mapping[str, object]) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items())


@contextlib.contextmanager
def run_config_file(config: Mapping[str, object]) -> Iterator[str | None]:
    """A temporary TOML file holding ``config`` for ``flwr run --run-config`` (None when
    ``config`` is empty), removed afterwards."""
    if not config:
        yield None
        return
    fd, path = tempfile.mkstemp(suffix=".toml", prefix="fl-lota-run-config-")
    with os.fdopen(fd, "w") as f:
        f.write(toml_overrides(config))
    try:
        yield path
    finally:
        os.unlink(path)


def wait_finished(
    run_id: str,
    env: dict[str, str],
    *,
    timeout: float,
    interval: float = 1.0,
    alive: Callable[[], str | None] | None = None,
    patient: bool = False,
) -> dict:
    """Poll ``flwr list`` until run ``run_id`` has finished; returns its status record.
    Raises RunFailed when it did not complete (with Flower's reason), takes longer than
    ``timeout`` seconds, or when ``alive()`` names something that died. A status that
    cannot be read, or a run not listed, raises at once unless ``patient`` (a SuperLink
    that is busy or restarting: ask again until ``timeout``)."""
    t0 = time.monotonic()
    while True:
        if alive is not None and (dead := alive()):
            raise RunFailed(f"run {run_id}: {dead}")
        try:
            status = run_status(run_id, env)
        except RunFailed:
            if not patient:
                raise
            status = {}
        if status is None:
            if not patient:
                raise RunFailed(f"run {run_id} not listed by 'flwr list'")
            status = {}
        if str(status.get("status", "")).startswith("finished"):
            if status["status"] != "finished:completed":
                raise RunFailed(f"run {run_id} ended as {status['status']}: {status.get('status-details')}")
            return status
        if time.monotonic() - t0 > timeout:
            raise RunFailed(f"run {run_id} did not finish within {timeout:.0f} s")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(flwr_home: str | Path | None) -> dict[str, str]:
    """The environment for flwr commands. With ``flwr_home``, a private local SuperLink:
    its own state folder and its own ports (Flower's local SuperLink otherwise listens on
    fixed ports, so a run would go to whichever SuperLink already holds them)."""
    env = dict(os.environ)
    # flwr starts flower-superlink (and the SuperLink its own processes) by name from PATH:
    # the flwr used here comes first, so a venv's fl-lota called without activating the
    # venv does not fail with "No such file or directory: 'flower-superlink'"
    env["PATH"] = os.pathsep.join(p for p in (str(Path(_flwr()[0]).parent), env.get("PATH")) if p)
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if flwr_home is not None:
        home = Path(flwr_home)
        home.mkdir(parents=True, exist_ok=True)
        ports = home / "fl-lota-ports.json"
        if not ports.exists():  # fixed per home, so later calls find the same SuperLink
            ports.write_text(json.dumps({"http": free_port(), "control": free_port()}))
        p = json.loads(ports.read_text())
        env["FLWR_HOME"] = str(home)
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(p["http"])
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(p["control"])
    return env


def run_status(run_id: str, env: dict[str, str]) -> dict | None:
    """The run's record from ``flwr list --format json`` (on the connection ``env``'s
    FLWR_HOME makes the default), or None when it is not listed. Raises RunFailed when the
    output cannot be read."""
    out = subprocess.run([*_flwr(), "list", "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        raise RunFailed(f"cannot read run status from 'flwr list': {out.stdout[-500:]} {out.stderr[-500:]}") from None
    return next((r for r in runs if str(r.get("run-id")) == run_id), None)


def launch(
    app: str | Path,
    *,
    run_config: Mapping[str, object] | None = None,
    config_file: str | Path | None = None,
    federation_config: Mapping[str, object] | None = None,
    flwr_home: str | Path | None = None,
    timeout: float = 24 * 3600,
    echo: bool = True,
    on_start: Callable[[str], None] | None = None,
) -> RunOutcome:
    """``flwr run app --stream`` with ``config_file`` and then ``run_config`` as overrides;
    waits for the run to finish and returns its outcome, or raises ``RunFailed``.
    ``on_start(run_id)`` is called as soon as the SuperLink has accepted the run."""
    app = Path(app)
    if not (app / "pyproject.toml").is_file():
        raise FileNotFoundError(f"no Flower app at {app} (expected {app / 'pyproject.toml'})")
    merged: dict[str, object] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"run config file not found: {path}")
        merged |= tomllib.loads(path.read_text())
    merged |= dict(run_config or {})
    env = _env(flwr_home)
    cmd = [*_flwr(), "run", str(app), "--stream"]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
    t0 = time.perf_counter()
    lines: list[str] = []
    with run_config_file(merged) as overrides:
        if overrides is not None:
            cmd += ["--run-config", overrides]
        with subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc:
            assert proc.stdout is not None
            try:
                started = False
                for line in proc.stdout:
                    lines.append(line)
                    if echo:
                        sys.stdout.write(line)
                    if on_start is not None and not started and (run_id := _run_id([line])) is not None:
                        started = True
                        on_start(run_id)
                    if time.perf_counter() - t0 > timeout:
                        proc.kill()
                        _stop(_run_id(lines), env)
                        raise RunFailed(f"flwr run took longer than {timeout:.0f} s")
            except KeyboardInterrupt:  # the SuperLink would go on with the run in the background
                proc.kill()
                _stop(_run_id(lines), env)
                raise
    text = "".join(lines)
    run_id = _run_id(lines)
    if run_id is None:
        raise RunFailed(f"flwr run did not start a run (exit {proc.returncode}):\n{text[-3000:]}")
    # the stream can end a moment before the status is final
    status = wait_finished(run_id, env, timeout=600)
    return RunOutcome(run_id, status["status"], time.perf_counter() - t0, text)


def _run_id(lines: list[str]) -> str | None:
    m = re.search(r"Successfully started run (\d+)", "".join(lines))
    return m.group(1) if m else None


def stop_run(run_id: str, flwr_home: str | Path | None = None) -> None:
    """Ask the SuperLink of ``flwr_home`` to stop run ``run_id`` if it is still going (a
    driver killed hard leaves its run running in the background)."""
    env = _env(flwr_home)
    try:
        status = run_status(run_id, env)
    except RunFailed:
        status = None
    if status is not None and not str(status.get("status", "")).startswith("finished"):
        _stop(run_id, env)


def _stop(run_id: str | None, env: dict[str, str]) -> None:
    """Ask the SuperLink to stop ``run_id`` (best effort: it may have ended already)."""
    if run_id is not None:
        subprocess.run([*_flwr(), "stop", run_id], env=env, capture_output=True, timeout=60, check=False)


def stop_local_superlink(flwr_home: str | Path) -> list[int]:
    """Stop the background SuperLink(s) that ``flwr run`` started for ``flwr_home``; returns
    the PIDs signalled. Matched by the state database path on their command line."""
    marker = str(Path(flwr_home) / "local-superlink")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "flower-superlink" in cmdline and marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                pids.append(int(proc.name))
            except ProcessLookupError:
                pass
    return pids
