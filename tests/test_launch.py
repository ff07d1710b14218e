"""Waiting for a Flower run (``launch.wait_finished``, shared by ``fl-lota run/compare`` and
``server/deploy.py``), with ``flwr list`` stood in for."""

from __future__ import annotations

import pytest

from fl_lota.federated import launch
from fl_lota.federated.launch import RunFailed


def _statuses(monkeypatch, *answers):
    seq = iter(answers)

    def status(run_id, env):
        x = next(seq)
        if isinstance(x, Exception):
            raise x
        return x

    monkeypatch.setattr(launch, "run_status", status)


def test_a_patient_wait_rides_out_an_unreadable_or_missing_status(monkeypatch):
    _statuses(monkeypatch, RunFailed("cannot read"), None, {"status": "running"}, {"status": "finished:completed"})
    assert launch.wait_finished("7", {}, timeout=10, interval=0, patient=True)["status"] == "finished:completed"


def test_an_impatient_wait_names_what_went_wrong_at_once(monkeypatch):
    _statuses(monkeypatch, RunFailed("cannot read run status from 'flwr list': boom"))
    with pytest.raises(RunFailed, match="cannot read run status"):
        launch.wait_finished("7", {}, timeout=10, interval=0)
    _statuses(monkeypatch, None)
    with pytest.raises(RunFailed, match="run 7 not listed"):
        launch.wait_finished("7", {}, timeout=10, interval=0)
    _statuses(monkeypatch, {"status": "finished:failed", "status-details": "ServerApp raised"})
    with pytest.raises(RunFailed, match="finished:failed: ServerApp raised"):
        launch.wait_finished("7", {}, timeout=10, interval=0, patient=True)


def test_a_dead_process_or_the_timeout_ends_the_wait(monkeypatch):
    _statuses(monkeypatch, {"status": "running"})
    with pytest.raises(RunFailed, match="run 7: 1 federation process"):
        launch.wait_finished("7", {}, timeout=10, interval=0, alive=lambda: "1 federation process(es) exited")
    monkeypatch.setattr(launch, "run_status", lambda run_id, env: {"status": "running"})
    with pytest.raises(RunFailed, match="did not finish within 0 s"):
        launch.wait_finished("7", {}, timeout=0, interval=0)
