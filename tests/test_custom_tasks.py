"""Bring-your-own tasks: file:/hf: specs in JSONL, JSON, CSV and Parquet, their metrics,
held-out splits, prompt formatting, and the errors users meet first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fl_lota.federated.runconfig import RunConfig, RunConfigError
from fl_lota.tasks import get_task, task_label
from fl_lota.tasks.custom import TaskSpecError
from fl_lota.tasks.partition import FederationSpec, client_data
from fl_lota.tasks.prompting import format_prompt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

ROWS = [{"question": f"What is {i} plus {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}"} for i in range(40)]
CHOICE = [
    {"text": f"Ticket {i}: my {'card was charged twice' if i % 2 else 'parcel is late'}", "team": "B" if i % 2 else "A"}
    for i in range(30)
]


def write(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    df = pd.DataFrame(rows)
    {
        ".jsonl": lambda: path.write_text("".join(json.dumps(r) + "\n" for r in rows)),
        ".json": lambda: path.write_text(json.dumps(rows)),
        ".csv": lambda: df.to_csv(path, index=False),
        ".parquet": lambda: df.to_parquet(path),
    }[path.suffix]()
    return path


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_format_gives_the_same_task(tmp_path, ext):
    train = write(tmp_path / f"train{ext}", ROWS[:30])
    test = write(tmp_path / f"test{ext}", ROWS[30:])
    task = get_task(f"file:{train}?test={test}&prompt=question&answer=answer&metric=exact_number", n_train=100)
    assert task.name == "train" and task.metric == "exact_number"
    assert len(task.train) == 30 and len(task.test) == 10
    assert {s.prompt for s in task.test} == {r["question"] for r in ROWS[30:]}
    s = task.test[0]
    assert task.score([f"so it is {s.meta['number']:.0f}"], [s])["score"] == 1.0
    assert task.score(["no idea"], [s])["score"] == 0.0


def test_test_split_is_held_out_deterministically(tmp_path):
    f = write(tmp_path / "all.jsonl", ROWS)
    spec = f"file:{f}?prompt=question&answer=answer&test_fraction=0.25&name=adder"
    a, b = get_task(spec, seed=1), get_task(spec, seed=1)
    c = get_task(spec, seed=2)
    assert a.name == "adder" and len(a.test) == 10 and len(a.train) == 30
    assert [s.prompt for s in a.test] == [s.prompt for s in b.test]
    assert [s.prompt for s in a.test] != [s.prompt for s in c.test]
    assert not {s.prompt for s in a.test} & {s.prompt for s in a.train}


def test_template_instruction_and_raw_prompts(tmp_path):
    f = write(tmp_path / "t.csv", CHOICE)
    task = get_task(
        f"file:{f}?template=Route this%3A {{text}}&instruction=You are a router.&answer=team&metric=choice&chat=false"
    )
    s = task.train[0]
    assert s.prompt.startswith("You are a router.\n\nRoute this: Ticket ")
    assert s.meta["choices"] == ["A", "B"] and s.meta["chat"] is False
    assert task.score([f"Team {s.meta['label']}."], [s])["score"] == 1.0
    assert task.score(["A or B"], [s])["score"] == 0.0  # naming both is not an answer

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, msgs, **kw):
            return "<chat>" + msgs[0]["content"]

    assert format_prompt(Tok(), "hi", chat=False) == "hi\nAnswer: "
    assert format_prompt(Tok(), "hi") == "<chat>hi"


def test_choices_column_and_sql_execution(tmp_path):
    rows = [{"q": f"pick {i}", "opts": "answer1,answer2,answer3", "gold": f"answer{1 + i % 3}"} for i in range(12)]
    task = get_task(f"file:{write(tmp_path / 'c.jsonl', rows)}?prompt=q&answer=gold&choices=opts&metric=choice")
    assert task.train[0].meta["choices"] == ["answer1", "answer2", "answer3"]
    schema = "CREATE TABLE t (x INT); INSERT INTO t VALUES (1), (2), (3);"
    sql = [{"q": f"rows above {i}", "sql": f"SELECT x FROM t WHERE x > {i % 3}", "schema": schema} for i in range(10)]
    task = get_task(f"file:{write(tmp_path / 's.jsonl', sql)}?prompt=q&answer=sql&schema=schema&metric=sql_execution")
    s = task.test[0]
    assert task.score([s.answer.replace("x >", "t.x >")], [s])["score"] == 1.0


def test_specs_work_in_federations_and_run_configs(tmp_path):
    f = write(tmp_path / "adder.jsonl", ROWS)
    spec = f"file:{f}?prompt=question&answer=answer&metric=exact_number"
    fed = FederationSpec.parse(f"math,{spec}")
    assert fed.num_clients == 2 and task_label(fed.tasks[1]) == "adder"
    data = client_data(fed, 1, n_train=8, n_test=4)
    assert data.name == "adder" and len(data.train) == 8
    with pytest.raises(RunConfigError, match="unknown metric 'bleu'"):
        RunConfig(federation=f"math,file:{f}?prompt=question&answer=answer&metric=bleu")


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("file:/x.jsonl?prompt=q&answr=a", "'answr' (did you mean 'answer'?)"),
        ("file:/x.jsonl?prompt=q", "answer=<column>"),
        ("file:/x.jsonl?prompt=q&template={q}&answer=a", "exactly one of"),
        ("file:/x.jsonl?prompt=q&answer=a&metric=bleu", "known: exact_match"),
        ("file:x.jsonl?prompt=q&answer=a", "absolute"),
        ("file:/x.jsonl?prompt=q&answer=a&test_fraction=2", "test_fraction"),
        ("file:/x.jsonl?prompt=q&answer=a&metric=sql_execution", "schema"),
        ("file:/x.jsonl?template=no placeholders&answer=a", "placeholders"),
        ("s3:/x.jsonl?prompt=q&answer=a", "unknown task"),
    ],
)
def test_spec_syntax_errors_name_the_problem(spec, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        get_task(spec)


def test_data_errors_name_the_problem(tmp_path):
    f = write(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        get_task(f"file:{tmp_path / 'missing.jsonl'}?prompt=question&answer=answer")
    with pytest.raises(
        TaskSpecError, match=r"no column 'questoin' \(did you mean 'question'\?\); columns: question, answer"
    ):
        get_task(f"file:{f}?prompt=questoin&answer=answer")
    with pytest.raises(TaskSpecError, match="no column 'body'"):
        get_task(f"file:{f}?template={{body}}&answer=answer")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TaskSpecError, match="empty"):
        get_task(f"file:{tmp_path / 'empty.jsonl'}?prompt=question&answer=answer")
    words = write(tmp_path / "w.jsonl", [{"q": f"q{i}", "a": "many" if i == 3 else str(i)} for i in range(10)])
    with pytest.raises(TaskSpecError, match=r"row .* answer 'many' holds no number"):
        get_task(f"file:{words}?prompt=q&answer=a&metric=exact_number")
    opts = write(tmp_path / "o.jsonl", [{"q": f"q{i}", "o": "A,B", "a": "C" if i == 5 else "A"} for i in range(10)])
    with pytest.raises(TaskSpecError, match="'C' is not one of the choices"):
        get_task(f"file:{opts}?prompt=q&answer=a&choices=o&metric=choice")


def test_single_task_command_takes_a_spec(tmp_path, capsys):
    from fl_lota.tune import main

    f = write(tmp_path / "adder.jsonl", ROWS)
    spec = f"file:{f}?prompt=question&answer=answer&metric=exact_number"
    out = main(["--model", "tiny", "--task", spec, "--steps", "1", "--calibration-steps", "1", "--batch-size", "4",
                "--n-train", "8", "--n-test", "2", "--no-bf16", "--json", "--device", "cpu"])  # fmt: skip
    assert out["task"] == "adder" and out["metric"] == "exact_number" and 0.0 <= out["tuned"] <= 1.0
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--task", f"file:{f}?prompt=q&answer=answer"])
    assert e.value.code == 2 and "no column 'q'" in capsys.readouterr().err


@pytest.mark.skipif(not (SHARED / "gsm8k").is_dir(), reason="../shared/data not present")
def test_readme_examples_on_the_shared_data():
    gsm = get_task(
        f"file:{SHARED}/gsm8k/train.jsonl?test={SHARED}/gsm8k/test.jsonl&prompt=question&answer=answer"
        "&metric=exact_number&name=gsm8k",
        n_train=16,
        n_test=8,
    )
    assert gsm.test[0].meta["number"] == float(gsm.test[0].answer.split("####")[-1].replace(",", ""))
    arc = get_task(
        f"file:{SHARED}/ARC-Easy/train.json?test={SHARED}/ARC-Easy/test.json&prompt=instruction&answer=answer"
        "&metric=choice&name=arc",
        n_train=16,
        n_test=8,
    )
    assert set(arc.test[0].meta["choices"]) >= {"answer1", "answer2", "answer3", "answer4"}
    s = arc.test[0]
    assert arc.score([f"the correct answer is {s.meta['label']}"], [s])["score"] == 1.0
