"""The FLTV codec: exact round trips, and a named CodecError for every malformed input."""

import contextlib
import struct

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_lota.training.masks import magnitude_mask
from fl_lota.vectors import codec, fltv
from fl_lota.vectors.codec import HEADER, CodecError, decode, encode, peek
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor


def make_tv(seed=0, sparsity=0.9):
    g = torch.Generator().manual_seed(seed)
    d = {
        "l0.mlp.up.weight": torch.randn(64, 48, generator=g) * 0.3,
        "l0.attn.q.weight": torch.randn(32, 32, generator=g),
    }
    return SparseTaskVector.from_dense(d, magnitude_mask(d, sparsity))


def resign(data: bytes | bytearray) -> bytes:
    """Recompute length and checksum after a mutation, so deeper checks are reached."""
    data = bytearray(data)
    body = bytes(data[HEADER.size :])
    data[16:24] = struct.pack("<Q", len(body))
    data[24:40] = fltv.body_checksum(bytes(data[:24]), body)
    return bytes(data)


def body_with(tv, **kw):
    return bytearray(encode(tv, **kw))


def test_float32_round_trip_is_exact():
    tv = make_tv()
    back = decode(encode(tv, values="float32"))
    assert list(back) == list(tv)
    for n, t in tv.items():
        assert back[n].shape == t.shape
        assert torch.equal(back[n].indices, t.indices)
        assert torch.equal(back[n].values, t.values)


def test_bf16_round_trip_equals_bf16_rounding():
    tv = make_tv()
    back = decode(encode(tv))  # bf16 is the default
    for n, t in tv.items():
        assert torch.equal(back[n].indices, t.indices)
        assert torch.equal(back[n].values, t.values.to(torch.bfloat16).float())


def test_int8_round_trip_within_half_a_step():
    tv = make_tv()
    back = decode(encode(tv, values="int8"))
    for n, t in tv.items():
        step = float(t.values.abs().max()) / 127
        assert (back[n].values - t.values).abs().max() <= step / 2 + 1e-9


def test_dense_empty_and_very_sparse_tensors():
    idx = torch.tensor([0, 3, 100_000, 2_000_000, 2_999_999])  # gaps >= 255 take the escape path
    tv = SparseTaskVector(
        {
            "dense": SparseTensor((3, 4), None, torch.arange(12.0)),
            "empty": SparseTensor((5, 5), torch.zeros(0, dtype=torch.int64), torch.zeros(0)),
            "sparse": SparseTensor((3000, 1000), idx, torch.tensor([1.0, -2.0, 3.0, 4.0, 5.0])),
        }
    )
    back = decode(encode(tv, values="float32"))
    assert back["dense"].indices is None and torch.equal(back["dense"].values, torch.arange(12.0))
    assert back["empty"].nnz == 0
    assert torch.equal(back["sparse"].indices, idx)
    assert len(decode(encode(SparseTaskVector()))) == 0


def test_values_only_needs_and_checks_the_mask():
    tv = make_tv()
    full, vo = encode(tv), encode(tv, values_only=True)
    assert len(vo) < len(full)
    assert peek(vo).values_only and not peek(full).values_only
    for mask in (tv, tv.masks()):  # the layout or boolean masks
        back = decode(vo, mask=mask)
        assert all(torch.equal(back[n].indices, tv[n].indices) for n in tv)
        assert all(torch.equal(back[n].values, tv[n].values.bfloat16().float()) for n in tv)
    with pytest.raises(CodecError, match="needs the mask"):
        decode(vo)
    with pytest.raises(CodecError, match="different mask"):
        decode(vo, mask=make_tv(seed=1))


def test_index_coding_is_near_the_entropy_bound():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2_000_000, generator=g) < 0.1
    idx = torch.nonzero(m).reshape(-1)
    tv = SparseTaskVector({"w": SparseTensor((2_000_000,), idx, torch.zeros(idx.numel()))})
    without_values = len(encode(tv, values="int8")) - len(encode(tv, values="int8", values_only=True))
    bits = 8 * without_values / idx.numel()
    bound = codec.index_entropy_bits(2_000_000, idx.numel()) / idx.numel()
    assert bound < bits < bound * 1.04  # int32 indices would cost 32


# ---------------------------------------------------------------- malformed inputs


def test_truncated_payloads():
    data = encode(make_tv())
    for cut in [0, 3, 39, 40, 41, len(data) // 2, len(data) - 1]:
        with pytest.raises(CodecError, match="truncated"):
            decode(data[:cut])


def test_trailing_bytes():
    with pytest.raises(CodecError, match="padded"):
        decode(encode(make_tv()) + b"\0")
    data = resign(encode(make_tv()) + b"xyz")
    with pytest.raises(CodecError, match="trailing bytes"):
        decode(data)


@pytest.mark.parametrize("pos", [4, 5, 6, 9, 30, 45, 60, -1])
def test_bit_flips_are_caught(pos):
    data = bytearray(encode(make_tv()))
    data[pos] ^= 0x10
    with pytest.raises(CodecError):
        decode(bytes(data))


def test_bit_flip_in_body_is_a_checksum_error():
    data = bytearray(encode(make_tv()))
    data[len(data) // 2] ^= 1
    with pytest.raises(CodecError, match="checksum"):
        decode(bytes(data))


def test_wrong_magic_and_version():
    data = bytearray(encode(make_tv()))
    with pytest.raises(CodecError, match="not an FLTV payload"):
        decode(b"PK\3\4" + bytes(data[4:]))
    data[4] = 2
    with pytest.raises(CodecError, match="unsupported FLTV version 2"):
        decode(resign(data))


def test_unknown_mode_and_dtype():
    data = bytearray(encode(make_tv()))
    data[5] = 7
    with pytest.raises(CodecError, match="unknown mode"):
        decode(resign(data))
    data = bytearray(encode(make_tv()))
    data[6] = 9
    with pytest.raises(CodecError, match="unknown value dtype"):
        decode(resign(data))


def _table_offsets(data):
    """Offsets of the first tensor's ndim, dims and (flags, nnz, scale) in the payload."""
    off = HEADER.size + 4
    (nl,) = struct.unpack_from("<H", data, off)
    off += 2 + nl
    (ndim,) = struct.unpack_from("<B", data, off)
    return off, off + 1, off + 1 + 8 * ndim


def test_absurd_sizes():
    tv = make_tv()
    data = bytearray(encode(tv))
    nd_off, dims_off, _entry_off = _table_offsets(data)
    bad = bytearray(data)
    bad[nd_off] = 99
    with pytest.raises(CodecError, match="absurd ndim"):
        decode(resign(bad))
    bad = bytearray(data)
    struct.pack_into("<Q", bad, dims_off, 1 << 62)
    with pytest.raises(CodecError, match="absurd shape"):
        decode(resign(bad))
    bad = bytearray(data)
    struct.pack_into("<I", bad, HEADER.size, 0xFFFFFFFF)
    with pytest.raises(CodecError, match="absurd tensor count"):
        decode(resign(bad))


def test_counts_that_disagree():
    data = bytearray(encode(make_tv()))
    _, _, entry_off = _table_offsets(data)
    flags, nnz, scale = struct.unpack_from("<BQf", data, entry_off)
    bad = bytearray(data)
    struct.pack_into("<BQf", bad, entry_off, flags, 10**9, scale)  # more entries than the shape holds
    with pytest.raises(CodecError, match="disagrees with shape"):
        decode(resign(bad))
    bad = bytearray(data)
    struct.pack_into("<BQf", bad, entry_off, flags, nnz - 1, scale)  # streams hold one more
    with pytest.raises(CodecError, match="stream holds"):
        decode(resign(bad))
    bad = bytearray(data)
    struct.pack_into("<BQf", bad, entry_off, 0x80, nnz, scale)
    with pytest.raises(CodecError, match="unknown flags"):
        decode(resign(bad))


def test_indices_out_of_range():
    # A tensor of 10 entries whose gaps run past its end: encode the gaps of a larger tensor,
    # then shrink the declared shape.
    tv = SparseTaskVector({"w": SparseTensor((100,), torch.tensor([5, 50, 99]), torch.ones(3))})
    data = bytearray(encode(tv, values="float32"))
    _, dims_off, _ = _table_offsets(data)
    struct.pack_into("<Q", data, dims_off, 60)
    with pytest.raises(CodecError, match=r"out of range|run past the tensor"):
        decode(resign(data))


def test_encoder_refuses_unsorted_out_of_range_and_nonfinite():
    with pytest.raises(CodecError, match="strictly increasing"):
        encode(SparseTaskVector({"w": SparseTensor((10,), torch.tensor([3, 1]), torch.ones(2))}))
    with pytest.raises(CodecError, match="strictly increasing"):
        encode(SparseTaskVector({"w": SparseTensor((10,), torch.tensor([3, 3]), torch.ones(2))}))
    with pytest.raises(CodecError, match="outside"):
        encode(SparseTaskVector({"w": SparseTensor((10,), torch.tensor([3, 10]), torch.ones(2))}))
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode(SparseTaskVector({"w": SparseTensor((2,), None, torch.tensor([1.0, float("inf")]))}))
    with pytest.raises(CodecError, match="unknown value dtype"):
        encode(make_tv(), values="fp8")


def _table_len(tv):
    return 4 + sum(2 + len(n.encode()) + 1 + 8 * len(t.shape) + struct.calcsize("<BQf") for n, t in tv.items())


def _stream(raw: bytes) -> bytes:
    comp = zstandard.ZstdCompressor().compress(raw)
    return struct.pack("<QQ", len(raw), len(comp)) + comp


def test_nan_values_in_a_payload_are_refused():
    tv = SparseTaskVector({"w": SparseTensor((4,), None, torch.tensor([1.0, 2.0, 3.0, 4.0]))})
    data = encode(tv, values="float32")
    planes = np.array([1.0, 2.0, 3.0, np.nan], dtype="<f4").view(np.uint8).reshape(-1, 4).T
    forged = data[: HEADER.size + _table_len(tv)] + _stream(b"") + _stream(b"")  # no sparse indices
    forged += b"".join(_stream(p.tobytes()) for p in planes)
    with pytest.raises(CodecError, match="NaN or Inf"):
        decode(resign(forged))


def test_escaped_gap_out_of_range():
    tv = SparseTaskVector({"w": SparseTensor((1000,), torch.tensor([600]), torch.ones(1))})
    data = encode(tv, values="float32")
    forged = data[: HEADER.size + _table_len(tv)] + _stream(b"\xff") + _stream(struct.pack("<Q", 7))
    forged += b"".join(_stream(p.tobytes()) for p in np.ones(1, "<f4").view(np.uint8).reshape(-1, 4).T)
    with pytest.raises(CodecError, match="escaped gap"):
        decode(resign(forged))


def test_stream_that_does_not_decompress():
    tv = make_tv()
    data = bytearray(encode(tv))
    off = HEADER.size + _table_len(tv) + 16  # the first stream's frame, after its two u64 lengths
    data[off : off + 4] = b"\xde\xad\xbe\xef"
    with pytest.raises(CodecError, match=r"zstd frame|does not decompress"):
        decode(resign(data))


def test_size_limit_refuses_before_decoding():
    data = encode(make_tv())
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode(data, max_bytes=len(data) - 1)
    assert len(decode(data, max_bytes=len(data))) == 2
    with pytest.raises(CodecError, match="more than the limit"):
        decode(data, max_entries=make_tv().nnz - 1)


def test_values_only_table_must_match_mask():
    tv = make_tv()
    other = SparseTaskVector({n: tv[n] for n in reversed(list(tv))})  # same tensors, other order
    with pytest.raises(CodecError, match="different mask"):
        decode(encode(tv, values_only=True), mask=other)
    with pytest.raises(CodecError, match="SparseTaskVector or dict"):
        decode(encode(tv, values_only=True), mask=[1, 2])


# ---------------------------------------------------------------- property-based


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_codec_error(blob):
    for data in (blob, b"FLTV\x01" + blob, resign(b"FLTV\x01\x00\x01\x00" + b"\0" * 32 + blob)):
        with contextlib.suppress(CodecError):
            decode(data)


_SEED = encode(make_tv(sparsity=0.95))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_SEED) - 1), st.integers(0, 255)), min_size=1, max_size=8), st.booleans())
def test_mutated_payloads_raise_only_codec_error(edits, sign):
    data = bytearray(_SEED)
    for pos, val in edits:
        data[pos] = val
    if sign:
        data = bytearray(resign(data))  # get past the checksum to the structural checks
    with contextlib.suppress(CodecError):
        decode(bytes(data))


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
