"""Before round 1: every task of the federation and the model load, or the run does not
start, with the task or model and the problem named."""

from __future__ import annotations

import re

import pytest
from test_custom_tasks import ROWS, write

from fl_lota.cli import main
from fl_lota.federated.precheck import PrecheckError, check_run
from fl_lota.federated.runconfig import RunConfig

TINY = dict(model="tiny", n_train=8, n_test=2)


def test_a_good_federation_passes(tmp_path):
    f = write(tmp_path / "adder.jsonl", ROWS)
    cfg = RunConfig(federation=f"math,file:{f}?prompt=question&answer=answer&metric=exact_number", **TINY)
    assert check_run(cfg) == []


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("file:{missing}?prompt=question&answer=answer", "task 'missing' cannot be loaded: training file not found"),
        ("file:{good}?prompt=qestion&answer=answer", re.escape("no column 'qestion' (did you mean 'question'?)")),
        ("file:{words}?prompt=question&answer=answer&metric=exact_number", "task 'words' .* holds no number"),
    ],
)
def test_a_broken_task_is_named_before_anything_runs(tmp_path, spec, needle):
    good = write(tmp_path / "adder.jsonl", ROWS)
    rows = [{"question": f"q{i}", "answer": "x"} for i in range(20)]
    write(tmp_path / "words.jsonl", rows)
    spec = spec.format(missing=tmp_path / "missing.jsonl", good=good, words=tmp_path / "words.jsonl")
    cfg = RunConfig(federation=f"math,{spec}", **TINY)
    with pytest.raises(PrecheckError, match=needle):
        check_run(cfg)


def test_a_missing_model_is_named_and_the_server_leaves_client_files_to_clients(tmp_path):
    with pytest.raises(PrecheckError, match="model '/nowhere/model'"):
        check_run(RunConfig(federation="math", model="/nowhere/model", n_train=8, n_test=2))
    away = f"file:{tmp_path / 'on-the-client.jsonl'}?prompt=question&answer=answer&name=remote"
    cfg = RunConfig(federation=f"math,{away}", **TINY)
    assert check_run(cfg, local_only=True) == ["remote"]  # the ServerApp: not here, not its to check
    with pytest.raises(PrecheckError, match="task 'remote'"):
        check_run(cfg)  # the driver on this machine: it must be here


def test_the_command_stops_before_flower_starts(tmp_path, capsys):
    bad = f"file:{tmp_path / 'nope.jsonl'}?prompt=q&answer=a"
    home = tmp_path / "flwr-home"
    assert main(["run", "--set", f"federation=math,{bad}", "--set", "model=tiny", "--flwr-home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "task 'nope' cannot be loaded" in err and "not found" in err
    assert not (home / "fl-lota-ports.json").exists()  # no SuperLink was started for it
    assert main(["compare", "--set", f"federation=math,{bad}", "--plan-only", "--no-estimate"]) == 2
    assert "task 'nope'" in capsys.readouterr().err


def test_a_dirichlet_split_that_leaves_a_client_empty_is_named_before_anything_runs():
    cfg = RunConfig(model="tiny", federation="math,classify;clients=32;alpha=0.5", n_train=16, n_test=4)
    with pytest.raises(PrecheckError, match=r"32 training examples \(16 per task\) over 32 clients .* raise n-train"):
        check_run(cfg, check_model=False)
    check_run(RunConfig(model="tiny", federation="math,classify;clients=4;alpha=0.5", n_train=16, n_test=4))
