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
from fl_lota.vectors.task_vector import PackedTensor, SparseTaskVector, SparseTensor


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


@pytest.mark.parametrize("values, levels", [("int8", 127), ("int4", 7)])
def test_integer_codes_round_trip_within_half_a_step(values, levels):
    tv = make_tv()
    payload = encode(tv, values=values)
    back = decode(payload)
    assert peek(payload).value_dtype == values
    for n, t in tv.items():
        step = float(t.values.abs().max()) / levels
        assert (back[n].values - t.values).abs().max() <= step / 2 + 1e-6
        assert len(torch.unique(back[n].values)) <= 2 * levels + 1


def test_int4_codes_every_level_exactly_and_near_their_entropy():
    levels = torch.arange(-7, 8).float() * 0.25
    tv = SparseTaskVector({"w": SparseTensor((15,), None, levels)})
    assert torch.equal(decode(encode(tv, values="int4"))["w"].values, levels)
    g = torch.Generator().manual_seed(0)  # a Gaussian's codes: 2.8 bits of entropy
    big = SparseTaskVector({"w": SparseTensor((1_000_000,), None, torch.randn(1_000_000, generator=g))})
    assert len(encode(big, values="int4")) * 8 / 1_000_000 < 3.0


@pytest.mark.parametrize(
    "kind, code, most_bits",
    [("gaussian", 2, 6.9), ("near_uniform", 3, 7.93)],  # zstd codes the byte plane / only the nibbles
)
def test_int8_goes_in_the_smaller_of_its_two_layouts_and_decodes_exactly(kind, code, most_bits):
    g = torch.Generator().manual_seed(0)
    n = 1_000_000
    if kind == "gaussian":
        v = torch.randn(n, generator=g)
    else:  # half uniform, half a narrow Gaussian: 7.9 bits of entropy, no symbol above 1/128
        v = torch.where(
            torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) * 2 - 1, torch.randn(n, generator=g) * 0.3
        )
        v = v.clamp(-1, 1)
    v[0] = 1.0  # every code from -127 to 127 occurs
    v[1:256] = torch.arange(-127, 128).float() / 127
    tv = SparseTaskVector({"w": SparseTensor((n,), None, v)})
    payload = encode(tv, values="int8")
    assert peek(payload).dtype_code == code and peek(payload).value_dtype == "int8"
    assert len(payload) * 8 / n < most_bits
    scale = float(v.abs().max()) / 127
    want = torch.round(v / torch.tensor(scale)).clamp(-127, 127) * torch.tensor(scale)
    assert torch.equal(decode(payload)["w"].values, want)


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
    with pytest.raises(ValueError, match="outside"):  # a SparseTensor cannot even hold it
        SparseTensor((10,), torch.tensor([3, 10]), torch.ones(2))
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


def test_tensors_over_several_pieces_round_trip_with_gaps_escaped_at_a_piece_boundary():
    """encode streams each tensor CHUNK entries at a time: positions, gap codes, escaped gaps
    and value planes that cross a piece boundary come back exactly."""
    n = 2 * fltv.CHUNK + 1000
    g = torch.Generator().manual_seed(3)
    step = torch.randint(1, 4, (n,), generator=g)
    step[fltv.CHUNK] = 70_000  # an escaped gap as the first of the second piece
    step[fltv.CHUNK - 1] = 300  # and one as the last of the first
    idx = torch.cumsum(step, 0) - 1
    vals = torch.randn(n, generator=g)
    tv = SparseTaskVector({"w": SparseTensor((int(idx[-1]) + 5,), idx, vals)})
    for values in ("float32", "bf16", "int8"):
        back = decode(encode(tv, values=values))
        assert torch.equal(back["w"].indices, tv["w"].indices)
        want = {"float32": vals, "bf16": vals.to(torch.bfloat16).float()}.get(values)
        if want is not None:
            assert torch.equal(back["w"].values, want)
        else:  # int8: one scale for the tensor, every value within half a step
            scale = float(vals.abs().max()) / 127
            assert float((back["w"].values - vals).abs().max()) <= scale / 2 + 1e-6
        again = decode(encode(back, values=values, values_only=True), mask=back)
        assert torch.equal(again["w"].values, back["w"].values)


def test_native_decode_holds_bf16_values_as_sent_and_nothing_else_changes():
    tv = make_tv()
    full = decode(encode(tv, values="bf16"))
    native = decode(encode(tv, values="bf16"), native=True)
    for n in tv:
        assert native[n].values.dtype == torch.bfloat16
        assert torch.equal(native[n].values.float(), full[n].values)
        assert torch.equal(native[n].indices, full[n].indices)
    # float32 and int8 payloads carry values bf16 cannot hold: they stay float32
    for values in ("float32", "int8"):
        got = decode(encode(tv, values=values), native=True)
        assert all(t.values.dtype == torch.float32 for t in got.values())


@pytest.mark.parametrize("values", ["bf16", "float32", "int8"])
def test_a_packed_decode_holds_dense_enough_tensors_packed_and_reads_the_same(values):
    tv = make_tv(sparsity=0.4)  # 60% of each tensor: packing is smaller
    tv = SparseTaskVector({**tv, "sparse.weight": make_tv(1, sparsity=0.95)["l0.mlp.up.weight"]})
    payload = encode(tv, values=values)
    plain, packed = decode(payload, native=True), decode(payload, native=True, pack=True)
    assert isinstance(packed.stored("l0.mlp.up.weight"), PackedTensor)
    assert isinstance(packed.stored("sparse.weight"), SparseTensor)
    for n in tv:
        assert torch.equal(packed[n].indices, plain[n].indices) and torch.equal(packed[n].values, plain[n].values)
    assert encode(packed, values=values) == payload
    # values-only payloads decode the same against a packed layout
    vo = encode(tv, values=values, values_only=True)
    for n, t in decode(vo, mask=packed).items():
        assert torch.equal(t.values, decode(vo, mask=tv)[n].values)


def test_a_vector_whose_tensors_change_between_the_two_passes_is_refused():
    """encode_tensors asks for the tensors twice (sizes, then streams): a producer that
    gives other tensors the second time gets a CodecError, not a payload that lies."""
    tv = make_tv()
    calls = []

    def shifting():
        calls.append(1)
        items = list(tv.items())
        return items if len(calls) == 1 else items[:1]

    with pytest.raises(CodecError, match="changed between"):
        codec.encode_tensors(shifting)
    calls.clear()

    def other_values():
        calls.append(1)
        if len(calls) == 1:
            return list(tv.items())
        return [(n, SparseTensor(t.shape, t.flat_indices()[:-1], t.values[:-1])) for n, t in tv.items()]

    with pytest.raises(CodecError, match="changed between"):
        codec.encode_tensors(other_values)

    # the same counts, other positions, or values the first pass never saw: still refused
    def second(change):
        def tensors():
            calls.append(1)
            return list(tv.items()) if len(calls) % 2 else [(n, change(t)) for n, t in tv.items()]

        return tensors

    moved = second(lambda t: SparseTensor(t.shape, torch.arange(t.nnz), t.values))
    with pytest.raises(CodecError, match="changed between"):
        codec.encode_tensors(moved)
    nan = second(lambda t: SparseTensor(t.shape, t.indices, torch.full_like(t.values, float("nan"))))
    with pytest.raises(CodecError, match="NaN"):
        codec.encode_tensors(nan)
    scaled = second(lambda t: SparseTensor(t.shape, t.indices, t.values * 2))
    with pytest.raises(CodecError, match="changed between"):
        codec.encode_tensors(scaled, values="int8")


def test_values_in_any_memory_layout_encode():
    """A vector whose values are a view (a support's one shared zero, a strided slice)
    encodes in every dtype, as a contiguous copy would."""
    tv = make_tv()
    strided = SparseTaskVector(
        {n: SparseTensor(t.shape, t.indices, torch.stack([t.values, t.values], 1)[:, 0]) for n, t in tv.items()}
    )
    for values in ("float32", "bf16", "int8"):
        assert encode(strided, values=values) == encode(tv, values=values)
        back = decode(encode(tv.support(), values=values))
        assert all(not t.values.any() for t in back.values())


def test_one_block_decodes_values_as_views_of_one_block_that_still_save_and_load(tmp_path):
    """``one_block``: the values are views of one block (freed as one piece); every reader,
    safetensors included, sees separate tensors. Without it each tensor owns its values."""
    tv = make_tv()
    names = list(tv)
    plain = decode(encode(tv, values="float32"))
    ptr = [plain[n].values.untyped_storage().data_ptr() for n in names]
    assert ptr[0] != ptr[1]
    got = decode(encode(tv, values="float32"), one_block=True)
    ptr = [got[n].values.untyped_storage().data_ptr() for n in names]
    assert ptr[0] == ptr[1]
    got.save(tmp_path / "v.safetensors")
    back = SparseTaskVector.load(tmp_path / "v.safetensors")
    for n in tv:
        assert torch.equal(back[n].values, tv[n].values) and torch.equal(back[n].indices, tv[n].indices)


def test_encoding_holds_the_payload_and_not_a_second_copy_of_it():
    """The streams are joined into the payload part by part, each dropped once copied:
    Python's allocations peak near one payload (``b"".join`` of the parts held two)."""
    import tracemalloc

    g = torch.Generator().manual_seed(0)
    # int8 holds its losing layout too (measured 2.7x: both layouts and a piece's temporaries)
    for values, n, bound in (("float32", 3_000_000, 1.7), ("int8", 12_000_000, 3.0)):
        tv = SparseTaskVector({"a": SparseTensor((n,), None, torch.randn(n, generator=g))})
        tracemalloc.start()
        try:
            payload = encode(tv, values=values)  # random values: the streams barely compress
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < bound * len(payload), (values, peak, len(payload))
