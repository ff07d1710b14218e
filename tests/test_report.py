"""Reports: one run's tables and plots from metrics rows, and the fl-lota command's argument
checks (before any run starts)."""

from __future__ import annotations

import json

import pytest

from fl_lota.cli import main, parse_grid, parse_sets
from fl_lota.federated import report
from fl_lota.federated.runconfig import RunConfigError


def row(rnd, method, merge, scores, local, uplink, values_only=0):
    return {
        "round": rnd,
        "method": method,
        "merge": merge,
        "accepted": 2,
        "sampled": 2,
        "values_only_uploads": values_only,
        "uplink_bytes": uplink,
        "downlink_bytes": 10,
        "eval_downlink_bytes": 20,
        "dense_fp32_bytes": 8000,
        "scores": scores,
        "mean_score": {m: sum(s.values()) / len(s) for m, s in scores.items()},
        "normalized": {},
        "local_scores": local,
        "start_scores": {"math": 0.1, "sql": 0.0} if rnd == 1 else {},
        "seconds": {"client_train": 5.0},
        "cumulative_uplink_bytes": uplink * rnd,
        "cumulative_downlink_bytes": 10 * rnd,
        "cumulative_eval_downlink_bytes": 20 * rnd,
    }


def test_run_report_writes_table_and_plots(tmp_path):
    rows = [
        row(1, "lota", "mask_aware", {"mask_aware": {"math": 0.5, "sql": 0.2}}, {"math": 0.6, "sql": 0.4}, 800),
        row(2, "lota", "mask_aware", {"mask_aware": {"math": 0.6, "sql": 0.4}}, {"math": 0.6, "sql": 0.4}, 400, 2),
    ]
    report.write_run_report(tmp_path, rows, wall_seconds=12.0)
    text = (tmp_path / "summary.md").read_text()
    assert "| 2 | 2/2 (2 values-only) | 0.00 | 0.01 | 20.0x |" in text
    assert "| 0 (base model) |" in text and "Wall time 12 s" in text
    # no score is divided by the clients' local models: they are not single-task references
    assert "| normalized" not in text and "a normalized score needs single-task references" in text
    assert "each client's own model after local training (from the global model) | 0.600 | 0.400 |" in text
    assert (tmp_path / "scores.png").stat().st_size > 1000 and (tmp_path / "bytes.png").stat().st_size > 1000


def test_read_rows_names_the_broken_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 1}\n{"round": \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        report.read_rows(p)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        report.read_rows(tmp_path / "missing.jsonl")


def test_grid_and_overrides_are_checked():
    assert parse_grid("lota:mask_aware,ties fft:fedavg") == [("lota", ["mask_aware", "ties"]), ("fft", ["fedavg"])]
    for bad, needle in [("lota", "method:merge"), ("qlora:ties", "qlora"), ("lota:median", "median"), ("", "empty")]:
        with pytest.raises(ValueError, match=needle):
            parse_grid(bad)
    assert parse_sets(["lr=1e-4", "method=fft", "bf16=false"]) == {"lr": 1e-4, "method": "fft", "bf16": False}
    with pytest.raises(RunConfigError, match="sparsty"):
        parse_sets(["sparsty=0.9"])


def test_cli_refuses_a_bad_config_before_starting(capsys, tmp_path):
    assert main(["run", "--set", "sparsity=2.0", "--flwr-home", str(tmp_path)]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["compare", "--grid", "lota:nope"]) == 2
    assert main(["run", "--app", str(tmp_path / "missing")]) == 2
    capsys.readouterr()
    # every tuning candidate, merges' too, is checked before the first run
    assert main(["compare", "--grid", "lota:ties", "--tune", "ties.ties-k=0.2,0", "--plan-only"]) == 2
    assert "ties-k" in capsys.readouterr().err
    assert main(["compare", "--grid", "fft:fedavg", "--tune", "fft.lr=1e-4,-1", "--plan-only"]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert main(["compare", "--set", "seed=3", "--plan-only"]) == 2  # compare sets the seeds itself
    assert "seed" in capsys.readouterr().err


def test_run_report_draws_each_tasks_score_against_its_clients_bytes(tmp_path):
    from fl_lota.federated.report import write_run_report

    def client(name, up, down):
        return {"client": name, "partition": 0, "message_bytes": up, "downlink_bytes": down}

    rows = [
        {
            "round": 1, "method": "lota", "merge": "mask_aware", "start_scores": {"math": 0.1},
            "clients": [client("math", 100, 0)],
            "eval_clients": [{"client": "math", "partition": 0, "downlink_bytes": 40}],
            "scores": {"mask_aware": {"math": 0.3}},
        },
        {
            "round": 2, "method": "lota", "merge": "mask_aware",
            "clients": [client("math", 60, 40)],
            "eval_clients": [{"client": "math", "partition": 0, "downlink_bytes": 50}],
            "scores": {"mask_aware": {"math": 0.5}},
        },
    ]  # fmt: skip
    write_run_report(tmp_path, rows)
    data = json.loads((tmp_path / "score_vs_bytes.json").read_text())
    pts = data["tasks"]["math"]
    assert [(p["round"], p["bytes"], p["score"]) for p in pts] == [(0, 0, 0.1), (1, 140, 0.3), (2, 290, 0.5)]
    assert (pts[2]["uplink"], pts[2]["downlink"], pts[2]["eval_downlink"]) == (160, 40, 90)
    assert (tmp_path / "score_vs_bytes.png").stat().st_size > 1000

    # two clients of the same task (federation "math,math"): set against their mean, not summed
    twin = [dict(r, clients=[*r["clients"], client("math", 1000, 0) | {"partition": 1}]) for r in rows]
    write_run_report(tmp_path / "twin", twin)
    pts = json.loads((tmp_path / "twin" / "score_vs_bytes.json").read_text())["tasks"]["math"]
    assert pts[1]["bytes_of"] == "mean over 2 clients" and pts[1]["uplink"] == (100 + 1000) / 2
