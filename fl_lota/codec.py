"""The FLTV wire format: a sparse task vector as compact, checked bytes.

Indices are sent as gap codes: per tensor, gap_i = idx_i - idx_{i-1} - 1 (idx_{-1} = -1),
one byte each when below 255, else byte 255 plus the full gap as u64 in a side stream.
At 10% density gaps are geometric with mean 9, so zstd over the byte stream lands near the
mask's entropy bound (about 4.8 bits per kept entry against 4.69, where int32 indices cost
32). Values are float32 (lossless), bf16 (default) or int8 with a per-tensor scale, split
into byte planes (all high bytes, then all low bytes) before zstd, which compresses the
exponent-heavy high plane well. In values-only mode the index streams are left out: the
receiver decodes against the mask it already holds, identified by a fingerprint.

Layout, version 1 (all integers little-endian):

    offset size  field
    0      4     magic b"FLTV"
    4      1     version = 1
    5      1     mode: 0 = indices + values, 1 = values only
    6      1     value dtype: 0 = float32, 1 = bfloat16, 2 = int8 + per-tensor f32 scale
    7      1     reserved, 0
    8      8     mask fingerprint: blake2b-64 of names, shapes and indices
    16     8     body length in bytes
    24     16    checksum: blake2b-128 over bytes [0, 24) and the body
    40     ...   body:
                   u32 tensor count, then per tensor:
                     u16 name length, name (UTF-8), u8 ndim, ndim x u64 dims,
                     u8 flags (bit 0: dense, no indices), u64 nnz, f32 scale
                   then streams, each u64 raw length, u64 compressed length, zstd frame:
                     mode 0 only: gap codes (u8 x sparse nnz), escaped gaps (u64 each)
                     value planes: 4 (float32), 2 (bfloat16) or 1 (int8), nnz bytes each

Every malformed input raises ``CodecError`` (a ``ValueError``) naming the problem.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from .task_vector import SparseTaskVector, SparseTensor

__all__ = [
    "CodecError",
    "Header",
    "MaskMismatchError",
    "VALUE_DTYPES",
    "decode",
    "encode",
    "index_entropy_bits",
    "mask_fingerprint",
    "peek",
]

MAGIC = b"FLTV"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8sQ16s")  # 40 bytes
MODE_FULL, MODE_VALUES_ONLY = 0, 1
VALUE_DTYPES = {"float32": 0, "bf16": 1, "int8": 2}
_DTYPE_NAMES = {v: k for k, v in VALUE_DTYPES.items()}
_PLANES = {0: 4, 1: 2, 2: 1}
ESCAPE = 255
MAX_NDIM = 8
MAX_NUMEL = 1 << 40  # per tensor: far above any real weight matrix
MAX_TENSORS = 1 << 20
MAX_ENTRIES = 1 << 31  # default cap on a payload's total kept entries (decode's max_entries)
FLAG_DENSE = 1
MAX_WINDOW_LOG = 21  # zstd window (2 MiB) a receiver allocates per stream at most; level 1 uses 512 KiB
CHUNK = 1 << 20  # entries decoded and checked at a time
MAX_EXPANSION = 16  # decoded bytes per payload byte above which decode checks before it keeps


class CodecError(ValueError):
    """A payload that cannot be encoded or decoded; the message names the problem."""


class MaskMismatchError(CodecError):
    """A values-only payload encoded against another mask than the one given to decode."""


@dataclass(frozen=True)
class Header:
    version: int
    values_only: bool
    value_dtype: str
    fingerprint: bytes
    body_len: int


# ---------------------------------------------------------------------------- helpers


def _checksum(head: bytes, body: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(head)
    h.update(body)
    return h.digest()


def mask_fingerprint(layout: Mapping[str, SparseTensor] | Mapping[str, torch.Tensor]) -> bytes:
    """8-byte identity of a mask: tensor names, shapes and kept indices, in order.
    Accepts a SparseTaskVector (its layout) or a dict of boolean masks."""
    h = hashlib.blake2b(digest_size=8)
    for name, t in layout.items():
        if isinstance(t, SparseTensor):
            shape, idx = t.shape, t.indices
        else:
            shape, idx = tuple(t.shape), torch.nonzero(t.reshape(-1), as_tuple=False).reshape(-1)
        h.update(name.encode())
        h.update(struct.pack(f"<B{len(shape)}Q", len(shape), *shape))
        if idx is None:
            h.update(b"D")
        else:
            h.update(b"S")
            h.update(idx.to(torch.int64).cpu().numpy().tobytes())
    return h.digest()


def index_entropy_bits(numel: int, nnz: int) -> float:
    """log2 C(numel, nnz): the fewest bits any code can spend on a uniformly random
    mask with these counts (the bound the gap code is measured against)."""
    if nnz <= 0 or nnz >= numel:
        return 0.0
    return (math.lgamma(numel + 1) - math.lgamma(nnz + 1) - math.lgamma(numel - nnz + 1)) / math.log(2)


def _as_layout(mask) -> SparseTaskVector:
    if isinstance(mask, SparseTaskVector):
        return mask
    if isinstance(mask, Mapping):
        return SparseTaskVector(
            {
                n: SparseTensor(
                    tuple(m.shape), torch.nonzero(m.reshape(-1), as_tuple=False).reshape(-1), torch.zeros(int(m.sum()))
                )
                for n, m in mask.items()
            }
        )
    raise CodecError(
        f"a values-only payload needs the mask as a SparseTaskVector or dict of bool tensors, got {type(mask).__name__}"
    )


def _values_to_bytes(values: np.ndarray | torch.Tensor, dtype_code: int) -> bytes:
    """float32 values -> byte planes (plane-major)."""
    v = values
    if dtype_code == 0:
        raw = v.numpy().astype("<f4", copy=False).view(np.uint8).reshape(-1, 4)
    elif dtype_code == 1:
        raw = v.to(torch.bfloat16).view(torch.int16).numpy().view("<u2").view(np.uint8).reshape(-1, 2)
    else:
        raw = v.numpy().view(np.uint8).reshape(-1, 1)
    return np.ascontiguousarray(raw.T).tobytes()


def _bytes_to_values(planes: bytes, n: int, dtype_code: int) -> torch.Tensor:
    k = _PLANES[dtype_code]
    arr = np.frombuffer(planes, dtype=np.uint8).reshape(k, n).T.copy()
    if dtype_code == 0:
        return torch.from_numpy(arr.view("<f4").reshape(-1).astype(np.float32, copy=False))
    if dtype_code == 1:
        return torch.from_numpy(arr.view("<i2").reshape(-1).copy()).view(torch.bfloat16).float()
    return torch.from_numpy(arr.view(np.int8).reshape(-1).astype(np.float32))


def _gap_codes(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gaps = np.diff(idx, prepend=-1) - 1
    codes = np.minimum(gaps, ESCAPE).astype(np.uint8)
    return codes, gaps[gaps >= ESCAPE].astype("<u8")


# ---------------------------------------------------------------------------- encode


def encode(
    tv: SparseTaskVector,
    *,
    values: str = "bf16",
    values_only: bool = False,
    level: int = 1,
) -> bytes:
    """Serialise ``tv``. values: "float32" | "bf16" | "int8". values_only: leave the
    indices out; the receiver must decode with the same mask (``decode(data, mask=...)``).
    level: zstd level. 1 is the default because it is both the fastest and the tightest
    here: gap codes and value bytes are close to i.i.d., so the longer match search of
    higher levels only adds overhead (measured: 4.75 vs 4.82 bits per index at level 3)."""
    if values not in VALUE_DTYPES:
        raise CodecError(f"unknown value dtype {values!r}; known: {sorted(VALUE_DTYPES)}")
    if len(tv) > MAX_TENSORS:
        raise CodecError(f"{len(tv)} tensors exceed the format's limit of {MAX_TENSORS}")
    dcode = VALUE_DTYPES[values]
    table = [struct.pack("<I", len(tv))]
    codes_parts, big_parts, value_parts = [], [], []
    for name, t in tv.items():
        nb = name.encode("utf-8")
        if not nb or len(nb) > 0xFFFF:
            raise CodecError(f"tensor name {name!r} must be 1..65535 bytes of UTF-8")
        if len(t.shape) > MAX_NDIM or t.numel > MAX_NUMEL:
            raise CodecError(f"{name}: shape {t.shape} exceeds the format's limits")
        v = t.values.detach().float().cpu().reshape(-1)
        if not torch.isfinite(v).all():
            raise CodecError(f"{name}: values hold NaN or Inf")
        scale = 1.0
        if dcode == 2:
            amax = float(v.abs().max()) if v.numel() else 0.0
            scale = amax / 127.0 if amax > 0 else 1.0
            v = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
        value_parts.append(v)
        flags = FLAG_DENSE if t.indices is None else 0
        if t.indices is not None and not values_only:
            idx = t.indices.cpu().numpy()
            if idx.size and (idx[0] < 0 or idx[-1] >= t.numel):
                raise CodecError(f"{name}: indices outside [0, {t.numel})")
            if idx.size > 1 and not (np.diff(idx) > 0).all():
                raise CodecError(f"{name}: indices must be strictly increasing")
            c, b = _gap_codes(idx)
            codes_parts.append(c)
            big_parts.append(b)
        table.append(struct.pack("<H", len(nb)) + nb + struct.pack(f"<B{len(t.shape)}Q", len(t.shape), *t.shape))
        table.append(struct.pack("<BQf", flags, t.nnz, scale))

    params = zstandard.ZstdCompressionParameters.from_level(level)
    if params.window_log > MAX_WINDOW_LOG:  # a receiver refuses frames that need a larger window
        params = zstandard.ZstdCompressionParameters.from_level(level, window_log=MAX_WINDOW_LOG)
    cctx = zstandard.ZstdCompressor(compression_params=params)
    streams = []
    if not values_only:
        streams.append(np.concatenate(codes_parts).tobytes() if codes_parts else b"")
        streams.append(np.concatenate(big_parts).tobytes() if big_parts else b"")
    planes = _values_to_bytes(torch.cat(value_parts), dcode) if value_parts else b""
    n_total = sum(p.numel() for p in value_parts)
    k = _PLANES[dcode]
    for i in range(k):
        streams.append(planes[i * n_total : (i + 1) * n_total])
    body = bytearray(b"".join(table))
    for s in streams:
        comp = cctx.compress(s)
        body += struct.pack("<QQ", len(s), len(comp)) + comp
    mode = MODE_VALUES_ONLY if values_only else MODE_FULL
    fp = mask_fingerprint(tv)
    head = HEADER.pack(MAGIC, VERSION, mode, dcode, 0, fp, len(body), b"\0" * 16)[:24]
    return head + _checksum(head, body) + bytes(body)


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
    if _checksum(bytes(data[:24]), data[HEADER.size :]) != checksum:
        raise CodecError("checksum mismatch: the payload was corrupted")
    if mode not in (MODE_FULL, MODE_VALUES_ONLY):
        raise CodecError(f"unknown mode {mode}")
    if reserved != 0:
        raise CodecError(f"reserved header byte is {reserved}, must be 0")
    if dcode not in _DTYPE_NAMES:
        raise CodecError(f"unknown value dtype code {dcode}")
    return Header(version, mode == MODE_VALUES_ONLY, _DTYPE_NAMES[dcode], bytes(fp), body_len)


class _Reader:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise CodecError(f"truncated body while reading {what}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size, what))

    def frame(self, expected: int | None, what: str, *, multiple: int = 1, at_most: int = 0) -> _Inflater:
        """One stream: its two lengths, then exactly one zstd frame that declares and holds
        exactly ``expected`` bytes (or, when ``expected`` is None, a multiple of ``multiple``
        up to ``at_most``), and nothing after it. Only headers are read here: the frame is
        decompressed later, piece by piece, so no frame can expand past what the (already
        checked) tensor table implies, and not all at once."""
        raw_len, comp_len = self.unpack("<QQ", f"{what} stream header")
        if expected is None:
            if raw_len % multiple or raw_len > at_most:
                raise CodecError(f"{what} stream holds {raw_len:,} bytes, impossible for this tensor table")
        elif raw_len != expected:
            raise CodecError(f"{what} stream holds {raw_len:,} bytes, the tensor table implies {expected:,}")
        comp = self.take(comp_len, f"{what} stream")
        try:
            declared = zstandard.frame_content_size(comp)
        except zstandard.ZstdError as e:
            raise CodecError(f"{what} stream is not a zstd frame: {e}") from None
        if declared != raw_len:
            said = "no size" if declared < 0 else f"{declared:,} bytes"
            raise CodecError(f"{what} stream's zstd frame declares {said}, the tensor table implies {raw_len:,}")
        length = _frame_length(comp, what)
        if length != len(comp):
            raise CodecError(f"{what} stream: {len(comp) - length:,} bytes after its zstd frame")
        window = zstandard.get_frame_parameters(comp).window_size
        if window > 1 << MAX_WINDOW_LOG:
            raise CodecError(
                f"{what} stream's zstd frame needs a {window:,}-byte window, "
                f"more than the limit of {1 << MAX_WINDOW_LOG:,}"
            )
        return _Inflater(comp, raw_len, what)


class _Inflater:
    """Reads a checked zstd frame in pieces: never more than the frame declares, and the
    frame must end (checksum included) exactly when its declared bytes are read."""

    def __init__(self, comp: memoryview, size: int, what: str) -> None:
        self.comp, self.size, self.what = comp, size, what
        self.rewind()

    def rewind(self) -> None:
        dctx = zstandard.ZstdDecompressor(max_window_size=1 << MAX_WINDOW_LOG)
        self._src = dctx.stream_reader(self.comp, read_across_frames=False)
        self.left = self.size

    def read(self, n: int) -> memoryview:
        if n > self.left:
            raise CodecError(f"{self.what} stream holds fewer bytes than the tensor table needs")
        buf = memoryview(bytearray(n))
        got = 0
        try:
            while got < n:
                k = self._src.readinto(buf[got:])
                if k == 0:
                    raise CodecError(f"{self.what} stream ends before the {self.size:,} bytes its frame declares")
                got += k
        except zstandard.ZstdError as e:
            raise CodecError(f"{self.what} stream does not decompress: {e}") from None
        self.left -= n
        return buf

    def close(self) -> None:
        if self.left:
            raise CodecError(f"{self.what} stream holds {self.left:,} bytes that no tensor uses")
        try:
            extra = self._src.read(1)  # reads the frame's end, and checks its checksum
        except zstandard.ZstdError as e:
            raise CodecError(f"{self.what} stream does not decompress: {e}") from None
        if extra:
            raise CodecError(f"{self.what} stream decompresses past the size its frame declares")


def _frame_length(comp: bytes, what: str) -> int:
    """Bytes of the first zstd frame in ``comp``, from its block headers (3 bytes each:
    last-block bit, type, size; raw and compressed blocks carry ``size`` bytes, RLE blocks
    one), plus the 4-byte checksum when the frame has one."""
    try:
        pos = zstandard.frame_header_size(comp)
        checksum = zstandard.get_frame_parameters(comp).has_checksum
    except zstandard.ZstdError as e:
        raise CodecError(f"{what} stream: bad zstd frame header: {e}") from None
    while True:
        if pos + 3 > len(comp):
            raise CodecError(f"{what} stream: zstd frame truncated")
        head = int.from_bytes(comp[pos : pos + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        if kind == 3:
            raise CodecError(f"{what} stream: reserved zstd block type")
        pos += 3 + (1 if kind == 1 else size)
        if last:
            break
    return pos + (4 if checksum else 0)


def decode(
    data: bytes | bytearray | memoryview,
    *,
    mask: SparseTaskVector | Mapping[str, torch.Tensor] | None = None,
    max_bytes: int | None = None,
    max_entries: int = MAX_ENTRIES,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_abs: float | None = None,
) -> SparseTaskVector:
    """Parse an FLTV payload into a SparseTaskVector (float32 values). ``mask`` is required
    for values-only payloads and must be the one they were encoded against.

    Everything is checked before it is allocated: ``max_bytes`` refuses a larger payload
    before reading it; the tensor table is checked against ``shapes`` (names and shapes a
    receiver accepts, e.g. a model's parameters) and against ``max_entries`` before any
    stream is decompressed, and every stream must be one zstd frame declaring exactly the
    size the table implies (zstd's RLE blocks would let a few KB expand to a TB). Indices
    must be in range and strictly increasing; values finite, and at most ``max_abs`` in
    magnitude after int8 scaling when given."""
    head = peek(data, max_bytes=max_bytes)
    r = _Reader(memoryview(data)[HEADER.size :])
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
        layout = _as_layout(mask)
        if mask_fingerprint(layout) != head.fingerprint:
            raise MaskMismatchError("values-only payload was encoded against a different mask (fingerprint mismatch)")
        if [(e[0], e[1], e[3]) for e in entries] != [(n, t.shape, t.nnz) for n, t in layout.items()]:
            raise CodecError("values-only payload's tensor table disagrees with the mask")

    sparse_nnz = sum(e[3] for e in entries if not e[2])
    total_nnz = sum(e[3] for e in entries)
    if total_nnz > max_entries:
        raise CodecError(f"payload announces {total_nnz:,} entries, more than the limit of {max_entries:,}")
    codes = escapes = None
    if not head.values_only:
        codes = r.frame(sparse_nnz, "gap codes")
        escapes = r.frame(None, "escaped gaps", multiple=8, at_most=8 * sparse_nnz)
    dcode = VALUE_DTYPES[head.value_dtype]
    planes = [r.frame(total_nnz, f"value plane {i}") for i in range(_PLANES[dcode])]
    if r.pos != len(r.buf):
        raise CodecError(f"{len(r.buf) - r.pos} trailing bytes after the last stream")
    walk = _Walk(entries, layout, codes, escapes, planes, dcode, max_abs)
    # What the tensors take once decoded. A payload that expands far beyond its own size is
    # checked whole, one tensor at a time, before anything is kept, so rejecting it costs
    # its own size plus one tensor; a payload of ordinary compression is decoded in one pass.
    decoded = sum(nnz * (4 if (dense or head.values_only) else 12) for _, _, dense, nnz, _ in entries)
    try:
        if decoded > MAX_EXPANSION * len(r.buf):
            walk.run(keep=False)
        return SparseTaskVector(walk.run(keep=True))
    except MemoryError:
        raise CodecError(f"out of memory decoding {total_nnz:,} entries") from None


class _Walk:
    """Decodes a payload's tensors from its streams, one piece of at most ``CHUNK`` entries
    at a time, checking each piece; only the decoded tensors themselves are kept."""

    def __init__(self, entries, layout, codes, escapes, planes, dcode, max_abs) -> None:
        self.entries, self.layout, self.dcode, self.max_abs = entries, layout, dcode, max_abs
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
        v = _bytes_to_values(b"".join(p.read(n) for p in self.planes), n, self.dcode)
        if self.dcode == 2:
            v = v * scale  # the scale can make finite int8 codes infinite: check after it
        if not torch.isfinite(v).all():
            raise CodecError(f"{name}: values hold NaN or Inf")
        if self.max_abs is not None and n and float(v.abs().max()) > self.max_abs:
            raise CodecError(
                f"{name}: a value of magnitude {float(v.abs().max()):.3g} exceeds the limit {self.max_abs:g}"
            )
        return v

    def run(self, *, keep: bool) -> dict[str, SparseTensor]:
        for stream in self.streams:
            stream.rewind()
        out = {}
        for name, shape, dense, nnz, scale in self.entries:
            numel = math.prod(shape)
            sparse = self.layout is None and not dense
            idx = np.empty(nnz, dtype=np.int64) if (keep and sparse) else None
            vals = torch.empty(nnz, dtype=torch.float32) if keep else None
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
                out[name] = SparseTensor(shape, indices, vals)
        for stream in self.streams:
            stream.close()
        return out
