"""Task suite: one registry of generated and real tasks, each with its own metric.

``get_task(name, n_train=, n_test=, seed=, source=)`` returns a Task with a seeded train/test
split that never overlaps. Generated: math, sql, classify, instruct, summarize. Real (hub
name or local files via ``source``): gsm8k, arc_easy, boolq, sql_create_context, samsum.
"""

from __future__ import annotations

import random

from fl_lota.tasks.base import Sample, Task, unique_split
from fl_lota.tasks.custom import TaskSpecError, is_spec, load_custom, parse_spec
from fl_lota.tasks.generated import GENERATORS
from fl_lota.tasks.metrics import METRICS, check_sql_rows
from fl_lota.tasks.real import CONVERTERS, load_rows

__all__ = [
    "GENERATED",
    "METRICS",
    "REAL",
    "TASKS",
    "Sample",
    "Task",
    "TaskSpecError",
    "check_task",
    "get_task",
    "task_label",
]

GENERATED = tuple(GENERATORS)
REAL = tuple(CONVERTERS)
TASKS = GENERATED + REAL


def check_task(name: str) -> None:
    """Fail now, without reading any data, on a name that is neither a known task nor a
    well-formed ``file:`` / ``hf:`` spec (fl_lota.tasks.custom)."""
    if is_spec(name):
        parse_spec(name)
    elif name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}, or a file:/hf: task spec")


def task_label(name: str) -> str:
    """The name a task goes by in reports (a spec's ``name=`` or file stem)."""
    return parse_spec(name).label if is_spec(name) else name


def get_task(name: str, *, n_train: int = 256, n_test: int = 100, seed: int = 0, source: str | None = None) -> Task:
    """A built-in task by name, or a custom one from a ``file:`` / ``hf:`` spec. Generated
    tasks draw train and test items from disjoint phrasings (``tasks.generated``)."""
    if is_spec(name):
        return check_sql_rows(load_custom(name, n_train=n_train, n_test=n_test, seed=seed))
    if name in GENERATORS:
        make, metric, extra, max_new = GENERATORS[name]
        rng_train, rng_test = random.Random(f"{name}:{seed}:train"), random.Random(f"{name}:{seed}:test")
        train, test = unique_split(lambda: make(rng_train, "train"), lambda: make(rng_test, "test"), n_train, n_test)
        return Task(name, metric, train, test, extra, max_new)
    if name in CONVERTERS:
        convert, metric, extra, max_new = CONVERTERS[name]
        train_rows = load_rows(name, source, "train")
        try:
            test_rows = load_rows(name, source, "test")
        except (FileNotFoundError, ValueError):
            test_rows = None
        rng = random.Random(f"{name}:{seed}")
        if test_rows is None:  # hold out deterministically from train
            rng.shuffle(train_rows)
            test_rows, train_rows = train_rows[:n_test], train_rows[n_test:]
        train = [convert(r) for r in rng.sample(train_rows, min(n_train, len(train_rows)))]
        test_pick = rng.sample(range(len(test_rows)), min(n_test, len(test_rows)))
        test = [convert(test_rows[i]) for i in sorted(test_pick)]
        seen = {s.prompt for s in test}
        train = [s for s in train if s.prompt not in seen]
        if not train or not test:
            raise ValueError(f"task {name}: empty {'train' if not train else 'test'} split")
        return check_sql_rows(Task(name, metric, train, test, extra, max_new))
    raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
