"""Task suite: determinism, disjoint splits, metrics that reward the reference and punish
corruption, SQL execution match, and the loaders on the real files in ../shared/data."""

import json
from pathlib import Path

import pytest

from fl_lota.tasks import GENERATED, METRICS, REAL, TASKS, Sample, get_task
from fl_lota.tasks.metrics import final_number, sql_execution, sql_results
from fl_lota.tasks.partition import FederationSpec, client_data

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_registry():
    assert set(GENERATED) == {"math", "sql", "classify", "instruct", "summarize"}
    assert set(REAL) == {"gsm8k", "arc_easy", "boolq", "sql_create_context", "samsum"}
    assert set(METRICS) == {"exact_match", "exact_number", "choice", "rouge1", "sql_execution", "sql_exact"}
    with pytest.raises(ValueError, match="unknown task 'maths'"):
        get_task("maths")


@pytest.mark.parametrize("name", GENERATED)
def test_generation_is_deterministic_for_a_seed(name):
    a, b, c = get_task(name, seed=1), get_task(name, seed=1), get_task(name, seed=2)
    assert [(s.prompt, s.answer) for s in a.train + a.test] == [(s.prompt, s.answer) for s in b.train + b.test]
    assert [s.prompt for s in a.test] != [s.prompt for s in c.test]


@pytest.mark.parametrize("name", GENERATED)
def test_train_and_test_do_not_overlap(name):
    t = get_task(name, n_train=256, n_test=64)
    assert len(t.train) == 256 and len(t.test) == 64
    assert not {s.prompt for s in t.train} & {s.prompt for s in t.test}


def _corrupt(task, s: Sample) -> str:
    if task.metric == "exact_number":
        return str(int(s.meta["number"]) + 1)
    if task.metric == "choice":
        return next(c for c in s.meta["choices"] if c != s.meta["label"])
    if task.metric == "sql_execution":
        return "SELECT id FROM nowhere;"
    if task.metric == "rouge1":
        return "completely unrelated words"
    return s.answer + " extra"


@pytest.mark.parametrize("name", GENERATED)
def test_metric_is_one_on_references_and_lower_on_corruptions(name):
    t = get_task(name, n_train=8, n_test=40)
    assert t.score([s.answer for s in t.test])["score"] == 1.0
    assert t.score([_corrupt(t, s) for s in t.test])["score"] < 0.2


@pytest.mark.parametrize("name", GENERATED)
def test_test_items_use_phrasings_no_training_item_uses(name):
    """The same random draws in the two splits give the same answer in other words."""
    import random

    from fl_lota.tasks.generated import GENERATORS

    make = GENERATORS[name][0]
    for i in range(50):
        tr, te = make(random.Random(i), "train"), make(random.Random(i), "test")
        assert tr.answer == te.answer and tr.prompt != te.prompt
    with pytest.raises(ValueError, match="split"):
        make(random.Random(0), "validation")


def test_sql_execution_never_compares_results_on_empty_tables(tmp_path):
    from fl_lota.tasks.metrics import EmptySchemaError

    rows = [
        {"q": f"q{i}", "sql": f"SELECT x FROM t WHERE x > {i}", "schema": "CREATE TABLE t (x INT);"} for i in range(9)
    ]
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EmptySchemaError, match=r"task empty: metric sql_execution .* leaves table\(s\) t without rows"):
        get_task(f"file:{path}?prompt=q&answer=sql&schema=schema&metric=sql_execution")
    # one table with rows does not cover another left empty
    two = "CREATE TABLE a (x INT); INSERT INTO a VALUES (1); CREATE TABLE b (y INT);"
    path.write_text("".join(json.dumps(r | {"schema": two, "sql": "SELECT x FROM a"}) + "\n" for r in rows))
    with pytest.raises(EmptySchemaError, match=r"leaves table\(s\) b without rows"):
        get_task(f"file:{path}?prompt=q&answer=sql&schema=schema&metric=sql_execution")
    # a reference that returns nothing would match every query that returns nothing
    full = "CREATE TABLE t (x INT); INSERT INTO t VALUES (1);"
    path.write_text(
        "".join(json.dumps(r | {"schema": full, "sql": "SELECT x FROM t WHERE x > 5"}) + "\n" for r in rows)
    )
    with pytest.raises(EmptySchemaError, match="returns no rows"):
        get_task(f"file:{path}?prompt=q&answer=sql&schema=schema&metric=sql_execution")
    bare = Sample("", "SELECT x FROM t", {"setup": "CREATE TABLE t (x INT);"})
    with pytest.raises(EmptySchemaError, match="no rows"):
        sql_execution("SELECT x FROM t", bare)  # two queries on empty tables would "match"


def test_generated_sql_filters_always_select_rows():
    t = get_task("sql", n_train=200, n_test=100)
    for s in t.train + t.test:
        assert sql_results(s.answer, s.meta["setup"]) not in (None, [], [(0,)], [(None,)]), s.answer


def test_sql_execution_accepts_equivalent_and_rejects_wrong_queries():
    setup = (
        "CREATE TABLE employees (id INTEGER, name TEXT, department TEXT, salary INTEGER, age INTEGER);"
        "INSERT INTO employees VALUES (1, 'Anna', 'Sales', 50000, 30), (2, 'Ben', 'HR', 40000, 41),"
        "(3, 'Carla', 'Sales', 70000, 25);"
    )
    ref = Sample("", "SELECT name FROM employees WHERE department = 'Sales';", {"setup": setup})
    same = [
        "select e.name from employees as e where e.department='Sales' order by e.id desc",
        "SELECT name FROM employees WHERE department IN ('Sales') AND salary > 0;",
        "```sql\nSELECT name FROM employees WHERE department = 'Sales';\n```\nThis lists them.",
    ]
    for q in same:
        assert sql_execution(q, ref) == 1.0, q
    for q in ["SELECT name FROM employees", "SELECT name FROM employees WHERE age > 26", "DROP TABLE x", "garbage"]:
        assert sql_execution(q, ref) == 0.0, q
    ordered = Sample("", "SELECT name FROM employees ORDER BY salary DESC;", {"setup": setup})
    assert sql_execution("SELECT name FROM employees ORDER BY salary DESC", ordered) == 1.0
    assert sql_execution("SELECT name FROM employees ORDER BY salary", ordered) == 0.0  # order matters here
    assert METRICS["sql_exact"]("select  name from employees where department = 'sales'", ref) == 1.0
    assert sql_results("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT * FROM c", setup) is None


def test_number_and_choice_parsing():
    assert final_number("so 1,234 in total\n#### 1,234") == 1234.0
    assert final_number("She has 3 then 12 apples.") == 12.0
    assert final_number("none") is None
    s = Sample("", "", {"choices": ["answer1", "answer2"], "label": "answer2"})
    assert METRICS["choice"]("the correct answer is answer2", s) == 1.0
    assert METRICS["choice"]("answer1 or answer2", s) == 0.0  # hedging is wrong
    assert METRICS["choice"]("answer22", s) == 0.0


def test_federation_strings():
    spec = FederationSpec.parse("math,sql,classify,instruct")
    assert spec.tasks == ("math", "sql", "classify", "instruct") and spec.num_clients == 4 and spec.alpha is None
    mixed = FederationSpec.parse("math,sql; clients=5; alpha=0.5")
    assert mixed.num_clients == 5 and mixed.alpha == 0.5
    for bad, msg in [
        ("math,sqll", "unknown task"),
        ("math;clients=3", "both"),
        ("math;beta=1", "bad federation option"),
        ("", "empty"),
    ]:
        with pytest.raises(ValueError, match=msg):
            FederationSpec.parse(bad)


def test_one_task_per_client_and_dirichlet_mix():
    c = client_data("math,sql,classify", 1, n_train=16, n_test=4)
    assert c.name == "sql" and len(c.train) == 16
    spec = "math,sql,classify;clients=3;alpha=0.3"
    parts = [client_data(spec, i, n_train=40, n_test=4, seed=3) for i in range(3)]
    assert sum(len(p.train) for p in parts) == 120  # every sample lands exactly once
    again = client_data(spec, 0, n_train=40, n_test=4, seed=3)
    assert [s.prompt for s in again.train] == [s.prompt for s in parts[0].train]
    with pytest.raises(ValueError, match="outside a federation of 3"):
        client_data(spec, 3)


# ------------------------------------------------------------------ real datasets in ../shared


def _need(folder):
    if not (SHARED / folder).is_dir():
        pytest.skip(f"{SHARED / folder} is absent: the real-data loader tests need ../shared/data")
    return str(SHARED / folder)


def test_gsm8k_loader_and_metric():
    t = get_task("gsm8k", source=_need("gsm8k"), n_train=50, n_test=20)
    assert len(t.train) == 50 and len(t.test) == 20 and t.metric == "exact_number"
    assert t.score([s.answer for s in t.test])["score"] == 1.0
    assert t.score([f"The answer is {s.meta['number']:.0f}" for s in t.test])["score"] == 1.0
    assert t.score(["#### 0.5" for _ in t.test])["score"] == 0.0
    first = json.loads((SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert any(s.prompt == first["question"] for s in get_task("gsm8k", source=_need("gsm8k"), n_test=1319).test)


@pytest.mark.parametrize(("name", "folder", "labels"), [("arc_easy", "ARC-Easy", 5), ("boolq", "boolq", 2)])
def test_choice_loaders_and_metric(name, folder, labels):
    t = get_task(name, source=_need(folder), n_train=30, n_test=30)
    assert t.metric == "choice" and len(t.test) == 30
    assert all(s.meta["label"] in s.meta["choices"] for s in t.test)
    assert len(t.test[0].meta["choices"]) == labels
    assert t.score([s.answer for s in t.test])["score"] == 1.0
    assert t.score([s.meta["label"] for s in t.test])["score"] == 1.0
    wrong = [next(c for c in s.meta["choices"] if c != s.meta["label"]) for s in t.test]
    assert t.score(wrong)["score"] == 0.0


def test_missing_local_data_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no train"):
        get_task("gsm8k", source=str(tmp_path))


def test_every_task_name_is_registered_once():
    assert len(TASKS) == len(set(TASKS)) == 10


def test_sql_create_context_and_samsum_from_local_files(tmp_path):
    sql_rows = [
        {
            "question": f"How many heads of dept {i} are older than {50 + i}?",
            "context": "CREATE TABLE head (age INTEGER, dept TEXT)",
            "answer": f"SELECT COUNT(*) FROM head WHERE age > {50 + i}",
        }
        for i in range(12)
    ]
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "train.json").write_text(json.dumps(sql_rows))  # no test file: held out
    t = get_task("sql_create_context", source=str(tmp_path / "sql"), n_train=8, n_test=4)
    assert len(t.test) == 4 and len(t.train) == 8 and not {s.prompt for s in t.train} & {s.prompt for s in t.test}
    # its schemas are CREATE statements only: no execution match on empty tables
    assert t.score([s.answer for s in t.test]) == {"sql_exact": 1.0, "score": 1.0}
    assert t.score(["SELECT age FROM head" for _ in t.test])["sql_exact"] == 0.0

    import csv

    (tmp_path / "sam").mkdir()
    for split in ("train", "test"):
        with open(tmp_path / "sam" / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["dialogue", "summary"])
            w.writeheader()
            for i in range(6):
                w.writerow({"dialogue": f"A: lunch at {i}?\nB: ok", "summary": f"A and B have lunch at {i}."})
    t = get_task("samsum", source=str(tmp_path / "sam"), n_train=6, n_test=3)
    assert t.metric == "rouge1" and len(t.test) == 3
    assert t.score([s.answer for s in t.test])["score"] == pytest.approx(1.0)
