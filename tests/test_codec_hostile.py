"""Hostile FLTV payloads: forged tables and zstd frames that claim, expand or overflow past
what they hold are refused before the decoder allocates for them."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import zstandard
from test_codec import _stream, _table_len, _table_offsets, resign

from fl_lota.vectors.codec import HEADER, CodecError, decode, encode
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

# ---------------------------------------------------------------- hostile payloads


def _rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _dense_table(n: int) -> bytes:
    name = b"w"
    return (
        struct.pack("<I", 1) + struct.pack("<H", 1) + name + struct.pack("<BQ", 1, n) + struct.pack("<BQf", 1, n, 1.0)
    )


def _forge(table: bytes, streams: list[bytes], values_dtype: int = 0) -> bytes:
    body = table + b"".join(streams)
    head = HEADER.pack(b"FLTV", 1, 0, values_dtype, 0, b"\0" * 8, len(body), b"\0" * 16)[:24]
    return resign(head + b"\0" * 16 + body)


def _raw_stream(raw_len: int, comp: bytes) -> bytes:
    return struct.pack("<QQ", raw_len, len(comp)) + comp


def test_frames_that_claim_or_expand_past_the_table_are_refused_before_allocating():
    n = 1 << 26  # 64 Mi float32 values: 256 MB in each of 4 planes if anything believed the frames
    table = _dense_table(n)
    # a 13-byte frame that declares 2^36 bytes
    claims = zstandard.ZstdCompressor().compress(b"")[:4] + bytes([0xC0]) + struct.pack("<Q", 1 << 36)
    # a frame of zeros without a declared size: expands a few KB into the whole table's worth
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(n))
    _reset_peak()
    before = _rss_peak_mb()
    for stream, needle in [(claims, r"declares|zstd"), (bomb, "declares no size")]:
        data = _forge(table, [_stream(b""), _stream(b""), _raw_stream(n, stream)] + [_stream(b"")] * 3)
        with pytest.raises(CodecError, match=needle):
            decode(data, shapes={"w": (n,)})
    assert _rss_peak_mb() - before < 64, "rejecting a hostile frame allocated what it claimed"
    # and a table that announces a tensor the receiver does not hold is refused before any stream
    with pytest.raises(CodecError, match="not one the receiver accepts"):
        decode(_forge(table, []), shapes={"v": (n,)})
    with pytest.raises(CodecError, match=r"has shape \(67108864,\), expected \(10,\)"):
        decode(_forge(table, []), shapes={"w": (10,)})


def test_trailing_frames_bytes_and_reserved_header_bits_are_refused():
    tv = SparseTaskVector({"w": SparseTensor((4,), None, torch.tensor([1.0, 2.0, 3.0, 4.0]))})
    planes = np.array([1.0, 2.0, 3.0, 4.0], dtype="<f4").view(np.uint8).reshape(-1, 4).T
    good = [_stream(b""), _stream(b"")] + [_stream(p.tobytes()) for p in planes]
    table = encode(tv, values="float32")[HEADER.size : HEADER.size + _table_len(tv)]
    assert torch.equal(decode(_forge(table, good))["w"].values, tv["w"].values)
    second = zstandard.ZstdCompressor().compress(b"extra")
    p0 = planes[0].tobytes()
    frame = zstandard.ZstdCompressor().compress(p0)
    with_frame = [*good[:2], _raw_stream(len(p0), frame + second), *good[3:]]
    with pytest.raises(CodecError, match="after its zstd frame"):
        decode(_forge(table, with_frame))
    with pytest.raises(CodecError, match="trailing bytes"):
        decode(resign(_forge(table, good) + b"\0"))
    data = bytearray(encode(tv))
    data[7] = 1
    with pytest.raises(CodecError, match="reserved header byte"):
        decode(resign(bytes(data)))


def test_gaps_whose_sum_overflows_are_refused():
    n = 1000
    tv = SparseTaskVector({"w": SparseTensor((n,), torch.tensor([1, 2, 3]), torch.ones(3))})
    table = encode(tv, values="float32")[HEADER.size : HEADER.size + _table_len(tv)]
    planes = np.ones(3, "<f4").view(np.uint8).reshape(-1, 4).T
    huge = struct.pack("<3Q", 1 << 62, 1 << 62, 1 << 62)
    forged = _forge(table, [_stream(b"\xff" * 3), _stream(huge)] + [_stream(p.tobytes()) for p in planes])
    with pytest.raises(CodecError, match=r"escaped gap|leaves the tensor"):
        decode(forged)


def test_int8_scale_that_overflows_and_oversized_values_are_refused():
    tv = SparseTaskVector({"w": SparseTensor((4,), None, torch.tensor([1.0, -1.0, 0.5, 0.25]))})
    data = bytearray(encode(tv, values="int8"))
    _, _, entry_off = _table_offsets(data)
    flags, nnz, _ = struct.unpack_from("<BQf", data, entry_off)
    struct.pack_into("<BQf", data, entry_off, flags, nnz, 1e38)
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode(resign(bytes(data)))
    big = SparseTaskVector({"w": SparseTensor((2,), None, torch.tensor([1.0, 5e4]))})
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode(encode(big, values="float32"), max_abs=1e4)
    assert decode(encode(big, values="float32"), max_abs=1e5)["w"].values[1] == 5e4


def _table(shapes: dict[str, int], dense: bool) -> bytes:
    out = struct.pack("<I", len(shapes))
    for name, n in shapes.items():
        nb = name.encode()
        out += struct.pack("<H", len(nb)) + nb + struct.pack("<BQ", 1, n) + struct.pack("<BQf", int(dense), n, 1.0)
    return out


@pytest.mark.parametrize("dense", [True, False])
def test_rejecting_a_tiny_upload_that_claims_a_large_model_costs_little_memory(dense):
    # 32 tensors of 2 Mi entries (a 268 MB float32 "model"): every stream is zeros, which
    # compresses to a few KB, but for one NaN in the very last value
    shapes = {f"w{i}": 1 << 21 for i in range(32)}
    total = sum(shapes.values())
    z = zstandard.ZstdCompressor(level=3)  # a 2 MiB window, the most a receiver allows

    def stream(raw: bytes) -> bytes:
        comp = z.compress(raw)
        return struct.pack("<QQ", len(raw), len(comp)) + comp

    streams = [stream(b""), stream(b"")] if dense else [stream(bytes(total)), stream(b"")]
    for byte in (0, 0, 0xC0, 0x7F):  # float32 NaN, little-endian byte planes
        plane = bytearray(total)
        plane[-1] = byte
        streams.append(stream(bytes(plane)))
    data = _forge(_table(shapes, dense), streams)
    assert len(data) < 20_000
    _reset_peak()
    before = _rss_peak_mb()
    with pytest.raises(CodecError, match="w31: values hold NaN or Inf"):
        decode(data, shapes={k: (v,) for k, v in shapes.items()})
    # one 8 MB tensor, or the whole 268 MB model, would show here if decode kept what it read
    assert _rss_peak_mb() - before < 64


def test_a_frame_that_needs_a_large_window_is_refused_before_decompressing():
    n = 1 << 24
    comp = zstandard.ZstdCompressor(level=19).compress(bytes(n))
    data = _forge(_dense_table(n), [_stream(b""), _stream(b"")] + [struct.pack("<QQ", n, len(comp)) + comp] * 4)
    with pytest.raises(CodecError, match=r"needs a .*-byte window"):
        decode(data)
    # and what this codec writes at any level stays within the window a receiver allows
    tv = SparseTaskVector({"w": SparseTensor((n,), None, torch.zeros(n))})
    assert torch.equal(decode(encode(tv, values="float32", level=19))["w"].values, tv["w"].values)


def test_an_int8_nibble_plane_with_a_byte_above_15_is_refused():
    table = _dense_table(4)
    good = [_stream(b""), _stream(b""), _stream(bytes([0, 1, 15, 2])), _stream(bytes([3, 15, 0, 9]))]
    back = decode(_forge(table, good, values_dtype=3))["w"].values  # zigzag 3, 31, 240, 41
    assert back.tolist() == [-2.0, -16.0, 120.0, -21.0]
    for bad in ([*good[:3], _stream(bytes([3, 16, 0, 9]))], [*good[:2], _stream(bytes([0, 1, 200, 2])), good[3]]):
        with pytest.raises(CodecError, match="above 15"):  # a low or a high nibble out of range
            decode(_forge(table, bad, values_dtype=3))


def test_an_int4_byte_above_14_is_refused():
    table = _dense_table(3)
    assert decode(_forge(table, [_stream(b""), _stream(b""), _stream(bytes([0, 13, 14]))], values_dtype=4))[
        "w"
    ].values.tolist() == [0.0, -7.0, 7.0]
    with pytest.raises(CodecError, match="above 14"):
        decode(_forge(table, [_stream(b""), _stream(b""), _stream(bytes([0, 15, 14]))], values_dtype=4))
