"""End to end through Flower's own command line: ``flwr run sims/heterogeneous_tasks`` with
the tiny model (2 clients, 2 rounds), on a private local SuperLink that is stopped after."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fl_lota.cli import main as cli_main
from fl_lota.federated.launch import RunFailed, launch
from fl_lota.federated.report import read_rows
from fl_lota.training.data import client_stream_seed, stream_order

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "sims" / "heterogeneous_tasks"
TINY = APP / "conf" / "tiny.toml"
FED = {"num-supernodes": 2}


def test_flwr_run_tiny_federation(flwr_home, tmp_path):
    out = tmp_path / "results"
    outcome = launch(
        APP, config_file=TINY, run_config={"results-dir": str(out)}, federation_config=FED, flwr_home=flwr_home
    )
    assert outcome.status == "finished:completed"
    rows = read_rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert r["accepted"] == 2 and not r["rejected"] and not r["failures"]
        payloads = [c["payload_bytes"] for c in r["clients"]]
        # the bytes on the Flower messages are the encoded payloads (plus the 4-byte key)
        assert r["uplink_payload_bytes"] == sum(payloads)
        assert r["uplink_array_bytes"] == sum(payloads) + 4 * len(payloads)
        assert r["uplink_bytes"] >= r["uplink_array_bytes"]
        assert r["downlink_bytes"] > 0 and r["eval_downlink_bytes"] > 0
        assert set(r["scores"]["mask_aware"]) == {"math", "classify"}
        # the ServerApp's memory: the round's own peak, at least what it held at the end
        # (within the kernel's per-thread batching of RSS counts)
        mem = r["server_memory_mb"]
        if sys.platform.startswith("linux"):
            assert mem["rss"] > 100 and mem["peak"] >= mem["rss"] - 16
    # tiny.toml's clients generate in float32 (bf16 off), and say so
    assert {c["eval_precision"] for r in rows for c in r["eval_clients"]} == {"float32"}
    r1, r2 = rows
    # each round reads on through the client's example stream; the record lists the examples
    per_round = 3 * 4  # local-steps x batch-size of tiny.toml
    for c1, c2 in zip(*(sorted(r["clients"], key=lambda c: c["partition"]) for r in rows), strict=True):
        s1, s2 = c1["examples_seen"], c2["examples_seen"]
        assert (s1["stream_start"], s1["stream_end"], s2["stream_start"]) == (0, per_round, per_round)
        assert s1["indices"] == stream_order(16, client_stream_seed(0, c1["partition"]), 0, per_round)
        assert s2["indices"] == stream_order(16, client_stream_seed(0, c2["partition"]), per_round, per_round)
        assert set(s1["indices"]) | set(s2["indices"]) == set(range(16))
        assert c1["fb_passes"] == c2["fb_passes"] == 3  # LoTA's calibration step is part of round 1's 3
    assert not any(c["values_only"] for c in r1["clients"])
    assert all(c["values_only"] for c in r2["clients"])
    size1 = {c["partition"]: c["payload_bytes"] for c in r1["clients"]}
    assert all(c["payload_bytes"] < size1[c["partition"]] for c in r2["clients"])
    assert r2["cumulative_uplink_bytes"] == r1["uplink_bytes"] + r2["uplink_bytes"]
    for name in ("summary.md", "scores.png", "bytes.png", "config.json", "global_update.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert "| 2 | 2/2 (2 values-only)" in (out / "summary.md").read_text()
    # what the run made, exported: plain transformers loads base + G
    assert sorted(p.name for p in (out / "client_updates").iterdir() if not p.name.startswith(".")) == [
        "p0-math.safetensors",
        "p1-classify.safetensors",
    ]
    assert cli_main(["export", str(out), "--out", str(tmp_path / "model")]) == 0
    from transformers import AutoModelForCausalLM

    from fl_lota.training.models import load
    from fl_lota.vectors.task_vector import SparseTaskVector

    ids = torch.tensor([[1, 50, 60, 70]])
    model, _ = load("tiny")
    SparseTaskVector.load(out / "global_update.safetensors").apply_to(model)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "model")(ids).logits, model(ids).logits)


def test_a_failed_run_is_reported_with_flowers_reason(flwr_home, tmp_path, capsys):
    with pytest.raises(RunFailed, match="results-dir"):
        launch(
            APP,
            config_file=TINY,
            run_config={"results-dir": "relative/path"},
            federation_config=FED,
            flwr_home=flwr_home,
        )
    # the README's command: a run in which one client fails every round is a failed run (its
    # task would be missing from the summary), exits non-zero and says which node and why
    app = _faulty_app(tmp_path, {1, 2})
    argv = ["run", "--app", str(app), "--conf", str(TINY), "--flwr-home", str(flwr_home)]
    assert cli_main([*argv, "--set", f"results-dir={tmp_path / 'results'}"]) == 2
    err = capsys.readouterr().err
    assert "ended as finished:failed" in err and "every upload failed or was refused" in err
    assert "injected failure in round 2" in err  # the last reason recorded for that node
    rows = read_rows(tmp_path / "results" / "metrics.jsonl")
    assert [r["accepted"] for r in rows] == [1, 1]  # the other client's rounds are kept


def test_compare_runs_each_merge_as_its_own_federation_and_resumes_with_the_venv_not_on_path(
    own_flwr_home, tmp_path, capsys, monkeypatch
):
    # fl-lota called from a venv that is not activated (its bin folder not on PATH): flwr
    # must still find flower-superlink, which it starts by name. A SuperLink of its own (the
    # module's may already run, and then nothing would be started)
    monkeypatch.setenv("PATH", os.defpath)
    out = tmp_path / "cmp"
    argv = ["compare", "--app", str(APP), "--conf", str(TINY), "--grid", "lota:mask_aware,ties fft:fedavg"]
    argv += ["--no-tune", "--no-estimate", "--out", str(out), "--flwr-home", str(own_flwr_home)]
    # what a crash after round 1 leaves behind: checkpoints, no finished record
    assert cli_main([*argv, "--seeds", "1", "--set", "num-server-rounds=1"]) == 0
    first = read_rows(out / "runs" / "seed0" / "lota-mask_aware" / "metrics.jsonl")
    capsys.readouterr()
    assert cli_main([*argv, "--seeds", "2"]) == 0
    log = capsys.readouterr().out
    assert log.count("resuming from its checkpoint") == 3 and log.count("flwr run ->") == 6
    rows = read_rows(out / "runs" / "seed0" / "lota-mask_aware" / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and _comparable(rows[:1]) == _comparable(first)
    assert all(c["values_only"] for c in rows[1]["clients"])  # the clients kept their masks across the cut
    for seed in (0, 1):
        for run, merge in (("lota-mask_aware", "mask_aware"), ("lota-ties", "ties"), ("fft-fedavg", "fedavg")):
            cfg = json.loads((out / "runs" / f"seed{seed}" / run / "config.json").read_text())
            assert (cfg["merge"], cfg["eval_merges"], cfg["seed"]) == (merge, "", seed)  # its own federation
            r = read_rows(out / "runs" / f"seed{seed}" / run / "metrics.jsonl")[-1]
            assert list(r["scores"]) == [merge] and r["remerged"] == []
        for method in ("lota", "fft"):
            for task in ("0-math", "1-classify"):
                assert (out / "reference" / f"seed{seed}" / method / f"{task}.json").is_file()
    data = json.loads((out / "compare.json").read_text())
    assert set(data["summary"]) == {"lota:mask_aware", "lota:ties", "fft:fedavg"}
    assert all(e["seeds"] == ["0", "1"] for e in data["summary"].values())
    md = (out / "compare.md").read_text()
    assert "| lota | ties |" in md and "each method x merge is its own federation" in md
    # a third call finds everything done
    assert cli_main([*argv, "--seeds", "2"]) == 0
    log = capsys.readouterr().out
    assert "flwr run ->" not in log and log.count("stored run reused") == 6


def test_default_model_from_an_empty_cache_through_the_readme_command(own_flwr_home, tmp_path, monkeypatch):
    """The README's first command on a fresh machine: the embedded model is converted by
    the apps themselves (the ServerApp builds its shapes from it), and the run completes."""
    cache, out = tmp_path / "model-cache", tmp_path / "results"
    monkeypatch.setenv("FL_LOTA_CACHE", str(cache))
    sets = {
        "federation": "math,classify",
        "num-server-rounds": 1,
        "calibration-steps": 1,
        "local-steps": 2,
        "batch-size": 2,
        "n-train": 8,
        "n-test": 4,
        "max-len": 96,
        "eval-base": "false",
        "results-dir": str(out),
    }
    rc = cli_main(
        ["run", "--app", str(APP), "--flwr-home", str(own_flwr_home), *(f"--set={k}={v}" for k, v in sets.items())]
    )
    assert rc == 0
    assert (cache / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    (row,) = read_rows(out / "metrics.jsonl")
    assert row["accepted"] == 2 and set(row["scores"]["mask_aware"]) == {"math", "classify"}
    assert json.loads((out / "config.json").read_text())["model"] == "default"


def test_flwr_run_with_custom_task_files(flwr_home, tmp_path):
    from test_custom_tasks import CHOICE, ROWS, write

    adder = write(tmp_path / "adder.jsonl", ROWS)
    tickets = write(tmp_path / "tickets.csv", CHOICE)
    federation = (
        f"file:{adder}?prompt=question&answer=answer&metric=exact_number,"
        f"file:{tickets}?prompt=text&answer=team&metric=choice&name=router"
    )
    out = tmp_path / "results"
    launch(
        APP,
        config_file=TINY,
        run_config={"results-dir": str(out), "federation": federation, "num-server-rounds": 1},
        federation_config=FED,
        flwr_home=flwr_home,
    )
    (row,) = read_rows(out / "metrics.jsonl")
    assert sorted(c["client"] for c in row["clients"]) == ["adder", "router"]
    assert set(row["scores"]["mask_aware"]) == {"adder", "router"}
    assert all(0.0 <= v <= 1.0 for v in row["scores"]["mask_aware"].values())


FAULTY = """
from flwr.clientapp import ClientApp

FAIL_ROUNDS = {rounds}

from clients import app as real

app = ClientApp()


@app.train()
def train(msg, context):
    server_round = int(msg.content["config"]["server-round"])
    if int(context.node_config["partition-id"]) == 1 and server_round in FAIL_ROUNDS:
        raise RuntimeError(f"injected failure in round {server_round}")
    return real.train(msg, context)


@app.evaluate()
def evaluate(msg, context):
    return real.evaluate(msg, context)
"""


def _faulty_app(tmp_path: Path, rounds: set[int]) -> Path:
    """The app with a ClientApp whose partition 1 raises in ``rounds``."""
    app = tmp_path / "faulty_app"
    app.mkdir()
    text = (APP / "pyproject.toml").read_text().replace('"clients.app:app"', '"faulty_client:app"')
    (app / "pyproject.toml").write_text(text.replace('name = "heterogeneous-tasks"', 'name = "faulty-app"'))
    (app / "faulty_client.py").write_text(FAULTY.replace("{rounds}", repr(rounds)))
    return app


DOWNLINK = ("downlink_bytes", "downlink_by_node", "cumulative_downlink_bytes")


def _comparable(rows: list[dict], resumed_at: int | None = None) -> list[dict]:
    """Rows without what differs between processes: timings, memory and Flower node ids. From round
    ``resumed_at`` on, without the training downlink: the nodes of a resumed run hold no G
    that the server knows of, so its first round sends each the whole of G."""
    out = []
    for r in rows:
        drop = ("seconds", "server_memory_mb", "failures", "rejected")
        drop += DOWNLINK if resumed_at and r["round"] >= resumed_at else ()
        r = {k: v for k, v in r.items() if k not in drop}
        r["downlink_by_node"] = sorted(r.get("downlink_by_node", {}).values())
        r["clients"] = sorted(
            (
                {k: v for k, v in c.items() if not k.endswith("seconds") and k not in ("node", "metrics", *drop)}
                for c in r["clients"]
            ),
            key=lambda c: c["partition"],
        )
        r["eval_clients"] = sorted(
            ({k: v for k, v in c.items() if k not in ("node", "eval_seconds")} for c in r.get("eval_clients", [])),
            key=lambda c: c["partition"],
        )
        out.append(r)
    return out
