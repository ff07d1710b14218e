"""FLTV bytes from a sparse task vector (``encode``), or from a vector produced tensor by
tensor (``encode_tensors``); ``fl_lota.vectors.codec`` holds the decoder and re-exports
both. The format's layout and limits are in ``fl_lota.vectors.fltv``.
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
import zstandard

from fl_lota.vectors.fltv import (
    CHUNK,
    CODE_MAX,
    FLAG_DENSE,
    HEADER,
    INT8_CODES,
    MAGIC,
    MAX_NDIM,
    MAX_NUMEL,
    MAX_TENSORS,
    MAX_WINDOW_LOG,
    MODE_FULL,
    MODE_VALUES_ONLY,
    PLANES,
    VALUE_DTYPES,
    VERSION,
    CodecError,
    fingerprint_update,
    gap_codes,
    nibble_planes,
    value_plane,
)
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

__all__ = ["encode", "encode_tensors"]


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
    return encode_tensors(tv.items, values=values, values_only=values_only, level=level)


def encode_tensors(
    tensors: Callable[[], Iterable[tuple[str, SparseTensor]]],
    *,
    values: str = "bf16",
    values_only: bool = False,
    level: int = 1,
) -> bytes:
    """``encode`` of a vector given as a function that yields its tensors; it is called
    twice (the table and sizes, then the streams) and must yield the same tensors both
    times: every tensor is checked in both passes, and a second pass that differs from the
    first in any tensor's layout or scale is a CodecError. Every stream is compressed as it
    is produced, ``CHUNK`` entries at a time: beside the compressed streams memory holds one
    tensor and one piece, so the vector need never be whole (``merge_tensors`` builds each
    tensor of ``G + merge`` on demand). int8 values are compressed in both their layouts
    (one byte plane, two planes of nibbles) and the smaller is sent: until then both are
    held, one compressed byte per value more at most."""
    if values not in VALUE_DTYPES:
        raise CodecError(f"unknown value dtype {values!r}; known: {sorted(VALUE_DTYPES)}")
    dcode = VALUE_DTYPES[values]
    table, sizes = [b""], []  # sizes: (name, shape, nnz, scale) per tensor, from the first pass
    fp = hashlib.blake2b(digest_size=8)
    n_codes = n_escapes = n_values = 0
    for name, t in tensors():
        if len(sizes) >= MAX_TENSORS:
            raise CodecError(f"more than the format's limit of {MAX_TENSORS} tensors")
        nb = name.encode("utf-8")
        if not nb or len(nb) > 0xFFFF:
            raise CodecError(f"tensor name {name!r} must be 1..65535 bytes of UTF-8")
        if len(t.shape) > MAX_NDIM or t.numel > MAX_NUMEL:
            raise CodecError(f"{name}: shape {t.shape} exceeds the format's limits")
        scale = _check(name, t, dcode, values_only)
        if t.indices is not None and not values_only:
            n_codes += t.nnz
            n_escapes += sum(len(big) for _, big in _gap_pieces(t.indices.cpu().numpy()))
        n_values += t.nnz
        fingerprint_update(fp, name, t.shape, t.indices)
        table.append(struct.pack("<H", len(nb)) + nb + struct.pack(f"<B{len(t.shape)}Q", len(t.shape), *t.shape))
        table.append(struct.pack("<BQf", FLAG_DENSE if t.indices is None else 0, t.nnz, scale))
        sizes.append((name, t.shape, t.indices is None, t.nnz, scale))
    table[0] = struct.pack("<I", len(sizes))

    params = zstandard.ZstdCompressionParameters.from_level(level)
    if params.window_log > MAX_WINDOW_LOG:  # a receiver refuses frames that need a larger window
        params = zstandard.ZstdCompressionParameters.from_level(level, window_log=MAX_WINDOW_LOG)
    # one compressor per stream, all fed in the same pass
    streams = [] if values_only else [_Stream(params, n_codes), _Stream(params, 8 * n_escapes)]
    planes = [_Stream(params, n_values) for _ in range(PLANES[dcode])]
    # int8: the codes also as two planes of nibbles (dtype 3); the smaller layout is sent
    nibbles = [_Stream(params, n_values) for _ in range(PLANES[3])] if dcode in INT8_CODES else []
    again = hashlib.blake2b(digest_size=8)
    seen = 0
    for name, t in tensors():
        scale = _check(name, t, dcode, values_only)  # escapes: the stream's declared size checks them
        if seen >= len(sizes) or sizes[seen] != (name, t.shape, t.indices is None, t.nnz, scale):
            raise CodecError(f"{name}: the tensors changed between encode_tensors' two passes")
        seen += 1
        fingerprint_update(again, name, t.shape, t.indices)
        if t.indices is not None and not values_only:
            for codes, big in _gap_pieces(t.indices.cpu().numpy()):
                streams[0].add(codes.tobytes())
                streams[1].add(big.tobytes())
        flat = t.values.detach().reshape(-1)
        for lo in range(0, flat.numel(), CHUNK):
            v = flat[lo : lo + CHUNK].float().cpu()
            if dcode in CODE_MAX:
                v = torch.round(v / scale).clamp_(-CODE_MAX[dcode], CODE_MAX[dcode]).to(torch.int8)
            for i, plane in enumerate(planes):
                plane.add(value_plane(v, dcode, i))
            if nibbles:
                for plane, data in zip(nibbles, nibble_planes(v), strict=True):
                    plane.add(data)
    if seen != len(sizes) or again.digest() != fp.digest():
        raise CodecError("the tensors changed between encode_tensors' two passes")
    values = [x for plane in planes for x in plane.finish()]  # each stream lets go of its bytes
    if nibbles:
        other = [x for plane in nibbles for x in plane.finish()]
        if sum(map(len, other)) < sum(map(len, values)):
            values, dcode = other, 3
        del other
    parts = [b"".join(table)]
    for stream in streams:
        parts.extend(stream.finish())
    parts.extend(values)
    del streams, planes, nibbles, values
    mode = MODE_VALUES_ONLY if values_only else MODE_FULL
    head = HEADER.pack(MAGIC, VERSION, mode, dcode, 0, fp.digest(), sum(map(len, parts)), b"\0" * 16)[:24]
    check = hashlib.blake2b(digest_size=16)  # body_checksum(head, body), part by part
    for part in (head, *parts):
        check.update(part)
    parts[:0] = [head, check.digest()]
    return _join(parts)


def _join(parts: list) -> bytes:
    """The parts as one bytes object, each part dropped once copied (``parts`` is emptied).
    The buffer grows in place as parts are written and ``BytesIO.getvalue`` hands it over
    uncopied, so memory holds the payload and one part at most, where ``b"".join`` holds
    twice the payload."""
    out = io.BytesIO()
    parts.reverse()
    while parts:
        out.write(parts.pop())
    return out.getvalue()


def _check(name: str, t: SparseTensor, dcode: int, values_only: bool) -> float:
    """Check one tensor for encoding: finite values, positions (when sent) in range and
    strictly increasing. Returns its int8 or int4 scale (1.0 for other dtypes)."""
    v = t.values.detach()
    if not bool(torch.isfinite(v).all()):
        raise CodecError(f"{name}: values hold NaN or Inf")
    scale = 1.0
    if dcode in CODE_MAX:
        amax = float(v.abs().max()) if v.numel() else 0.0
        scale = amax / CODE_MAX[dcode] if amax > 0 else 1.0
    if t.indices is None or values_only:
        return scale
    idx = t.indices.cpu().numpy()
    if idx.size and (idx[0] < 0 or idx[-1] >= t.numel):
        raise CodecError(f"{name}: indices outside [0, {t.numel})")
    if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
        raise CodecError(f"{name}: indices must be strictly increasing")
    return scale


def _gap_pieces(idx: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(codes, escapes) of one tensor's positions, ``CHUNK`` at a time."""
    prev = -1
    for lo in range(0, idx.size, CHUNK):
        piece = idx[lo : lo + CHUNK]
        yield gap_codes(piece, prev)
        prev = int(piece[-1])


class _Stream:
    """One stream of a payload: a zstd frame that declares ``size`` bytes, compressed from
    the pieces as they come."""

    def __init__(self, params: zstandard.ZstdCompressionParameters, size: int) -> None:
        self.size, self.out = size, bytearray()
        self.comp = zstandard.ZstdCompressor(compression_params=params).compressobj(size=size)

    def add(self, piece: bytes) -> None:
        try:
            self.out += self.comp.compress(piece)
        except zstandard.ZstdError as e:  # more bytes than the frame declared
            raise CodecError(f"a stream outgrew the size its frame declares: {e}") from None

    def finish(self) -> tuple[bytes, bytearray]:
        """The stream as it goes in the body: its two lengths, then its frame."""
        try:
            self.out += self.comp.flush()
        except zstandard.ZstdError as e:  # fewer bytes than the frame declared
            raise CodecError(f"a stream fell short of the size its frame declares: {e}") from None
        out, self.out = self.out, None  # the caller's alone, so that it can drop it once copied
        return struct.pack("<QQ", self.size, len(out)), out
