"""The comparison's table from synthetic results with known answers: normalized scores per
seed, labels, budgets, tuned values, intervals, a task at the ceiling."""

from __future__ import annotations

import json
import math

import pytest
from test_compare import TINY, _empty

from fl_lota.compare import ComparePlan, Comparison, TuneSpec, write_comparison
from fl_lota.compare.stats import grid_edges, mean_std, normalized, summarize
from fl_lota.compare.table import tuned_line
from fl_lota.vectors import codec


def _rows(scores: dict[str, float], up: int, down: int, ev: int, merge: str = "mask_aware") -> list[dict]:
    def clients(rnd):
        return [
            {
                "client": t,
                "partition": i,
                "message_bytes": up + i,
                "downlink_bytes": 0 if rnd == 1 else down,
                "fb_passes": 20,
                "train_seconds": 5.0,
            }
            for i, t in enumerate(scores)
        ]

    eval_clients = [{"client": t, "partition": i, "downlink_bytes": ev} for i, t in enumerate(scores)]
    return [
        {"round": 1, "merge": merge, "clients": clients(1), "eval_clients": eval_clients, "scores": {}},
        {"round": 2, "merge": merge, "clients": clients(2), "eval_clients": eval_clients, "scores": {merge: scores}},
    ]


def _results(tmp_path):
    def fed(method, merge, by_seed):
        return {
            str(s): {"rows": _rows(sc, *b, merge=merge), "settings": {"sparse-lr": 1e-4}}
            for s, (sc, b) in by_seed.items()
        }

    return {
        "setup": {
            "model": "tiny",
            "federation": "math,sql",
            "clients": 2,
            "tasks": ["math", "sql"],
            "n_test": {"math": 100, "sql": 100},
            "rounds": 2,
            "local_steps": 20,
            "calibration_steps": 10,
            "batch_size": 8,
            "examples_per_round": 160,
            "seeds": [0, 1],
            "val_size": 64,
            "tuned": True,
        },
        "base": {"math": 0.1, "sql": 0.0},
        "tuning": {"lota": {"chosen": {"sparse-lr": 1e-4}, "candidates": [], "merges": {}}},
        "references": {
            "lota": {
                "0": {"scores": {"math": 0.5, "sql": 0.8}, "passes": {"math": 40}, "train_seconds": {"math": 9.0}},
                "1": {"scores": {"math": 0.4, "sql": 1.0}, "passes": {"math": 40}, "train_seconds": {"math": 9.0}},
            },
            "fft": {
                "0": {"scores": {"math": 1.0, "sql": 0.0}, "passes": {"math": 40}, "train_seconds": {"math": 9.0}},
                "1": {"scores": {"math": 1.0, "sql": 0.5}, "passes": {"math": 40}, "train_seconds": {"math": 9.0}},
            },
        },
        "federations": {
            "lota:mask_aware": fed(
                "lota",
                "mask_aware",
                {
                    0: ({"math": 0.5, "sql": 0.4}, (2_000_000, 6_000_000, 6_100_000)),
                    1: ({"math": 0.2, "sql": 0.5}, (2_000_000, 6_000_000, 6_100_000)),
                },
            ),
            "fft:fedavg": {
                "0": {"rows": _rows({"math": 0.5, "sql": 0.2}, 9, 9, 9, merge="fedavg")},
                "1": {"rows": None, "error": "failed"},
            },
        },
    }


def test_normalized_divides_by_the_same_methods_single_task_model_seed_by_seed(tmp_path):
    results = _results(tmp_path)
    s = summarize(results)
    lota = s["lota:mask_aware"]
    assert lota["scores"]["math"] == [0.5, 0.2]
    # seed 0: (0.5/0.5 + 0.4/0.8) / 2 = 0.75; seed 1: (0.2/0.4 + 0.5/1.0) / 2 = 0.5
    assert lota["normalized"]["mean"] == pytest.approx([0.75, 0.5])
    m, sd, n = mean_std(lota["normalized"]["mean"])
    assert (m, n) == (pytest.approx(0.625), 2) and sd == pytest.approx(math.sqrt(2 * 0.125**2))
    fft = s["fft:fedavg"]
    assert fft["failed"] == ["1"] and fft["normalized"]["mean"] == [0.5]  # sql's reference is 0: left out
    # a seed whose last round lacks a task's score (a client failed to evaluate) is left out
    # whole, with the reason, instead of averaging the tasks that remain
    cut = _results(tmp_path)
    rows = cut["federations"]["lota:mask_aware"]["1"]["rows"]
    del rows[-1]["scores"]["mask_aware"]["sql"]
    partial = summarize(cut)["lota:mask_aware"]
    assert partial["seeds"] == ["0"] and partial["why"]["1"] == "no score for sql in round 2"
    rows.pop()
    assert summarize(cut)["lota:mask_aware"]["why"]["1"] == "ended after round 1 of 2"
    assert normalized({"a": 0.3, "b": 0.2}, {"a": 0.6, "b": 0.0}) == {"a": 0.5, "mean": 0.5}
    # bytes per client and round, both directions; round 1's empty downlink is not averaged in
    assert lota["uplink_r1"] == [2_000_000, 2_000_001] * 2
    assert lota["downlink_later"] == [6_000_000] * 4
    assert lota["eval_downlink"] == [6_100_000] * 8
    assert lota["passes"] == [40] * 4  # per client, whole run


def test_comparison_table_carries_labels_budget_tuned_values_and_intervals(tmp_path):
    md = write_comparison(tmp_path, _results(tmp_path)).read_text()
    assert "**Budget**: every method trains 20 optimizer steps x batch 8 = 160 examples" in md
    assert "LoTA's 10 calibration steps are part of its first round's 20" in md
    assert "| base model | - | 0.100 | 0.000 | 0.050 |" in md
    assert "| lota | sparse-lr=0.0001 | 0.450 ± 0.071 | 0.900 ± 0.141 |" in md
    assert (
        "| lota | mask_aware | sparse-lr=0.0001 | 0.350 ± 0.212 | 0.450 ± 0.071 | 0.400 ± 0.071 | 0.625 ± 0.177 |" in md
    )
    assert "left out: seed 1 (failed)" in md and "| fft | fedavg | lr=5e-05 |" not in md
    assert "| 0.500 (n=1) |" in md  # fewer seeds than planned are shown, not hidden
    assert "Left out of `normalized` where a single-task model scored 0: sql" in md
    assert "| lota | mask_aware | 2 | sql | 2.00 | 6.00 | 6.10 |" in md
    assert "validation split of 64 examples held out of each task's training split (never the test split)" in md
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["summary"]["lota:mask_aware"]["normalized"]["mean"] == pytest.approx([0.75, 0.5])
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_a_value_chosen_at_the_end_of_its_grid_is_flagged(tmp_path):
    def rows(*settings, means=None):
        return [{"setting": s, "val": {}, "mean": (means or {}).get(i, 0.0)} for i, s in enumerate(settings)]

    def edges(grid, chosen):  # ``chosen`` the one best candidate
        return grid_edges([r | {"mean": float(r["setting"] == chosen)} for r in grid], chosen)

    grid = rows(*({"lr": lr, "lora-rank": r} for lr in (1e-4, 2e-4, 1e-3) for r in (8, 16, 32)))
    assert edges(grid, {"lr": 2e-4, "lora-rank": 32}) == {"lora-rank": "largest"}
    assert edges(grid, {"lr": 1e-4, "lora-rank": 8}) == {"lr": "smallest", "lora-rank": "smallest"}
    assert edges(grid, {"lr": 2e-4, "lora-rank": 16}) == {}
    # of two values the chosen one is always at an end: that says nothing
    assert edges(rows({"lr": 1e-4}, {"lr": 2e-4}), {"lr": 1e-4}) == {}
    # a tie with a value inside the grid: the tie, not the grid, put the choice at the end
    k = rows({"ties-k": 0.1}, {"ties-k": 0.2}, {"ties-k": 0.4}, means={0: 0.7, 1: 0.7, 2: 0.6})
    assert grid_edges(k, {"ties-k": 0.1}) == {}
    k[1]["mean"] = 0.5
    assert grid_edges(k, {"ties-k": 0.1}) == {"ties-k": "smallest"}
    assert edges(rows({"m": "a"}, {"m": "b"}, {"m": "c"}), {"m": "a"}) == {}  # not a number: no order
    entry = {
        "chosen": {"lr": 2.5e-5},
        "candidates": rows({"lr": 2.5e-5}, {"lr": 5e-5}, {"lr": 1e-4}, means={0: 0.9}),
        "merges": {
            "ties": {
                "chosen": {"merge-lam": 1.4},
                "candidates": rows({"merge-lam": 0.8}, {"merge-lam": 1.0}, {"merge-lam": 1.4}, means={2: 0.9}),
            }
        },
    }
    assert tuned_line("fft", entry) == (
        "tuned fft: lr=2.5e-05; fft+ties: merge-lam=1.4 (at the edge of a grid: fft lr=2.5e-05 (the smallest "
        "tried); fft+ties merge-lam=1.4 (the largest tried))"
    )
    results = _results(tmp_path)
    results["tuning"]["fft"] = entry
    md = write_comparison(tmp_path, results).read_text()
    assert "**Chosen at the edge of the grid** (a value past it might score higher): fft lr=2.5e-05 (the smallest" in md
    entry["chosen"], entry["merges"] = {"lr": 5e-5}, {}
    md = write_comparison(tmp_path, results).read_text()
    assert "Chosen at the edge" not in md


def test_a_task_at_the_ceiling_is_named(tmp_path):
    results = _results(tmp_path)
    for by_seed in results["references"].values():
        for v in by_seed.values():
            v["scores"]["math"] = 1.0
    assert (
        "**At the ceiling** (every method's single-task model scores 1.000): math."
        in write_comparison(tmp_path, results).read_text()
    )


def test_score_against_bytes_per_method_and_merge(tmp_path):
    write_comparison(tmp_path, _results(tmp_path))
    curves = json.loads((tmp_path / "compare_score_vs_bytes.json").read_text())
    base, r2 = curves["lota:mask_aware"]["points"]
    assert (base["round"], base["bytes_per_client"], base["score"]) == (0, 0, pytest.approx(0.05))
    # round 2, per client: 2 uplinks + round 2's downlink + 2 evaluation downlinks; the
    # score is the task average, mean ± std over the 2 seeds
    assert r2["round"] == 2 and r2["n"] == 2
    assert (r2["min"], r2["bytes_per_client"], r2["max"]) == (22_200_000, 22_200_001, 22_200_002)
    assert r2["score"] == pytest.approx(0.4) and r2["score_sd"] == pytest.approx(math.sqrt(2 * 0.05**2))
    fft = curves["fft:fedavg"]["points"][-1]
    assert (fft["bytes_per_client"], fft["score"], fft["n"]) == (46, pytest.approx(0.35), 1)  # the failed seed is out
    assert (tmp_path / "compare_score_vs_bytes.png").stat().st_size > 1000


def test_the_table_names_the_machines_its_units_ran_on(tmp_path, monkeypatch):
    """Every unit records its machine (bf16 numerics differ between CPUs with and without
    bf16 instructions); a comparison carried over machines says so in its table."""
    import torch

    from fl_lota.compare import runner
    from fl_lota.training import device

    where = iter(["cpu A (amx_bf16; 2 cores), torch 2", "cpu B (avx512_bf16; 2 cores), torch 2"] * 4)

    def fake_unit(cfg, part, task, *, vector_path=None):
        if vector_path is not None:
            vector_path.parent.mkdir(parents=True, exist_ok=True)
            vector_path.write_bytes(codec.encode(_empty()))
        unit = {"scores": {task.name: 0.5}, "passes": 6, "examples": 24, "train_seconds": 1.0, "eval_seconds": 0.1}
        return unit | {"machine": next(where)}

    monkeypatch.setattr(runner, "isolated_unit", fake_unit)
    spec = TuneSpec.parse("lota.sparse-lr=1e-4")
    plan = ComparePlan(app=None, base=dict(TINY), grid=[("lota", ["mask_aware"])], seeds=[0], tune=spec)
    cmp = Comparison(plan, tmp_path, log=lambda s: None)
    cmp.tune()
    assert cmp.results["setup"]["machines"] == {
        "cpu A (amx_bf16; 2 cores), torch 2": 1,
        "cpu B (avx512_bf16; 2 cores), torch 2": 1,
    }
    results = _results(tmp_path)
    results["setup"]["machines"] = cmp.results["setup"]["machines"]
    md = write_comparison(tmp_path, results).read_text()
    assert "**Machines**" in md and "so this table mixes them" in md and "cpu A (amx_bf16" in md
    # what this machine records: its CPU (or GPU) and torch
    here = device.machine(device.resolve("cpu"))
    assert here.startswith("cpu ") and here.endswith(f"torch {torch.__version__}")
