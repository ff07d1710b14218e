"""The comparison protocol without Flower: tuning grids, validation splits, single-task
references, and the table's statistics and labels (synthetic results with known answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_lota.compare import ComparePlan, Comparison, TuneSpec, parse_grid
from fl_lota.compare.isolated import isolated_run, validation_task
from fl_lota.federated.node import LocalNode
from fl_lota.federated.runconfig import RunConfigError
from fl_lota.tasks import get_task
from fl_lota.training.data import stream_order
from fl_lota.vectors import codec

TINY = {
    "model": "tiny",
    "federation": "math,classify",
    "num-server-rounds": 2,
    "calibration-steps": 1,
    "local-steps": 3,
    "batch-size": 4,
    "max-len": 64,
    "n-train": 16,
    "n-test": 4,
    "bf16": False,
    "device": "cpu",
}


def test_grid_and_tuning_spec_are_checked():
    assert parse_grid("lota:mask_aware,ties fft:fedavg") == [("lota", ["mask_aware", "ties"]), ("fft", ["fedavg"])]
    for bad, needle in [
        ("lota", "method:merge"),
        ("qlora:ties", "qlora"),
        ("lota:median", "median"),
        ("", "empty"),
        ("lota:ties lota:fedavg", "twice"),
    ]:
        with pytest.raises(ValueError, match=needle):
            parse_grid(bad)
    spec = TuneSpec.parse("lora.lr=1e-4,1e-3 lora.lora-rank=8,16 ties.ties-k=0.1,0.2 fft.lr=5e-5")
    assert spec.candidates("lora") == [
        {"lr": 1e-4, "lora-rank": 8},
        {"lr": 1e-4, "lora-rank": 16},
        {"lr": 1e-3, "lora-rank": 8},
        {"lr": 1e-3, "lora-rank": 16},
    ]
    assert spec.candidates("lota") == [{}]  # not tuned: the configured values
    assert spec.merge_candidates("ties") == [{"ties-k": 0.1}, {"ties-k": 0.2}]
    for bad, needle in [
        ("fft.lrr=1e-4", "lrr"),
        ("fft.seed=1,2", "set by compare"),
        ("ties.lr=1e-4", "ties takes"),
        ("median.merge-lam=1", "neither a method"),
        ("fft=1e-4", "method.key"),
    ]:
        with pytest.raises((ValueError, RunConfigError), match=needle):
            TuneSpec.parse(bad)


def test_validation_split_comes_out_of_train_and_never_touches_test():
    task = get_task("math", n_train=64, n_test=10)
    val = validation_task(task, 12, seed=0)
    assert len(val.test) == 12 and len(val.train) == 52
    assert {s.prompt for s in val.test} | {s.prompt for s in val.train} == {s.prompt for s in task.train}
    assert not {s.prompt for s in val.test} & {s.prompt for s in val.train}
    assert not {s.prompt for s in val.test} & {s.prompt for s in task.test}
    assert [s.prompt for s in validation_task(task, 12, seed=0).test] == [s.prompt for s in val.test]
    assert len(validation_task(task, 1000, seed=0).test) == 16  # at most a quarter of train
    with pytest.raises(ValueError, match="too few"):
        validation_task(get_task("math", n_train=3, n_test=2), 4, seed=0)


def test_single_task_reference_is_the_clients_own_stream_trained_alone():
    plan = ComparePlan(app=None, base=dict(TINY), grid=[("lota", ["mask_aware"])], seeds=[0], tune=None)
    cfg = plan.config({"method": "lota"})
    task = plan.tasks[1]
    res = isolated_run(cfg, 1, task)
    # round 1 reads exactly what federated client 1 reads, round 2 reads on
    node = LocalNode(cfg, 1)
    assert res.seen[0] == node.train(codec.encode(_empty()), server_round=1).seen
    per_round = cfg.examples_per_round
    assert res.seen[1] == stream_order(len(task.train), node.stream_seed, per_round, per_round)
    assert res.passes == 2 * cfg.local_steps  # calibration counted inside round 1's budget
    assert set(res.scores) == {"classify"} and 0.0 <= res.scores["classify"] <= 1.0
    tv = codec.decode(res.payload)  # G over two rounds stays on the mask made in round 1
    assert 0 < tv.nnz <= 0.1 * tv.numel + len(tv)


def _empty():
    from fl_lota.vectors.task_vector import SparseTaskVector

    return SparseTaskVector()


def test_tuning_picks_the_best_validation_mean_and_stores_every_unit(tmp_path, monkeypatch):
    """The selection logic with scripted validation scores: the higher task-average wins,
    the TIES candidates are scored on the winner's stored updates, and a second pass reuses
    every stored unit instead of training again."""
    from fl_lota.compare import runner

    calls = []

    def fake_unit(cfg, part, task, *, vector_path=None):
        calls.append((cfg.method, cfg.sparse_lr, part))
        good = cfg.sparse_lr == 1e-3
        if vector_path is not None:
            vector_path.parent.mkdir(parents=True, exist_ok=True)
            vector_path.write_bytes(codec.encode(_empty()))
        score = (0.8 if good else 0.3) if task.name == "math" else 0.5
        return {"scores": {task.name: score}, "passes": 6, "examples": 24, "train_seconds": 1.0, "eval_seconds": 0.1}

    def fake_merge(cfg, updates, weights, tasks, settings):
        assert len(updates) == 2 and weights == [12.0, 12.0]
        assert all(t.test is not t.train for t in tasks)
        return {"m": {t.name: cfg.ties_k for t in tasks}}  # higher k scores higher

    monkeypatch.setattr(runner, "isolated_unit", fake_unit)
    monkeypatch.setattr(runner, "score_merge", fake_merge)
    spec = TuneSpec.parse("lota.sparse-lr=1e-4,1e-3 ties.ties-k=0.1,0.3")
    plan = ComparePlan(app=None, base=dict(TINY), grid=[("lota", ["mask_aware", "ties"])], seeds=[0], tune=spec)
    out = Comparison(plan, tmp_path, log=lambda s: None).tune()
    assert out["methods"]["lota"] == {"sparse-lr": 1e-3}
    assert out["merges"][("lota", "ties")] == {"ties-k": 0.3}
    assert len(calls) == 4
    again = Comparison(plan, tmp_path, log=lambda s: None).tune()
    assert again == out and len(calls) == 4  # all reused
    # a changed setting is a different unit: trained, not reused
    plan2 = ComparePlan(
        app=None, base=dict(TINY) | {"local-steps": 4}, grid=[("lota", ["mask_aware"])], seeds=[0], tune=spec
    )
    Comparison(plan2, tmp_path, log=lambda s: None).tune()
    assert len(calls) == 8


def test_a_tuning_folder_carried_without_its_updates_resumes(tmp_path, monkeypatch):
    """The .fltv updates are large (FFT: ~270 MB per task); a comparison folder copied
    without them still reuses every stored run and merge score. Only when a merge candidate
    must be scored are the chosen setting's runs trained again, and that score is keyed by
    the new updates' digests."""
    from fl_lota.compare import runner

    calls, merged = [], []

    def fake_unit(cfg, part, task, *, vector_path=None):
        calls.append((cfg.sparse_lr, part))
        if vector_path is not None:
            vector_path.parent.mkdir(parents=True, exist_ok=True)
            vector_path.write_bytes(codec.encode(_empty()))
        score = 0.8 if cfg.sparse_lr == 1e-3 else 0.3
        return {"scores": {task.name: score}, "passes": 6, "examples": 24, "train_seconds": 1.0, "eval_seconds": 0.1}

    def fake_merge(cfg, updates, weights, tasks, settings):
        merged.append(cfg.ties_k)
        assert all(u == codec.encode(_empty()) for u in updates)
        return {"m": {t.name: cfg.ties_k for t in tasks}}

    monkeypatch.setattr(
        runner,
        "isolated_unit",
        lambda *a, **k: fake_unit(*a, **k) | {"update_digest": runner.digest(codec.encode(_empty()))},
    )
    monkeypatch.setattr(runner, "score_merge", fake_merge)
    spec = TuneSpec.parse("lota.sparse-lr=1e-4,1e-3 ties.ties-k=0.1,0.3")
    plan = ComparePlan(app=None, base=dict(TINY), grid=[("lota", ["ties"])], seeds=[0], tune=spec)
    first = Comparison(plan, tmp_path, log=lambda s: None).tune()
    assert len(calls) == 4 and merged == [0.1, 0.3]
    for f in tmp_path.rglob("*.fltv"):
        f.unlink()
    again = Comparison(plan, tmp_path, log=lambda s: None).tune()
    assert again == first and len(calls) == 4 and merged == [0.1, 0.3]  # nothing trained or merged again
    # one merge score lost: the chosen setting's two runs are trained again (not the other
    # setting's), their files written, and only the lost candidate is scored
    next((tmp_path / "tune" / "lota").glob("merge-ties-ties-k=0.3-*.json")).unlink()
    said = []
    third = Comparison(plan, tmp_path, log=said.append).tune()
    assert third == first
    assert calls[4:] == [(1e-3, 0), (1e-3, 1)] and merged == [0.1, 0.3, 0.3]
    assert any("training that run again" in s for s in said)
    assert len(list(tmp_path.rglob("*.fltv"))) == 2


def test_a_federation_of_task_files_is_planned_like_any_other(tmp_path):
    rows = [{"q": f"What is {i} plus {i + 1}?", "a": f"{2 * i + 1}"} for i in range(40)]
    path = tmp_path / "adder.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(TINY) | {"federation": f"classify,file:{path}?prompt=q&answer=a&metric=exact_number"}
    plan = ComparePlan(
        app=None, base=base, grid=[("lota", ["mask_aware"])], seeds=[0, 1], tune=TuneSpec.parse("lota.sparse-lr=1e-4")
    )
    assert [t.name for t in plan.tasks] == ["classify", "adder"] and plan.partitions == [0, 1]
    val = plan.val_tasks()[1]
    assert not {s.prompt for s in val.test} & {s.prompt for s in plan.tasks[1].test}
    text = plan.describe()
    assert "tuning lota: sparse-lr [0.0001]: 1 x 2 single-task runs" in text
    assert "single-task references: 1 methods x 2 seeds x 2 tasks = 4 runs" in text
    assert "federations: lota+mask_aware x 2 seeds = 2 flwr runs" in text
    counts = plan.counts()
    # 2 tuning + 4 reference runs of 2 x 3 steps, and 2 federations of 2 clients x 2 x 3 steps
    assert counts["passes"] == (2 + 4) * 6 + 2 * 2 * 6


def test_a_federation_folder_is_reused_resumed_or_moved_aside_never_mixed(tmp_path, monkeypatch):
    """Comparison._federation with a stand-in for flwr run that writes what a run leaves."""
    from fl_lota.compare import runner
    from fl_lota.federated.launch import RunOutcome

    launched, stopped, said = [], [], []

    def fake_launch(app, *, run_config, federation_config, flwr_home, on_start):
        out = Path(run_config["results-dir"])
        launched.append(run_config["lr"])
        on_start("77")
        (out / "checkpoint").mkdir(parents=True, exist_ok=True)
        rows = "".join(json.dumps({"round": r}) + "\n" for r in range(1, run_config["num-server-rounds"] + 1))
        (out / "metrics.jsonl").write_text(rows)
        return RunOutcome("77", "finished:completed", 1.0, "")

    monkeypatch.setattr(runner, "launch", fake_launch)
    monkeypatch.setattr(runner, "stop_run", lambda run_id, home: stopped.append(run_id))
    plan = ComparePlan(app=None, base=dict(TINY), grid=[("fft", ["fedavg"])], seeds=[0], tune=None)
    cmp = Comparison(plan, tmp_path, log=said.append)
    folder = tmp_path / "runs" / "seed0" / "fft-fedavg"

    def run(**sets):
        return cmp._federation(folder, {"method": "fft", "merge": "fedavg", "results-dir": str(folder), **sets}, "x")

    rows, _ = run(lr=1e-4)
    assert len(rows) == 2 and launched == [1e-4]
    assert json.loads((folder / "unit.json").read_text())["run_id"] == "77"
    run(lr=1e-4)  # finished with these settings and data: reused
    assert launched == [1e-4] and "stored run reused" in said[-1]
    (folder / "launch.json").unlink()  # the driver was killed before it recorded the end
    run(lr=1e-4)
    assert stopped == ["77"] and launched == [1e-4, 1e-4] and any("resuming" in s for s in said)
    run(lr=2e-4)  # other settings: the old run is kept aside, not resumed and not deleted
    assert (tmp_path / "runs" / "seed0" / "fft-fedavg.stale-1" / "metrics.jsonl").is_file()
    assert launched[-1] == 2e-4
    rows, _ = run(lr=2e-4, **{"num-server-rounds": 1})  # fewer rounds than the folder holds
    assert (tmp_path / "runs" / "seed0" / "fft-fedavg.stale-2").is_dir() and len(rows) == 1


def test_generated_test_items_share_no_phrasing_with_train():
    """With numbers, names and other fillers masked, no test item's wording is a train
    item's wording (a shared template would show up here)."""
    import re

    from fl_lota.tasks import GENERATED
    from fl_lota.tasks.base import NAMES
    from fl_lota.tasks.generated import ITEMS, SQL_DOMAINS
    from fl_lota.tasks.generated_text import PLACES, TICKET_LABELS, WORDS

    fillers = set(NAMES) | set(ITEMS) | set(PLACES) | set(WORDS) | set(TICKET_LABELS)
    for domain in SQL_DOMAINS:
        fillers |= {domain[0], domain[1], domain[2], *domain[3], *domain[5], *(c for c, _, _ in domain[4])}

    def skeleton(text: str) -> str:
        text = re.sub(r"\d+", "#", text)
        for f in sorted(fillers, key=len, reverse=True):
            text = text.replace(f, "_")
        return text

    for name in GENERATED:
        if name == "classify":  # its question line is shared on purpose; compare the tickets
            t = get_task(name, n_train=300, n_test=100)
            train = {skeleton(s.prompt.split("\n")[0]) for s in t.train}
            assert not {skeleton(s.prompt.split("\n")[0]) for s in t.test} & train
            continue
        t = get_task(name, n_train=300, n_test=100)
        train = {skeleton(s.prompt) for s in t.train}
        assert not {skeleton(s.prompt) for s in t.test} & train, name
