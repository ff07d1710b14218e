"""How fl-lota puts FLTV payloads into Flower messages (shared by both apps).

A payload travels as one ``Array`` with ``stype="fl_lota/fltv"`` whose ``data`` is the FLTV
bytes themselves (no NumPy header), so a record's ``count_bytes()`` is the payload length
plus its key. Keys: ``fltv`` holds the global update (downlink) or the client's update
(uplink); ``fltv@<merge>`` holds a further merge's global update sent only for scoring.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

__all__ = [
    "ARRAYS",
    "CONFIG",
    "METRICS",
    "PAYLOAD",
    "STATE",
    "STYPE",
    "content_bytes",
    "fltv_array",
    "payloads",
]

ARRAYS, CONFIG, METRICS, STATE = "arrays", "config", "metrics", "fl-lota"
PAYLOAD = "fltv"
STYPE = "fl_lota/fltv"


def fltv_array(payload: bytes) -> Array:
    return Array(dtype="uint8", shape=(len(payload),), stype=STYPE, data=bytes(payload))


def payloads(record: ArrayRecord) -> dict[str, bytes]:
    """``{"": primary, "<merge>": candidate, ...}`` from an ArrayRecord of FLTV Arrays.
    Raises ValueError on an Array that is not an FLTV payload."""
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"record 'arrays' is a {type(record).__name__}, not an ArrayRecord")
    out = {}
    for key, arr in record.items():
        if not isinstance(arr, Array):
            raise ValueError(f"array {key!r} is a {type(arr).__name__}, not an Array")
        if arr.stype != STYPE or not key.startswith(PAYLOAD):
            raise ValueError(f"array {key!r} is not an fl-lota payload (stype {arr.stype!r})")
        out[key[len(PAYLOAD) + 1 :]] = bytes(arr.data)
    return out


def content_bytes(content: RecordDict) -> int:
    """Bytes a message carries: ``count_bytes()`` summed over its records."""
    return sum(rec.count_bytes() for rec in content.values())
