"""End to end through ``flwr run`` when things go wrong: a client failing mid-run, a run
interrupted and resumed, a ServerApp killed hard, clients sitting out rounds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from test_flwr_run import APP, FED, TINY, _comparable, _faulty_app

from fl_lota.federated.launch import RunFailed, launch
from fl_lota.federated.report import read_rows


def test_a_client_failing_mid_run_does_not_stop_the_run(flwr_home, tmp_path):
    app = _faulty_app(tmp_path, {2})
    out = tmp_path / "results"
    launch(
        app,
        config_file=TINY,
        run_config={"results-dir": str(out), "num-server-rounds": 3},
        federation_config=FED,
        flwr_home=flwr_home,
    )
    r1, r2, r3 = read_rows(out / "metrics.jsonl")
    assert r1["accepted"] == 2 and not r1["partial"]
    assert r2["accepted"] == 1 and r2["partial"] and r2["global_updated"]
    assert any("injected failure" in reason for reason in r2["failures"].values())
    assert r3["accepted"] == 2 and not r3["failures"]
    # the client that failed still holds its mask and goes on with values-only uploads
    assert all(c["values_only"] for c in r3["clients"])


@pytest.mark.parametrize("downlink", ["exact", "int4"])
def test_an_interrupted_run_resumes_to_the_same_result(flwr_home, tmp_path, downlink):
    """int4: a rounding downlink (G plus each round's change rounded): the clients' G, the
    checkpoint's and the resumed server's are the same bits, so the resumed run ends where
    the uninterrupted one does."""
    from fl_lota.vectors.task_vector import SparseTaskVector

    base = {
        "num-server-rounds": 3,
        "client-state-dir": str(tmp_path / "client-state"),
        "downlink-values": downlink,
    }
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    launch(
        APP, config_file=TINY, run_config=base | {"results-dir": str(whole)}, federation_config=FED, flwr_home=flwr_home
    )
    # the same run stopped after round 2 (its checkpoint is what a crash would leave) ...
    launch(
        APP,
        config_file=TINY,
        run_config=base | {"results-dir": str(cut), "num-server-rounds": 2},
        federation_config=FED,
        flwr_home=flwr_home,
    )
    (cut / "global_update.safetensors").unlink()
    # ... then started again with the same results folder: it resumes at round 3
    launch(
        APP, config_file=TINY, run_config=base | {"results-dir": str(cut)}, federation_config=FED, flwr_home=flwr_home
    )
    a, b = read_rows(whole / "metrics.jsonl"), read_rows(cut / "metrics.jsonl")
    assert [r["round"] for r in b] == [1, 2, 3]
    assert _comparable(a, resumed_at=3) == _comparable(b, resumed_at=3)
    # round 3's training message: the whole of G after the resume; in the uninterrupted run
    # the nodes hold G from round 2's evaluation and are sent only that nothing changed
    assert min(b[2]["downlink_by_node"].values()) > 20 * max(a[2]["downlink_by_node"].values())
    assert max(a[2]["downlink_by_node"].values()) < 1000
    if downlink == "int4":  # G's rounded change (training + evaluation messages): under twice each uplink
        for row in a:
            up = {c["node"]: c["message_bytes"] for c in row["clients"]}
            down = {c["node"]: c["downlink_bytes"] for c in row["clients"]}
            for c in row["eval_clients"]:
                down[c["node"]] += c["downlink_bytes"]
            assert up and all(down[n] < 2 * up[n] for n in up), (row["round"], up, down)
    ga = SparseTaskVector.load(whole / "global_update.safetensors")
    gb = SparseTaskVector.load(cut / "global_update.safetensors")
    assert list(ga) == list(gb) and all(torch.equal(ga[n].values, gb[n].values) for n in ga)
    # a different config cannot resume this folder
    with pytest.raises(RunFailed, match="sparsity"):
        launch(
            APP,
            config_file=TINY,
            run_config=base | {"results-dir": str(cut), "num-server-rounds": 4, "sparsity": 0.8},
            federation_config=FED,
            flwr_home=flwr_home,
        )


def _simulation_below(flwr_home: Path):
    """The ``flwr-simulation`` process (ServerApp and Ray driver) of ``flwr_home``'s SuperLink."""
    import psutil

    marker = str(flwr_home / "local-superlink")
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "flwr-simulation" in " ".join(proc.info["cmdline"] or []) and any(
                marker in " ".join(p.cmdline()) for p in proc.parents()
            ):
                return proc
        except psutil.Error:
            continue
    return None


def test_a_serverapp_killed_hard_leaves_no_ray_processes(flwr_home, tmp_path):
    import threading

    import psutil

    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            launch(
                APP,
                config_file=TINY,
                run_config={"results-dir": str(tmp_path / "results"), "num-server-rounds": 50},
                federation_config=FED,
                flwr_home=flwr_home,
                echo=False,
            )
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline, sim, seen = time.monotonic() + 300, None, {}
    while time.monotonic() < deadline:  # until Ray's workers run below the ServerApp
        sim = _simulation_below(flwr_home)
        if sim is not None:
            try:
                kids = sim.children(recursive=True)
                seen = {p.pid: p.create_time() for p in kids}
                if any(p.name().startswith("ray::") or "default_worker" in " ".join(p.cmdline()) for p in kids):
                    break
            except psutil.Error:
                pass
        time.sleep(1)
    assert sim is not None and seen, "the simulation never started its Ray workers"
    time.sleep(2)  # the watchdog samples every second
    seen |= {p.pid: p.create_time() for p in sim.children(recursive=True)}
    os.kill(sim.pid, signal.SIGKILL)

    def left() -> list[str]:
        out = []
        for pid, born in seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == born and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {p.name()}: {' '.join(p.cmdline())[:200]}")
            except psutil.Error:
                pass
        return out

    stop_by = time.monotonic() + 30
    while left() and time.monotonic() < stop_by:
        time.sleep(1)
    assert left() == [], "processes of the killed ServerApp still run"
    thread.join(timeout=300)
    assert isinstance(outcome.get("error"), RunFailed)  # the run is reported failed, not left hanging


def test_client_sampling_trains_a_share_each_round_and_sitting_out_keeps_a_clients_mask(flwr_home, tmp_path):
    """fraction-train=0.5 of 4 clients: 2 train per round; a client's first upload is full
    (its mask) and every later one is values-only against that mask, whatever rounds it sat
    out; only clients with an accepted upload are asked to evaluate, and none is refused."""
    out = tmp_path / "results"
    outcome = launch(
        APP,
        config_file=TINY,
        run_config={
            "results-dir": str(out),
            "federation": "math,classify,sql,instruct",
            "fraction-train": 0.5,
            "num-server-rounds": 4,
        },
        federation_config={"num-supernodes": 4},
        flwr_home=flwr_home,
    )
    assert outcome.status == "finished:completed"
    rows = read_rows(out / "metrics.jsonl")
    seen: set[int] = set()
    for r in rows:
        assert r["accepted"] == 2 and not r["rejected"] and not r["failures"]
        parts = {c["partition"] for c in r["clients"]}
        assert all(c["values_only"] == (c["partition"] in seen) for c in r["clients"])
        seen |= parts
        assert {c["partition"] for c in r["eval_clients"]} == seen  # every bound client, and only those
        assert r["scored_partitions"] == sorted(seen) and r["eval_partial"] == (len(seen) < 4)
