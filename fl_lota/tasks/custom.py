"""Bring your own task: a spec string turns local files or a hub dataset into a Task.

    file:/data/train.jsonl?test=/data/test.jsonl&prompt=question&answer=answer&metric=exact_number
    file:/data/tickets.csv?template=Ticket: {subject}%0A{body}&answer=team&metric=choice
    hf:openai/gsm8k?config=main&split=train&test_split=test&prompt=question&answer=answer&metric=exact_number

A spec goes wherever a task name does: ``get_task``, the federation string, the single-task
command and run configs. After ``file:`` or ``hf:`` comes the path or dataset id, then ``?``
and ``key=value`` pairs joined by ``&`` (URL query syntax: write ``%26`` for a literal ``&``,
``%2C`` for a comma and ``%3B`` for a semicolon inside a value, since a federation string
splits on ``,`` and ``;``; ``%0A`` is a newline).

Keys (``SPEC_KEYS``):
    prompt          column holding the prompt                 } one of the two
    template        prompt text with {column} placeholders     }
    answer          column holding the reference reply (required)
    metric          a name in fl_lota.tasks.metrics.METRICS (default exact_match)
    instruction     text put before every prompt (then a blank line)
    chat            true (default): the model's chat template; false: raw "prompt\\nAnswer: "
    test            file: a test file; without it (and for hf: without test_split) the test
    test_split      hf: the test split               } split is held out from train:
    test_fraction   fraction held out (default 0.1), shuffled with the task seed
    split           hf: the training split (default train)
    config          hf: the dataset configuration
    choices         metric choice: column of option labels (a list, or text split on commas);
                    default: the distinct answers of the training file (at most 26)
    schema          metric sql_execution: column with the CREATE/INSERT statements
    format          jsonl | json | csv | parquet (default: from the file extension)
    name            the task's name in reports (default: the file stem / dataset name)
    max_new_tokens  generation budget at evaluation (default 64)

Files are read through ``datasets`` (JSONL, JSON list, CSV, Parquet). Every problem is found
before training starts and named: missing file, missing column (with the columns that
exist), empty split, unknown metric or key, and answers the metric cannot parse.
"""

from __future__ import annotations

import difflib
import random
import string
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from fl_lota.tasks.base import Sample, Task
from fl_lota.tasks.metrics import METRICS, final_number, sql_results

__all__ = ["SPEC_KEYS", "TaskSpec", "TaskSpecError", "is_spec", "load_custom", "parse_spec"]

PREFIXES = ("file:", "hf:")
SPEC_KEYS = (
    "prompt", "template", "answer", "metric", "instruction", "chat", "test", "test_split", "test_fraction",
    "split", "config", "choices", "schema", "format", "name", "max_new_tokens",
)  # fmt: skip
FORMATS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}


class TaskSpecError(ValueError):
    """A task spec that cannot become a task; the message names the problem."""


def is_spec(name: str) -> bool:
    return name.startswith(PREFIXES)


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "file" | "hf"
    source: str  # path or dataset id
    answer: str
    prompt: str | None = None
    template: str | None = None
    metric: str = "exact_match"
    instruction: str = ""
    chat: bool = True
    test: str | None = None
    test_split: str | None = None
    test_fraction: float = 0.1
    split: str = "train"
    config: str | None = None
    choices: str | None = None
    schema: str | None = None
    format: str | None = None
    name: str | None = None
    max_new_tokens: int = 64

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.source).stem if self.kind == "file" else self.source.rstrip("/").split("/")[-1]

    def columns_needed(self) -> list[str]:
        cols = [self.answer]
        if self.prompt:
            cols.append(self.prompt)
        if self.template:
            cols += [f for _, f, _, _ in string.Formatter().parse(self.template) if f]
        cols += [c for c in (self.choices, self.schema) if c]
        return list(dict.fromkeys(cols))


def parse_spec(text: str) -> TaskSpec:
    """Syntax only (nothing is read): fails on unknown keys, a missing answer/prompt, an
    unknown metric or format, a bad number."""
    kind, _, rest = text.partition(":")
    if f"{kind}:" not in PREFIXES:
        raise TaskSpecError(f"task spec {text!r} must start with 'file:' or 'hf:'")
    source, _, query = rest.partition("?")
    if not source:
        raise TaskSpecError(f"task spec {text!r} names no {'file' if kind == 'file' else 'dataset'}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise TaskSpecError(f"task spec {text!r}: options must be key=value pairs joined by '&'") from None
    opts = dict(pairs)
    if len(opts) != len(pairs):
        raise TaskSpecError(f"task spec {text!r} repeats a key")
    unknown = sorted(set(opts) - set(SPEC_KEYS))
    if unknown:
        hints = {k: difflib.get_close_matches(k, SPEC_KEYS, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise TaskSpecError(f"task spec {text!r}: unknown key(s) {said}; known: {', '.join(SPEC_KEYS)}")
    if "answer" not in opts:
        raise TaskSpecError(f"task spec {text!r}: give answer=<column>")
    if ("prompt" in opts) == ("template" in opts):
        raise TaskSpecError(
            f"task spec {text!r}: give exactly one of prompt=<column> or template=<text with {{column}}>"
        )
    if "template" in opts:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(opts["template"]) if f is not None]
        except ValueError as e:
            raise TaskSpecError(f"task spec {text!r}: bad template ({e})") from None
        if not fields or any(not f.isidentifier() and not f.replace(" ", "_").isidentifier() for f in fields):
            raise TaskSpecError(f"task spec {text!r}: the template needs {{column}} placeholders, got {fields}")
    metric = opts.get("metric", "exact_match")
    if metric not in METRICS:
        raise TaskSpecError(f"task spec {text!r}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if metric == "sql_execution" and "schema" not in opts:
        raise TaskSpecError(
            f"task spec {text!r}: metric sql_execution needs schema=<column of CREATE/INSERT statements>"
        )
    fmt = opts.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise TaskSpecError(f"task spec {text!r}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    kw: dict[str, object] = {k: v for k, v in opts.items() if k not in ("chat", "test_fraction", "max_new_tokens")}
    try:
        if "test_fraction" in opts:
            kw["test_fraction"] = float(opts["test_fraction"])
            if not 0 < kw["test_fraction"] < 1:
                raise ValueError
        if "max_new_tokens" in opts:
            kw["max_new_tokens"] = int(opts["max_new_tokens"])
            if kw["max_new_tokens"] < 1:
                raise ValueError
    except ValueError:
        raise TaskSpecError(
            f"task spec {text!r}: test_fraction must lie in (0, 1) and max_new_tokens be a positive integer"
        ) from None
    if "chat" in opts:
        if opts["chat"].lower() not in ("true", "false"):
            raise TaskSpecError(f"task spec {text!r}: chat must be true or false")
        kw["chat"] = opts["chat"].lower() == "true"
    if kind == "file" and not Path(source).is_absolute():
        raise TaskSpecError(f"task spec {text!r}: give an absolute file path (clients may run elsewhere)")
    if kind == "hf" and "test" in opts:
        raise TaskSpecError(f"task spec {text!r}: hf: datasets take test_split=<split>, not test=")
    return TaskSpec(kind=kind, source=source, **kw)


# ---- reading ---------------------------------------------------------------------------


def _read_file(path: str, fmt: str | None, what: str) -> list[dict]:
    from datasets import load_dataset

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file not found: {p}")
    kind = FORMATS.get(fmt or p.suffix.lstrip(".").lower())
    if kind is None:
        raise TaskSpecError(f"{p}: cannot tell the format from the extension; add format=jsonl|json|csv|parquet")
    try:
        return list(load_dataset(kind, data_files=str(p), split="train"))
    except Exception as e:  # datasets wraps parser errors in many types; name the file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TaskSpecError(f"{p}: cannot read as {fmt or p.suffix.lstrip('.')} ({first})") from None


def _read_hub(spec: TaskSpec, split: str) -> list[dict]:
    from datasets import load_dataset

    try:
        return list(load_dataset(spec.source, spec.config, split=split))
    except Exception as e:  # network, missing cache, unknown split
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(f"cannot load hf:{spec.source} split {split!r} ({type(e).__name__}: {first})") from None


def _check_columns(rows: list[dict], spec: TaskSpec, where: str) -> None:
    if not rows:
        raise TaskSpecError(f"{where}: empty split (no rows)")
    have = list(rows[0])
    for col in spec.columns_needed():
        if col not in have:
            close = difflib.get_close_matches(col, have, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TaskSpecError(f"{where}: no column {col!r}{hint}; columns: {', '.join(have)}")


def _labels(value) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _sample(row: dict, spec: TaskSpec, labels: list[str] | None, where: str) -> Sample:
    text = str(row[spec.prompt]) if spec.prompt else spec.template.format(**{k: str(v) for k, v in row.items()})
    if spec.instruction:
        text = f"{spec.instruction}\n\n{text}"
    answer = str(row[spec.answer]).strip()
    meta: dict = {"chat": spec.chat}
    if spec.metric == "exact_number":
        num = final_number(answer)
        if num is None:
            raise TaskSpecError(f"{where}: answer {answer[:60]!r} holds no number for metric exact_number")
        meta["number"] = num
    elif spec.metric == "choice":
        choices = _labels(row[spec.choices]) if spec.choices else labels
        if answer not in choices:
            raise TaskSpecError(f"{where}: answer {answer!r} is not one of the choices {choices}")
        meta |= {"choices": choices, "label": answer}
    elif spec.metric == "sql_execution":
        meta["setup"] = str(row[spec.schema])
        if sql_results(answer, meta["setup"]) is None:
            raise TaskSpecError(f"{where}: reference query {answer[:60]!r} does not run on its schema")
    return Sample(text, answer, meta)


def load_custom(text: str, *, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Task:
    """The Task a spec describes: up to ``n_train`` / ``n_test`` samples, seeded; test
    prompts never appear in train."""
    spec = parse_spec(text)
    if spec.kind == "file":
        train_rows = _read_file(spec.source, spec.format, "training")
        test_rows = _read_file(spec.test, spec.format, "test") if spec.test else None
        where_train, where_test = spec.source, spec.test or spec.source
    else:
        train_rows = _read_hub(spec, spec.split)
        test_rows = _read_hub(spec, spec.test_split) if spec.test_split else None
        where_train, where_test = f"hf:{spec.source}[{spec.split}]", f"hf:{spec.source}[{spec.test_split}]"
    _check_columns(train_rows, spec, where_train)
    if test_rows is not None:
        _check_columns(test_rows, spec, where_test)
    rng = random.Random(f"{spec.label}:{seed}")
    if test_rows is None:  # hold out deterministically
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        k = max(1, round(spec.test_fraction * len(order)))
        if k >= len(order):
            raise TaskSpecError(f"{where_train}: {len(order)} row(s) are too few to hold out a test split")
        test_rows = [train_rows[i] for i in order[:k]]
        train_rows = [train_rows[i] for i in order[k:]]
    labels = None
    if spec.metric == "choice" and not spec.choices:
        labels = sorted({str(r[spec.answer]).strip() for r in train_rows})
        if len(labels) > 26:
            raise TaskSpecError(
                f"{where_train}: {len(labels)} distinct answers are too many to be option labels; "
                "give choices=<column> for metric choice"
            )
    train = [_sample(r, spec, labels, f"{where_train} row {i}") for i, r in enumerate(train_rows)]
    test = [_sample(r, spec, labels, f"{where_test} row {i}") for i, r in enumerate(test_rows)]
    seen = {s.prompt for s in test}
    train = [s for s in train if s.prompt not in seen]
    train = rng.sample(train, min(n_train, len(train)))
    test = [test[i] for i in sorted(rng.sample(range(len(test)), min(n_test, len(test))))]
    if not train:
        raise TaskSpecError(f"{where_train}: no training rows left (every prompt is also in the test split)")
    if not test:
        raise TaskSpecError(f"{where_test}: empty test split")
    return Task(spec.label, spec.metric, train, test, (), spec.max_new_tokens)
