"""Per-sample metrics, one registry: ``METRICS[name](prediction, sample) -> float in [0, 1]``."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

from fl_lota.tasks.base import Sample

__all__ = ["METRICS", "EmptySchemaError", "check_sql_rows", "final_number", "empty_tables", "sql_results"]

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The number after '####' if present (gsm8k), else the last number in ``text``."""
    if "####" in text:
        text = text.split("####")[-1]
    nums = _NUM.findall(text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def exact_match(pred: str, s: Sample) -> float:
    return float(" ".join(pred.split()) == " ".join(s.answer.split()))


def exact_number(pred: str, s: Sample) -> float:
    ref = s.meta.get("number")
    ref = final_number(s.answer) if ref is None else float(ref)
    got = final_number(pred)
    return float(got is not None and ref is not None and abs(got - ref) < 1e-6)


def choice(pred: str, s: Sample) -> float:
    """Right when the reply names exactly one of the choice labels and it is the gold one
    (labels matched as whole words, case-insensitive)."""
    labels = s.meta["choices"]
    found = {lab for lab in labels if re.search(rf"(?<![\w]){re.escape(lab)}(?![\w])", pred, re.I)}
    return float(found == {s.meta["label"]})


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)


def rouge1(pred: str, s: Sample) -> float:
    return _rouge().score(s.answer, pred)["rouge1"].fmeasure


def sql_results(query: str, setup: str, max_steps: int = 200_000) -> list[tuple] | None:
    """Rows ``query`` returns on a fresh in-memory database built by ``setup``; None if it
    fails. A progress handler stops runaway queries."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(setup)
        steps = [0]

        def guard():
            steps[0] += 1
            return 1 if steps[0] > max_steps else 0

        con.set_progress_handler(guard, 1000)
        return con.execute(query.strip().rstrip(";")).fetchall()
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        con.close()


class EmptySchemaError(ValueError):
    """sql_execution asked to compare query results on tables that hold no rows."""


@lru_cache(maxsize=4096)
def empty_tables(setup: str) -> tuple[str, ...] | None:
    """The tables that hold no rows after running ``setup`` (all of them for CREATE-only
    schemas); None when ``setup`` fails to run or creates no table."""
    con = sqlite3.connect(":memory:")
    try:
        con.executescript(setup)
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        if not tables:
            return None
        return tuple(t for t in tables if con.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] == 0)
    except (sqlite3.Error, sqlite3.Warning, ValueError):
        return None
    finally:
        con.close()


def check_sql_rows(task):
    """A task scored by ``sql_execution`` (headline or extra metric) must have rows in every
    table of every item, and reference queries that return rows: on empty tables, or with
    an empty reference result, any query that returns nothing would "match". Returns the
    task; raises EmptySchemaError naming the task and the first bad item."""
    if "sql_execution" not in (task.metric, *task.extra_metrics):
        return task
    for split, samples in (("test", task.test), ("train", task.train)):
        for i, s in enumerate(samples):
            empty = empty_tables(s.meta.get("setup", ""))
            if empty is None or empty:
                what = "creates no table" if empty is None else f"leaves table(s) {', '.join(empty)} without rows"
                raise EmptySchemaError(
                    f"task {task.name}: metric sql_execution compares query results on rows, but the schema of "
                    f"{split} item {i} {what}; add INSERT statements to the schema or score with sql_exact"
                )
            if split == "test" and not sql_results(s.answer, s.meta["setup"]):
                raise EmptySchemaError(
                    f"task {task.name}: the reference query of test item {i} returns no rows ({s.answer[:60]!r}), "
                    "so every query that returns nothing would match it; use metric sql_exact or other items"
                )
    return task


def _rows_equal(a: list[tuple], b: list[tuple], ordered: bool) -> bool:
    def norm(rows):
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in r) for r in rows]

    a, b = norm(a), norm(b)
    return a == b if ordered else Counter(a) == Counter(b)


def sql_execution(pred: str, s: Sample) -> float:
    """Both queries run on the sample's generated rows and return the same result (as a
    multiset, or as a list when the reference orders its rows)."""
    setup = s.meta["setup"]
    if empty_tables(setup):  # never compare results on empty tables (check_sql_rows names the task)
        raise EmptySchemaError(f"sql_execution: a table of the schema holds no rows: {setup[:80]!r}")
    ref = sql_results(s.answer, setup)
    got = sql_results(_first_statement(pred), setup)
    if ref is None or got is None:
        return 0.0
    return float(_rows_equal(got, ref, ordered="order by" in s.answer.lower()))


def _first_statement(text: str) -> str:
    text = text.strip().removeprefix("```sql").removeprefix("```").strip()
    return text.split(";")[0].split("```")[0].strip()


def _sql_norm(q: str) -> str:
    return " ".join(_first_statement(q).lower().replace("\n", " ").split())


def sql_exact(pred: str, s: Sample) -> float:
    return float(_sql_norm(pred) == _sql_norm(s.answer))


METRICS: dict[str, Callable[[str, Sample], float]] = {
    "exact_match": exact_match,
    "exact_number": exact_number,
    "choice": choice,
    "rouge1": rouge1,
    "sql_execution": sql_execution,
    "sql_exact": sql_exact,
}
