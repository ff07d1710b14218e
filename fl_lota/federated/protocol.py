"""The round protocol between the server and its clients, free of Flower: what the server
asks of a client (``TrainInstruction``, ``EvalInstruction``, each naming the global update
``GlobalRef`` its payload builds) and what a client reports (``TrainReport``,
``EvalReport``). Every key is named once, here, in the fields' metadata. ``to_config`` and
``to_metrics`` write the flat maps that travel in Flower's ConfigRecord and MetricRecord
(``wire`` puts them there); ``from_config`` and ``from_metrics`` parse them back. Parsing
is strict: a missing, unknown, ill-typed or out-of-bounds key raises a ProtocolError that
names it, never a silent 0.

A client's report is untrusted: a broken or hostile client can send NaN, infinities,
negative counts, a partition that is not its own, or a weight that would own the merge.
``TrainReport.from_metrics`` and ``EvalReport.from_metrics`` accept only what this module
defines and raise ``ReportError`` naming the field otherwise, so the server rejects that
reply for its round and goes on. Bounds: counts are integers in [0, 2^53) (exact in
float64); seconds lie in [0, 10^7] (so sums stay finite); scores lie in [0, 1]; the
partition lies in the federation; the weight (``num-examples``) lies in [1,
``max_examples``], the most examples any client of this federation can hold; test items
per task lie in [1, ``max_items``].
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EMPTY",
    "EvalInstruction",
    "EvalReport",
    "GlobalRef",
    "ProtocolError",
    "ReportError",
    "TrainInstruction",
    "TrainReport",
]

MAX_COUNT = 2**53
MAX_SECONDS = 1e7  # 115 days
EMPTY = "nothing"  # the base of a change from nothing (the whole update); Flower refuses "" in a record
# a change as indices and values; G's values on the support held; a rounded change added to
# the held G (downlink-values int8/int4), indexed or as values on the support held
MODES = ("entries", "values", "add", "add-values")
_NAME = re.compile(r"^[^\s]{1,200}$")  # a task, phase or merge name inside a key


class ProtocolError(ValueError):
    """A message field that is missing, unknown, ill-typed or out of bounds; names the field."""


class ReportError(ProtocolError):
    """A client's report that breaks the protocol; the server refuses that reply."""


def _key(name: str, kind: str, *, optional: bool = False):
    """A field on the wire: its key and kind; ``optional``: it may be absent (then None)."""
    meta = {"key": name, "kind": kind, "optional": optional, "prefix": False}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


def _per_name(prefix: str, kind: str) -> dict[str, object]:
    """The metadata of a per-name map on the wire: keys ``<prefix><name>``, absent when empty."""
    return {"key": prefix, "kind": kind, "optional": True, "prefix": True}


# ---- server -> client: config records ----------------------------------------------------


def _cfg(key: str, kind: type, *, default: Any = dataclasses.MISSING, sparse: bool = False):
    """A config field on the wire: its key and Python type; ``sparse``: written only when it
    differs from its default (and then absent on the wire means the default)."""
    meta = {"key": key, "type": kind, "sparse": sparse}
    return field(metadata=meta) if default is dataclasses.MISSING else field(default=default, metadata=meta)


def _to_config(obj) -> dict[str, object]:
    """The flat record of ``obj``: its own keys, then its nested fields' keys."""
    own: dict[str, object] = {}
    nested: dict[str, object] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if "nested" in f.metadata:
            nested |= _to_config(v)
        elif not (f.metadata["sparse"] and v == f.default):
            own[f.metadata["key"]] = v
    return own | nested


def _config_keys(cls) -> set[str]:
    return {
        k
        for f in dataclasses.fields(cls)
        for k in (_config_keys(f.metadata["nested"]) if "nested" in f.metadata else {f.metadata["key"]})
    }


def _from_config(cls, raw: Mapping[str, object], *, whole: bool = True):
    """``cls`` from its flat record; ``whole``: the record holds nothing else. A key is
    required unless sparse; a missing, unknown or ill-typed key is a ProtocolError."""
    if whole:
        unknown = sorted(set(raw) - _config_keys(cls))
        if unknown:
            raise ProtocolError(f"unknown field(s) {unknown}; this protocol knows {sorted(_config_keys(cls))}")
    values = {}
    for f in dataclasses.fields(cls):
        if "nested" in f.metadata:
            values[f.name] = _from_config(f.metadata["nested"], raw, whole=False)
        elif f.metadata["key"] in raw or not f.metadata["sparse"]:
            values[f.name] = _typed(raw, f.metadata["key"], f.metadata["type"])
    return cls(**values)


def _typed(raw: Mapping[str, object], key: str, kind: type):
    if key not in raw:
        raise ProtocolError(f"field {key!r} is missing")
    v = raw[key]
    if (kind is int and isinstance(v, bool)) or not isinstance(v, kind):
        raise ProtocolError(f"field {key!r}: expected {kind.__name__}, got {type(v).__name__}")
    return v


class _ConfigRecord:
    """``to_config`` / ``from_config`` from the fields' metadata (keys named once)."""

    def to_config(self) -> dict[str, object]:
        return _to_config(self)

    @classmethod
    def from_config(cls, raw: Mapping[str, object]):
        return _from_config(cls, raw)


@dataclass(frozen=True)
class GlobalRef(_ConfigRecord):
    """The change a message carries of ``G``: from the version with digest ``base`` (EMPTY:
    from nothing) to the one with digest ``digest``; ``mode`` "entries" (indices and
    values), "values" (``G``'s values on the support the client holds), or "add" and
    "add-values" (a rounded change to add to the held ``G``, indexed or on its support)."""

    base: str = _cfg("g-base", str)
    digest: str = _cfg("g-digest", str)
    mode: str = _cfg("g-mode", str, default="entries")

    def __post_init__(self) -> None:
        if not self.base or not self.digest:
            raise ProtocolError("the global update's g-base and g-digest must not be empty")
        if self.mode not in MODES:
            raise ProtocolError(f"field 'g-mode': {self.mode!r} is none of {MODES}")


@dataclass(frozen=True)
class TrainInstruction(_ConfigRecord):
    """A training message's config: the round (picks where in its example stream a client
    continues), the run (names its client state), what to score besides training, whether
    to register the mask again (the server holds none for this client), and ``g``: which
    global update the message's payload builds."""

    server_round: int = _cfg("server-round", int)  # Flower's FedAvg writes it too
    run_tag: str = _cfg("fl-lota-run", str)
    g: GlobalRef = field(metadata={"nested": GlobalRef})  # its fields travel flat in this record
    eval_start: bool = _cfg("eval-start", bool, default=False)  # score the received model
    eval_local: bool = _cfg("eval-local", bool, default=False)  # score the locally tuned model
    # send a full upload; only where asked, so the other messages stay as they were
    register_mask: bool = _cfg("register-mask", bool, default=False, sparse=True)


@dataclass(frozen=True)
class EvalInstruction(_ConfigRecord):
    """An evaluation message's config: the round, the run's merge (the name the primary
    payload is scored under) and ``g``: which global update the primary payload builds.
    Further merges' updates travel whole, under their own names, in the same message."""

    server_round: int = _cfg("server-round", int)
    merge: str = _cfg("merge", str)
    g: GlobalRef = field(metadata={"nested": GlobalRef})  # its fields travel flat in this record


# ---- client -> server ------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReport:
    """What a client reports with its upload (all but the optional fields always)."""

    partition: int = _key("partition-id", "partition")
    num_examples: int = _key("num-examples", "count")  # its training examples: the merge weight
    load_seconds: float = _key("load-seconds", "seconds")
    train_seconds: float = _key("train-seconds", "seconds")
    codec_seconds: float = _key("codec-seconds", "seconds")
    loss_first: float = _key("loss-first", "finite")
    loss_last: float = _key("loss-last", "finite")
    steps: int = _key("steps", "count")  # optimizer steps
    fb_passes: int = _key("fb-passes", "count")  # forward+backward batches, calibration included
    train_examples: int = _key("train-examples", "count")
    distinct_examples: int = _key("distinct-examples", "count")
    stream_start: int = _key("stream-start", "count")  # positions in its example stream
    stream_end: int = _key("stream-end", "count")
    trained_params: int = _key("trained-params", "count")
    nnz: int = _key("nnz", "count")  # values sent
    numel: int = _key("numel", "count")  # entries of the dense update they stand for
    payload_bytes: int = _key("payload-bytes", "count")
    values_only: bool = _key("values-only", "flag")
    index_entropy_bytes: float = _key("index-entropy-bytes", "size")  # the mask's entropy bound
    eval_seconds: float | None = _key("eval-seconds", "seconds", optional=True)  # when it scored
    eval_bf16: bool | None = _key("eval-bf16", "flag", optional=True)  # when it scored: in bf16 (the model cast)
    gpu_peak_bytes: int | None = _key("gpu-peak-bytes", "count", optional=True)  # on a GPU
    phase_seconds: dict[str, float] = field(
        default_factory=dict, metadata=_per_name("seconds.", "seconds")
    )  # calibrate, extract ...
    start_scores: dict[str, float] = field(
        default_factory=dict, metadata=_per_name("start-score.", "score")
    )  # task -> score
    local_scores: dict[str, float] = field(default_factory=dict, metadata=_per_name("local-score.", "score"))
    test_items: dict[str, int] = field(
        default_factory=dict, metadata=_per_name("n.", "count")
    )  # task -> its test items

    @property
    def weight(self) -> float:
        return float(self.num_examples)

    def to_metrics(self) -> dict[str, float]:
        return _to_metrics(self)

    @classmethod
    def from_metrics(
        cls, raw: Mapping[str, object], *, num_clients: int, max_examples: int, max_items: int | None = None
    ) -> TrainReport:
        """The metrics of a training reply, checked; raises ReportError naming the field.
        ``max_items``: the most test items a task has (``n-test``)."""
        r = _from_metrics(cls, raw, num_clients=num_clients, max_items=max_items)
        if not 1 <= r.num_examples <= max_examples:
            raise ReportError(
                f"field 'num-examples': {r.num_examples:g} outside [1, {max_examples}], "
                "the most a client of this federation holds"
            )
        return r


@dataclass(frozen=True)
class EvalReport:
    """What a client reports with its scores: per merge, per task, the score of ``base +
    G_merge`` on its test split."""

    partition: int = _key("partition-id", "partition")
    num_examples: int = _key("num-examples", "count")  # its test items, all tasks
    eval_seconds: float = _key("eval-seconds", "seconds")
    eval_bf16: bool | None = _key("eval-bf16", "flag", optional=True)  # generated in bf16 (the model cast)
    gpu_peak_bytes: int | None = _key("gpu-peak-bytes", "count", optional=True)
    scores: dict[str, dict[str, float]] = field(
        default_factory=dict, metadata=_per_name("score.", "merge-score")
    )  # merge -> task -> score
    test_items: dict[str, int] = field(default_factory=dict, metadata=_per_name("n.", "count"))

    def to_metrics(self) -> dict[str, float]:
        return _to_metrics(self)

    @classmethod
    def from_metrics(cls, raw: Mapping[str, object], *, num_clients: int, max_items: int | None = None) -> EvalReport:
        """The metrics of an evaluation reply, checked; raises ReportError naming the field."""
        return _from_metrics(cls, raw, num_clients=num_clients, max_items=max_items)


def _to_metrics(report) -> dict[str, float]:
    out: dict[str, float] = {}
    for f in dataclasses.fields(report):
        key, v = f.metadata["key"], getattr(report, f.name)
        if f.metadata["kind"] == "merge-score":
            out |= {f"{key}{task}@{merge}": float(s) for merge, by_task in v.items() for task, s in by_task.items()}
        elif f.metadata["prefix"]:
            out |= {f"{key}{name}": float(x) for name, x in v.items()}
        elif v is not None:
            out[key] = float(v)
    return out


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReportError(f"field {key!r}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ReportError(f"field {key!r}: {v} is not finite")
    return v


def _checked(key: str, v: float, kind: str, num_clients: int):
    """``v`` as the kind's Python value; raises ReportError when out of the kind's bounds."""
    if kind == "count":
        if not (0 <= v < MAX_COUNT and v == int(v)):
            raise ReportError(f"field {key!r}: {v!r} is not a count (an integer in [0, 2^53))")
        return int(v)
    if kind == "seconds" and not 0 <= v <= MAX_SECONDS:
        raise ReportError(f"field {key!r}: {v!r} seconds outside [0, {MAX_SECONDS:g}]")
    if kind == "size" and not 0 <= v < MAX_COUNT:
        raise ReportError(f"field {key!r}: {v!r} outside [0, 2^53)")
    if kind in ("score", "merge-score") and not 0.0 <= v <= 1.0:
        raise ReportError(f"field {key!r}: score {v!r} outside [0, 1]")
    if kind == "flag":
        if v not in (0.0, 1.0):
            raise ReportError(f"field {key!r}: {v!r} is not 0 or 1")
        return bool(v)
    if kind == "partition":
        if v != int(v) or not 0 <= v < num_clients:
            raise ReportError(f"field {key!r}: {v!r} is not a client of this federation (0..{num_clients - 1})")
        return int(v)
    return v


def _from_metrics(cls, raw: Mapping[str, object], *, num_clients: int, max_items: int | None):
    fields = dataclasses.fields(cls)
    exact = {f.metadata["key"]: f for f in fields if not f.metadata["prefix"]}
    prefixed = [f for f in fields if f.metadata["prefix"]]
    values: dict[str, Any] = {f.name: {} for f in prefixed}
    for key, value in raw.items():
        key = str(key)
        v = _number(key, value)
        if key in exact:
            f = exact[key]
            values[f.name] = _checked(key, v, f.metadata["kind"], num_clients)
            continue
        f = next((f for f in prefixed if key.startswith(f.metadata["key"])), None)
        if f is None:
            raise ReportError(f"unknown field {key!r}")
        name = key[len(f.metadata["key"]) :]
        if f.metadata["kind"] == "merge-score":
            task, at, merge = name.rpartition("@")
            if not at or not _NAME.match(task) or not _NAME.match(merge):
                raise ReportError(f"field {key!r}: malformed name (expected score.<task>@<merge>)")
            values[f.name].setdefault(merge, {})[task] = _checked(key, v, "score", num_clients)
            continue
        if not _NAME.match(name):
            raise ReportError(f"field {key!r}: malformed name")
        values[f.name][name] = _checked(key, v, f.metadata["kind"], num_clients)
    for f in fields:
        if f.name not in values and not f.metadata["optional"]:
            raise ReportError(f"field {f.metadata['key']!r} is missing")
    for task, n in values.get("test_items", {}).items():
        if max_items is not None and not 1 <= n <= max_items:
            raise ReportError(f"field 'n.{task}': {n:g} test items outside [1, {max_items}]")
    return cls(**values)
