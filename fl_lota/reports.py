"""What a client reports with its update or its scores, checked field by field.

A reply's metrics are numbers the client chose; a broken or hostile client can send NaN,
infinities, negative counts, a partition that is not its own, or a weight that would own
the merge. ``train_report`` and ``eval_report`` accept only what the protocol defines
(``fl_lota.fedclient`` writes it) and raise ``ReportError`` naming the field otherwise, so
the server rejects that reply for its round and goes on.

Bounds: counts are non-negative integers below 2^53 (exact in float64); seconds lie in
[0, 10^7] (so sums stay finite); scores lie in [0, 1]; the partition lies in the federation; the weight
(``num-examples``) lies in [1, ``max_examples``], the most examples any client of this
federation can hold, so no client can claim more than its share.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["EvalReport", "ReportError", "TrainReport", "eval_report", "train_report"]

MAX_COUNT = 2**53
MAX_SECONDS = 1e7  # 115 days

# train reply: exact keys, and keys by prefix (the task or phase comes after the dot)
TRAIN_COUNTS = (
    "num-examples", "steps", "fb-passes", "train-examples", "distinct-examples", "stream-start",
    "stream-end", "trained-params", "nnz", "numel", "payload-bytes", "gpu-peak-bytes",
)  # fmt: skip
TRAIN_SECONDS = ("load-seconds", "train-seconds", "eval-seconds", "codec-seconds")
TRAIN_FINITE = ("loss-first", "loss-last")
TRAIN_SIZES = ("index-entropy-bytes",)  # non-negative, not necessarily whole
TRAIN_PREFIXES = {"seconds.": "seconds", "start-score.": "score", "local-score.": "score", "n.": "count"}
EVAL_PREFIXES = {"score.": "score", "n.": "count"}
_TASK = re.compile(r"^[^\s]{1,200}$")


class ReportError(ValueError):
    """A reply field that is missing, unknown or out of its bounds; the message names it."""


@dataclass(frozen=True)
class TrainReport:
    partition: int
    weight: float  # num-examples
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalReport:
    partition: int
    metrics: dict[str, float]


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"field {key!r}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ReportError(f"field {key!r}: {v} is not finite")
    return v


def _check(key: str, v: float, kind: str) -> None:
    if kind == "count" and not (0 <= v < MAX_COUNT and v == int(v)):
        raise ReportError(f"field {key!r}: {v!r} is not a count (an integer in [0, 2^53))")
    if kind == "seconds" and not 0 <= v <= MAX_SECONDS:
        raise ReportError(f"field {key!r}: {v!r} seconds outside [0, {MAX_SECONDS:g}]")
    if kind == "size" and not 0 <= v < MAX_COUNT:
        raise ReportError(f"field {key!r}: {v!r} outside [0, 2^53)")
    if kind == "score" and not 0.0 <= v <= 1.0:
        raise ReportError(f"field {key!r}: score {v!r} outside [0, 1]")


def _kind(key: str, exact: Mapping[str, str], prefixes: Mapping[str, str]) -> str:
    if key in exact:
        return exact[key]
    for prefix, kind in prefixes.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            if kind == "score" and prefix == "score.":
                rest = rest.rpartition("@")[0] if "@" in rest else ""
            if not _TASK.match(rest):
                raise ReportError(f"field {key!r}: malformed name")
            return kind
    raise ReportError(f"unknown field {key!r}")


def _partition(metrics: Mapping[str, float], num_clients: int) -> int:
    if "partition-id" not in metrics:
        raise ReportError("field 'partition-id' is missing")
    pid = metrics["partition-id"]
    if pid != int(pid) or not 0 <= pid < num_clients:
        raise ReportError(f"field 'partition-id': {pid!r} is not a client of this federation (0..{num_clients - 1})")
    return int(pid)


def _test_sizes(metrics: Mapping[str, float], max_items: int | None) -> None:
    for key, v in metrics.items():
        if key.startswith("n.") and max_items is not None and not 1 <= v <= max_items:
            raise ReportError(f"field {key!r}: {v:g} test items outside [1, {max_items}]")


def train_report(
    raw: Mapping[str, object], *, num_clients: int, max_examples: int, max_items: int | None = None
) -> TrainReport:
    """The metrics of a training reply, checked; raises ReportError naming the field.
    ``max_items``: the most test items a task has (``n-test``), bounding the ``n.<task>``
    weights of score means."""
    exact = {k: "count" for k in TRAIN_COUNTS} | {k: "seconds" for k in TRAIN_SECONDS}
    exact |= {k: "finite" for k in TRAIN_FINITE} | {k: "size" for k in TRAIN_SIZES}
    exact |= {"partition-id": "finite", "values-only": "flag"}
    metrics = {}
    for key, value in raw.items():
        v = _number(str(key), value)
        kind = _kind(str(key), exact, TRAIN_PREFIXES)
        if kind == "flag" and v not in (0.0, 1.0):
            raise ReportError(f"field {key!r}: {v!r} is not 0 or 1")
        _check(str(key), v, kind)
        metrics[str(key)] = v
    for key in ("num-examples", "payload-bytes", "nnz", "numel"):
        if key not in metrics:
            raise ReportError(f"field {key!r} is missing")
    pid = _partition(metrics, num_clients)
    _test_sizes(metrics, max_items)
    weight = metrics["num-examples"]
    if not 1 <= weight <= max_examples:
        raise ReportError(
            f"field 'num-examples': {weight:g} outside [1, {max_examples}], the most a client of this federation holds"
        )
    return TrainReport(pid, weight, metrics)


def eval_report(raw: Mapping[str, object], *, num_clients: int, max_items: int | None = None) -> EvalReport:
    """The metrics of an evaluation reply, checked; raises ReportError naming the field."""
    exact = {"num-examples": "count", "eval-seconds": "seconds", "partition-id": "finite", "gpu-peak-bytes": "count"}
    metrics = {}
    for key, value in raw.items():
        v = _number(str(key), value)
        kind = _kind(str(key), exact, EVAL_PREFIXES)
        _check(str(key), v, kind)
        metrics[str(key)] = v
    _test_sizes(metrics, max_items)
    return EvalReport(_partition(metrics, num_clients), metrics)
