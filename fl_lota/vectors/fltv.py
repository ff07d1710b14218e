"""The FLTV wire format: its layout, limits, errors and the byte-level helpers that
``fl_lota.vectors.codec`` encodes and decodes with.

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
    6      1     value dtype: 0 = float32, 1 = bfloat16, 2 = int8 + per-tensor f32 scale,
                 3 = the same int8 in two planes of nibbles, 4 = int4 (codes -7..7) + scale
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
                     value planes: 4 (float32), 2 (bfloat16), 1 (int8), 2 (int8 as nibbles)
                     or 1 (int4: the zigzag code 0..14 in a byte), nnz bytes each

int8 codes c in [-127, 127] go as one byte plane (dtype 2), or (dtype 3) as their zigzag
z = (c << 1) ^ (c >> 7) (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...) split into a plane of high
nibbles (z >> 4) and one of low nibbles (z & 15); the encoder compresses both and sends the
smaller. zstd's entropy coder gives up on a byte stream whose 256 symbols are nearly equally
likely (its heuristic: no symbol above 1/128 of the stream), which trained int8 values can
be: on a 99%-sparse upload of SmolLM2 (7.7 bits of entropy) one plane stayed at 8.0 bits per
value and the nibbles took 7.75. Where zstd does code the byte plane (a Gaussian)
the one plane is smaller (6.8 against 6.9 bits), the nibbles' two marginals costing more
than their joint. z = 255 (-128, never written) is read, as dtype 2 reads the byte 0x80.

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

from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

__all__ = [
    "CodecError",
    "Header",
    "MaskMismatchError",
    "VALUE_DTYPES",
    "nibble_planes",
    "INT8_CODES",
    "CODE_MAX",
    "index_entropy_bits",
    "index_entropy_bytes",
    "fingerprint_update",
    "hash_pieces",
    "mask_fingerprint",
]

MAGIC = b"FLTV"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8sQ16s")  # 40 bytes
MODE_FULL, MODE_VALUES_ONLY = 0, 1
VALUE_DTYPES = {"float32": 0, "bf16": 1, "int8": 2, "int4": 4}  # a run config's name -> its code
DTYPE_NAMES = {0: "float32", 1: "bf16", 2: "int8", 3: "int8", 4: "int4"}  # code -> name
INT8_CODES = (2, 3)  # int8 in one byte plane, or in two planes of nibbles: the encoder picks
CODE_MAX = {2: 127, 3: 127, 4: 7}  # integer codes in [-max, max] times a per-tensor f32 scale
PLANES = {0: 4, 1: 2, 2: 1, 3: 2, 4: 1}
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
    dtype_code: int  # header byte 6 (``value_dtype`` names it; two codes name int8)


# ---------------------------------------------------------------------------- helpers


def body_checksum(head: bytes, body: bytes | memoryview) -> bytes:
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
            fingerprint_update(h, name, t.shape, t.indices)
        else:
            fingerprint_update(h, name, tuple(t.shape), torch.nonzero(t.reshape(-1), as_tuple=False).reshape(-1))
    return h.digest()


def fingerprint_update(h, name: str, shape: tuple[int, ...], idx: torch.Tensor | None) -> None:
    """Add one tensor (``idx`` None: dense) to a mask fingerprint ``h``."""
    h.update(name.encode())
    h.update(struct.pack(f"<B{len(shape)}Q", len(shape), *shape))
    if idx is None:
        h.update(b"D")
    else:
        h.update(b"S")
        hash_pieces(h, idx, torch.int64)


def hash_pieces(h, x: torch.Tensor, dtype: torch.dtype) -> None:
    """Add the bytes of ``x`` as ``dtype`` to the hash ``h``, ``CHUNK`` entries at a time
    (the same digest as hashing the whole, with no copy of the whole in ``dtype``)."""
    for lo in range(0, x.numel(), CHUNK):
        h.update(x[lo : lo + CHUNK].detach().to(dtype).cpu().numpy().tobytes())


def index_entropy_bits(numel: int, nnz: int) -> float:
    """log2 C(numel, nnz): the fewest bits any code can spend on a uniformly random
    mask with these counts (the bound the gap code is measured against)."""
    if nnz <= 0 or nnz >= numel:
        return 0.0
    return (math.lgamma(numel + 1) - math.lgamma(nnz + 1) - math.lgamma(numel - nnz + 1)) / math.log(2)


def index_entropy_bytes(tv: SparseTaskVector) -> float:
    """The entropy bound of ``tv``'s mask in bytes (its sparse tensors): what any index code
    needs at least."""
    return sum(index_entropy_bits(t.numel, t.nnz) for t in tv.values() if not t.is_dense) / 8


def as_layout(mask) -> SparseTaskVector:
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


def value_plane(values: torch.Tensor, dtype_code: int, plane: int) -> bytes:
    """Byte ``plane`` (little-endian byte order) of float32 ``values`` coded as
    ``dtype_code`` (int8 and int4 values come already coded; dtype 3's two planes come from
    ``nibble_planes``)."""
    v = values.contiguous()
    if dtype_code == 0:
        raw = v.numpy().astype("<f4", copy=False).view(np.uint8).reshape(-1, 4)
    elif dtype_code == 1:
        raw = v.to(torch.bfloat16).view(torch.int16).numpy().view("<u2").view(np.uint8).reshape(-1, 2)
    elif dtype_code == 4:  # zigzag code 0..14, one per byte (zstd codes it near its entropy)
        return _zigzag(v).tobytes()
    else:
        raw = v.numpy().view(np.uint8).reshape(-1, 1)
    return raw[:, plane].tobytes()


def nibble_planes(codes: torch.Tensor) -> tuple[bytes, bytes]:
    """Both planes of int8 ``codes`` as dtype 3 writes them: the zigzag code's high nibbles,
    then its low nibbles (one pass over the codes for both)."""
    z = _zigzag(codes)
    return (z >> 4).tobytes(), (z & 15).tobytes()


def _zigzag(codes: torch.Tensor) -> np.ndarray:
    """Integer codes (int8) as their zigzag bytes: 0, -1, 1, -2, ... -> 0, 1, 2, 3, ..."""
    c = codes.contiguous().numpy().astype(np.int16)
    return ((c << 1) ^ (c >> 15)).astype(np.uint8)


def _unzigzag(z: np.ndarray) -> torch.Tensor:
    """Zigzag codes (int16, 0..255) back to their signed values, as float32."""
    return torch.from_numpy(((z >> 1) ^ -(z & 1)).astype(np.float32))


def bytes_to_values(planes: bytes, n: int, dtype_code: int) -> torch.Tensor:
    k = PLANES[dtype_code]
    arr = np.frombuffer(planes, dtype=np.uint8).reshape(k, n).T.copy()
    if dtype_code == 0:
        return torch.from_numpy(arr.view("<f4").reshape(-1).astype(np.float32, copy=False))
    if dtype_code == 1:
        return torch.from_numpy(arr.view("<i2").reshape(-1).copy()).view(torch.bfloat16).float()
    if dtype_code == 4:
        if n and int(arr.max()) > 14:
            raise CodecError("an int4 value byte is above 14 (codes are -7..7)")
        return _unzigzag(arr[:, 0].astype(np.int16))
    if dtype_code == 3:
        if n and int(arr.max()) > 15:
            raise CodecError("an int8 value plane holds a byte above 15 (its bytes are nibbles)")
        return _unzigzag((arr[:, 0].astype(np.int16) << 4) | arr[:, 1])
    return torch.from_numpy(arr.view(np.int8).reshape(-1).astype(np.float32))


def gap_codes(idx: np.ndarray, prev: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Gap codes of strictly increasing positions ``idx`` that follow position ``prev``
    (-1: the tensor's first): one byte per gap, gaps of ESCAPE or more escaped to u64."""
    gaps = np.diff(idx.astype(np.int64, copy=False), prepend=prev) - 1
    codes = np.minimum(gaps, ESCAPE).astype(np.uint8)
    return codes, gaps[gaps >= ESCAPE].astype("<u8")


class Reader:
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

    def frame(self, expected: int | None, what: str, *, multiple: int = 1, at_most: int = 0) -> Inflater:
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
        length = frame_length(comp, what)
        if length != len(comp):
            raise CodecError(f"{what} stream: {len(comp) - length:,} bytes after its zstd frame")
        window = zstandard.get_frame_parameters(comp).window_size
        if window > 1 << MAX_WINDOW_LOG:
            raise CodecError(
                f"{what} stream's zstd frame needs a {window:,}-byte window, "
                f"more than the limit of {1 << MAX_WINDOW_LOG:,}"
            )
        return Inflater(comp, raw_len, what)


class Inflater:
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


def frame_length(comp: bytes, what: str) -> int:
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
