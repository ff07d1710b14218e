"""fl-lota's round protocol (``fl_lota.federated.protocol``) in Flower messages, shared by the
ClientApp and the ServerApp (neither imports the other).

A message's content holds three records: ``arrays`` (payloads), ``config`` (the server's
instruction: ``TrainInstruction`` / ``EvalInstruction``) and ``metrics`` (the client's
report: ``TrainReport`` / ``EvalReport``). A record missing or of the wrong kind, and a
field the protocol does not define, is a ProtocolError naming it.

A payload travels as one ``Array`` with ``stype="fl_lota/fltv"`` whose ``data`` is the FLTV
bytes themselves (no NumPy header), so a record's ``count_bytes()`` is the payload length
plus its key. Keys: ``fltv`` holds the global update (downlink) or the client's update
(uplink); ``fltv@<merge>`` holds a further merge's global update sent only for scoring.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fl_lota.federated.protocol import ProtocolError

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "PAYLOAD",
    "STYPE",
    "config_of",
    "content_bytes",
    "fltv_array",
    "metrics_of",
    "payload_record",
    "payloads",
    "primary",
    "record",
]

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
PAYLOAD = "fltv"
STYPE = "fl_lota/fltv"


def fltv_array(payload: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(payload),), stype=STYPE, data=bytes(payload))


def payload_record(payload: bytes, **candidates: bytes) -> ArrayRecord:
    """The ArrayRecord of a primary payload and named further ones (``fltv@<name>``)."""
    rec = ArrayRecord({PAYLOAD: fltv_array(payload)})
    for name, p in candidates.items():
        rec[f"{PAYLOAD}@{name}"] = fltv_array(p)
    return rec


def record(msg: Message, name: str, kind: type):
    """The message's record ``name``, which must be a ``kind``; raises ProtocolError."""
    if name not in msg.content:
        raise ProtocolError(f"the message has no {name!r} record")
    rec = msg.content[name]
    if not isinstance(rec, kind):
        article = "an" if kind.__name__[0] in "AEIOU" else "a"
        raise ProtocolError(f"record {name!r} is a {type(rec).__name__}, not {article} {kind.__name__}")
    return rec


def config_of(msg: Message) -> dict[str, object]:
    """The message's config record as a plain map (parse it with ``<Instruction>.from_config``)."""
    return dict(record(msg, CONFIG, ConfigRecord))


def metrics_of(msg: Message) -> dict[str, object]:
    """The message's metrics record as a plain map (parse it with ``<Report>.from_metrics``)."""
    return dict(record(msg, METRICS, MetricRecord))


def primary(record: ArrayRecord) -> bytes:
    """The record's primary payload (key ``fltv``); raises ProtocolError when it has none."""
    found = payloads(record)
    if "" not in found:
        raise ProtocolError(f"the arrays carry no {PAYLOAD!r} payload (keys {sorted(record)})")
    return found[""]


def payloads(record: ArrayRecord) -> dict[str, bytes]:
    """``{"": primary, "<merge>": candidate, ...}`` from an ArrayRecord of FLTV Arrays.
    Raises ProtocolError on an Array that is not an FLTV payload."""
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"record 'arrays' is a {type(record).__name__}, not an ArrayRecord")
    out = {}
    for key, arr in record.items():
        if not isinstance(arr, Array):
            raise ProtocolError(f"array {key!r} is a {type(arr).__name__}, not an Array")
        if arr.stype != STYPE or not key.startswith(PAYLOAD):
            raise ProtocolError(f"array {key!r} is not an fl-lota payload (stype {arr.stype!r})")
        out[key[len(PAYLOAD) + 1 :]] = bytes(arr.data)
    return out


def content_bytes(content: RecordDict) -> int:
    """Bytes a message carries: ``count_bytes()`` summed over its records."""
    return sum(rec.count_bytes() for rec in content.values())
