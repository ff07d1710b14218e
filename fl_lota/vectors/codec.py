"""FLTV bytes from a sparse task vector and back (``encode``, ``peek``, ``decode``; the
encoder lives in ``fl_lota.vectors.encoder``); the format's layout and limits are in
``fl_lota.vectors.fltv``. Every malformed input raises
``CodecError`` (a ``ValueError``) naming the problem.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from fl_lota.vectors.encoder import encode, encode_tensors
from fl_lota.vectors.fltv import (
    CHUNK,
    CODE_MAX,
    DTYPE_NAMES,
    ESCAPE,
    FLAG_DENSE,
    HEADER,
    MAGIC,
    MAX_ENTRIES,
    MAX_EXPANSION,
    MAX_NDIM,
    MAX_NUMEL,
    MAX_TENSORS,
    MODE_FULL,
    MODE_VALUES_ONLY,
    PLANES,
    VALUE_DTYPES,
    VERSION,
    CodecError,
    Header,
    MaskMismatchError,
    Reader,
    as_layout,
    body_checksum,
    bytes_to_values,
    index_entropy_bits,
    index_entropy_bytes,
    mask_fingerprint,
)
from fl_lota.vectors.task_vector import PackedTensor, SparseTaskVector, SparseTensor, index_dtype

__all__ = [
    "HEADER",
    "MAX_ENTRIES",
    "VALUE_DTYPES",
    "CodecError",
    "Header",
    "MaskMismatchError",
    "decode",
    "encode",
    "encode_tensors",
    "index_entropy_bits",
    "index_entropy_bytes",
    "mask_fingerprint",
    "peek",
]


# ---------------------------------------------------------------------------- decode


def peek(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> Header:
    """Read and check the header and checksum without decoding the body."""
    data = memoryview(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"payload of {len(data):,} bytes exceeds the limit of {max_bytes:,}")
    if len(data) < HEADER.size:
        raise CodecError(f"truncated payload: {len(data)} bytes, the header alone needs {HEADER.size}")
    magic, version, mode, dcode, reserved, fp, body_len, checksum = HEADER.unpack(data[: HEADER.size])
    if magic != MAGIC:
        raise CodecError(f"not an FLTV payload (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CodecError(f"unsupported FLTV version {version}; this build reads version {VERSION}")
    if body_len != len(data) - HEADER.size:
        raise CodecError(
            f"truncated or padded payload: header announces {body_len:,} body bytes, "
            f"{len(data) - HEADER.size:,} present"
        )
    if body_checksum(bytes(data[:24]), data[HEADER.size :]) != checksum:
        raise CodecError("checksum mismatch: the payload was corrupted")
    if mode not in (MODE_FULL, MODE_VALUES_ONLY):
        raise CodecError(f"unknown mode {mode}")
    if reserved != 0:
        raise CodecError(f"reserved header byte is {reserved}, must be 0")
    if dcode not in DTYPE_NAMES:
        raise CodecError(f"unknown value dtype code {dcode}")
    return Header(version, mode == MODE_VALUES_ONLY, DTYPE_NAMES[dcode], bytes(fp), body_len, dcode)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    mask: SparseTaskVector | Mapping[str, torch.Tensor] | None = None,
    max_bytes: int | None = None,
    max_entries: int = MAX_ENTRIES,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_abs: float | None = None,
    native: bool = False,
    pack: bool = False,
    one_block: bool = False,
) -> SparseTaskVector:
    """Parse an FLTV payload into a SparseTaskVector (float32 values). ``mask`` is required
    for values-only payloads and must be the one they were encoded against. ``native``:
    hold the values of a bf16 payload as bfloat16 (exact: they were sent as bf16), half the
    memory; a reader that computes with them converts to float32 first. ``pack``: store each
    tensor packed where that is smaller (``PackedTensor.smaller``), as it is decoded (a full
    payload's tensors only: a values-only payload's share the mask's positions). ``one_block``:
    every tensor's values are views of one block, freed as one piece once the whole vector
    is dropped (the server's uploads); a reader that keeps some tensors and drops others
    should not ask for it (the block lives while any of its tensors does).

    Everything is checked before it is allocated: ``max_bytes`` refuses a larger payload
    before reading it; the tensor table is checked against ``shapes`` (names and shapes a
    receiver accepts, e.g. a model's parameters) and against ``max_entries`` before any
    stream is decompressed, and every stream must be one zstd frame declaring exactly the
    size the table implies (zstd's RLE blocks would let a few KB expand to a TB). Indices
    must be in range and strictly increasing; values finite, and at most ``max_abs`` in
    magnitude after int8 scaling when given."""
    head = peek(data, max_bytes=max_bytes)
    r = Reader(memoryview(data)[HEADER.size :])
    (n_tensors,) = r.unpack("<I", "tensor count")
    if n_tensors > MAX_TENSORS:
        raise CodecError(f"absurd tensor count {n_tensors}")
    entries = []
    seen = set()
    for i in range(n_tensors):
        (name_len,) = r.unpack("<H", f"tensor {i} name length")
        try:
            name = bytes(r.take(name_len, f"tensor {i} name")).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"tensor {i} name is not UTF-8") from None
        if not name or name in seen:
            raise CodecError(f"tensor {i}: empty or repeated name {name!r}")
        seen.add(name)
        (ndim,) = r.unpack("<B", f"{name} ndim")
        if ndim > MAX_NDIM:
            raise CodecError(f"{name}: absurd ndim {ndim}")
        shape = r.unpack(f"<{ndim}Q", f"{name} shape")
        numel = math.prod(shape)
        if numel > MAX_NUMEL:
            raise CodecError(f"{name}: absurd shape {shape}")
        flags, nnz, scale = r.unpack("<BQf", f"{name} entry")
        dense = bool(flags & FLAG_DENSE)
        if flags & ~FLAG_DENSE:
            raise CodecError(f"{name}: unknown flags {flags:#x}")
        if nnz > numel or (dense and nnz != numel):
            raise CodecError(f"{name}: count {nnz:,} disagrees with shape {shape} (numel {numel:,})")
        if not (math.isfinite(scale) and scale > 0):
            raise CodecError(f"{name}: invalid scale {scale}")
        if shapes is not None:
            if name not in shapes:
                raise CodecError(f"tensor {name!r} is not one the receiver accepts")
            if tuple(shape) != tuple(shapes[name]):
                raise CodecError(f"tensor {name!r} has shape {tuple(shape)}, expected {tuple(shapes[name])}")
        entries.append((name, tuple(shape), dense, nnz, scale))

    layout = None
    if head.values_only:
        if mask is None:
            raise CodecError("values-only payload: decode needs the mask it was encoded against")
        layout = as_layout(mask)
        if mask_fingerprint(layout) != head.fingerprint:
            raise MaskMismatchError("values-only payload was encoded against a different mask (fingerprint mismatch)")
        if [(e[0], e[1], e[3]) for e in entries] != [(n, (t := layout.stored(n)).shape, t.nnz) for n in layout]:
            raise CodecError("values-only payload's tensor table disagrees with the mask")

    sparse_nnz = sum(e[3] for e in entries if not e[2])
    total_nnz = sum(e[3] for e in entries)
    if total_nnz > max_entries:
        raise CodecError(f"payload announces {total_nnz:,} entries, more than the limit of {max_entries:,}")
    codes = escapes = None
    if not head.values_only:
        codes = r.frame(sparse_nnz, "gap codes")
        escapes = r.frame(None, "escaped gaps", multiple=8, at_most=8 * sparse_nnz)
    dcode = head.dtype_code
    planes = [r.frame(total_nnz, f"value plane {i}") for i in range(PLANES[dcode])]
    if r.pos != len(r.buf):
        raise CodecError(f"{len(r.buf) - r.pos} trailing bytes after the last stream")
    hold = torch.bfloat16 if (native and dcode == VALUE_DTYPES["bf16"]) else torch.float32
    walk = _Walk(entries, layout, codes, escapes, planes, dcode, max_abs, hold, pack and layout is None, one_block)
    # What the tensors take once decoded. A payload that expands far beyond its own size is
    # checked whole, one tensor at a time, before anything is kept, so rejecting it costs
    # its own size plus one tensor; a payload of ordinary compression is decoded in one pass.
    decoded = sum(
        nnz * (hold.itemsize + (0 if (dense or head.values_only) else index_dtype(math.prod(shape)).itemsize))
        for _, shape, dense, nnz, _ in entries
    )
    try:
        if decoded > MAX_EXPANSION * len(r.buf):
            walk.run(keep=False)
        return SparseTaskVector(walk.run(keep=True))
    except MemoryError:
        raise CodecError(f"out of memory decoding {total_nnz:,} entries") from None


class _Walk:
    """Decodes a payload's tensors from its streams, one piece of at most ``CHUNK`` entries
    at a time, checking each piece; only the decoded tensors themselves are kept."""

    def __init__(self, entries, layout, codes, escapes, planes, dcode, max_abs, hold, pack, one_block) -> None:
        self.entries, self.layout, self.dcode, self.max_abs, self.hold = entries, layout, dcode, max_abs, hold
        self.pack, self.one_block = pack, one_block
        self.codes, self.escapes, self.planes = codes, escapes, planes
        self.streams = [x for x in (codes, escapes, *planes) if x is not None]

    def _indices(self, name: str, numel: int, n: int, last: int) -> np.ndarray:
        """The next ``n`` indices of a sparse tensor, after index ``last``."""
        codes = np.frombuffer(self.codes.read(n), dtype=np.uint8)
        escaped = codes == ESCAPE
        n_big = int(escaped.sum())
        big = np.frombuffer(self.escapes.read(8 * n_big), dtype="<u8")
        if n_big and (big.min() < ESCAPE or big.max() >= MAX_NUMEL):
            raise CodecError(f"{name}: escaped gap out of range")
        idx = codes.astype(np.int64)
        idx[escaped] = big.astype(np.int64)
        if int(idx.max()) >= numel:
            raise CodecError(f"{name}: a gap of {int(idx.max()):,} leaves the tensor of {numel:,} entries")
        # index = previous index + gap + 1. Each gap < numel <= 2^40 and a piece holds at most
        # 2^20 of them, so the sums stay below 2^63 and strictly increase
        idx += 1
        np.cumsum(idx, out=idx)
        idx += last
        if int(idx[-1]) >= numel:
            raise CodecError(f"{name}: indices run past the tensor of {numel:,} entries")
        return idx

    def _values(self, name: str, n: int, scale: float) -> torch.Tensor:
        v = bytes_to_values(b"".join(p.read(n) for p in self.planes), n, self.dcode)
        if self.dcode in CODE_MAX:
            v = v * scale  # the scale can make finite integer codes infinite: check after it
        if not torch.isfinite(v).all():
            raise CodecError(f"{name}: values hold NaN or Inf")
        if self.max_abs is not None and n and float(v.abs().max()) > self.max_abs:
            raise CodecError(
                f"{name}: a value of magnitude {float(v.abs().max()):.3g} exceeds the limit {self.max_abs:g}"
            )
        return v

    def run(self, *, keep: bool) -> dict[str, SparseTensor | PackedTensor]:
        for stream in self.streams:
            stream.rewind()
        out = {}
        # one_block: every tensor's values are views into one block. Freed, it is one piece of
        # memory the next allocations can reuse, not a hole per tensor between the positions
        # that a registered mask keeps.
        one = keep and self.one_block and not self.pack
        block = torch.empty(sum(e[3] for e in self.entries) if one else 0, dtype=self.hold)
        at = 0
        for name, shape, dense, nnz, scale in self.entries:
            numel = math.prod(shape)
            sparse = self.layout is None and not dense
            # positions held in the dtype SparseTensor keeps (int32 below 2^31 entries): no
            # int64 copy of a whole tensor's indices is ever made
            wide = index_dtype(numel) == torch.int64
            idx = np.empty(nnz, dtype=np.int64 if wide else np.int32) if (keep and sparse) else None
            vals = None
            if keep:
                vals = block[at : at + nnz] if one else torch.empty(nnz, dtype=self.hold)
                at += nnz
            last = -1
            for lo in range(0, nnz, CHUNK):
                n = min(CHUNK, nnz - lo)
                if sparse:
                    piece = self._indices(name, numel, n, last)
                    last = int(piece[-1])
                    if keep:
                        idx[lo : lo + n] = piece
                v = self._values(name, n, scale)
                if keep:
                    vals[lo : lo + n] = v
            if keep:
                if self.layout is not None:
                    indices = self.layout[name].indices
                else:
                    indices = None if dense else torch.from_numpy(idx)
                t = SparseTensor(shape, indices, vals)
                if self.pack and PackedTensor.smaller(numel, nnz, self.hold.itemsize):
                    t = PackedTensor.pack(t)  # one tensor held in both forms for a moment
                out[name] = t
        for stream in self.streams:
            stream.close()
        return out
