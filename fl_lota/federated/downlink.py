"""The global update on the downlink: each client keeps the ``G`` it was sent, and the server
sends only what changed since the version that client holds.

Every message that carries ``G`` carries a *change*: the entries of ``G`` that the client's
copy lacks or holds at another value, with their new values (``change``). The client
overwrites its copy with them (``overwrite``) and checks the result against the digest the
server sent (``digest``), so a copy that drifted in any way is an error, never a wrong model.
A client that holds nothing (a new client, one that lost its state, every client after the
server resumed) is sent the whole of ``G`` as a change from the empty update; so is one whose
version the server no longer keeps, or one for which the whole is smaller than the change.

When ``G``'s support did not grow since the client's version (LoTA from round 2 on: the
masks are fixed), the change goes as ``G``'s values alone, in the order of the support both
sides hold (``mode="values"``): no index is sent. Both sides keep ``G`` in one canonical form
(``canonical``) so that their supports are the same list of entries.

The server side is ``Downlink`` (``fl_lota.federated.downlink_server``): ``G``'s versions,
the version each node holds (a reply confirms it), and the payload for a node: the smallest
of the values-only change, the indexed change and the whole. Values travel in the run's
value dtype when that is exact for the values ``G`` holds (``G``'s values were decoded from
that dtype), else in float32; a change never rounds anything, but when the run asks
(``downlink-values=int8|int4``, ``rounded``): the server rounds each round's change of ``G``
to codes times a per-tensor scale, and ``G`` becomes the held ``G`` plus it, summed by
server and clients with one function (``added``), so both hold the same bits (the digest
checks). A client holding the version before gets the rounded change (``mode`` "add",
"add-values"), any other ``G`` exactly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from fl_lota.federated.protocol import EMPTY, GlobalRef
from fl_lota.vectors import codec
from fl_lota.vectors.fltv import hash_pieces
from fl_lota.vectors.task_vector import PackedTensor, SparseTaskVector, SparseTensor

__all__ = [
    "DOWNLINK_VALUES",
    "DownlinkError",
    "Sent",
    "Step",
    "added",
    "canonical",
    "change",
    "digest",
    "encode_exact",
    "held_from",
    "overwrite",
    "receive",
    "rounded",
    "to_keep",
]

DOWNLINK_VALUES = ("exact", "int8", "int4")  # run config downlink-values: G as merged, or its change rounded
ADD_MODES = ("add", "add-values")  # a rounded change added to the held G: indexed, or values on its support


class DownlinkError(ValueError):
    """A change that cannot be applied: the client holds another version than the one the
    change is from, or the result is not the update the server holds."""


def digest(tv: SparseTaskVector) -> str:
    """A digest of what ``tv`` does to a model: per tensor (by name) its shape, support and
    float32 values. Forms that do the same hash the same: the tensors' order, a tensor with
    no entries (left out), a tensor whose support is every entry (as dense)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in canonical(tv).items():
        h.update(name.encode() + b"\0" + repr(t.shape).encode())
        # positions as int64 bytes (the digest does not depend on the dtype they are held
        # in) and values as float32 bytes, a piece at a time
        if t.indices is None:
            h.update(b"dense")
        else:
            hash_pieces(h, t.indices, torch.int64)
        hash_pieces(h, t.values, torch.float32)
    return h.hexdigest()


def canonical(tv: SparseTaskVector) -> SparseTaskVector:
    """``tv`` in the form both sides keep: tensors by name, none without entries, a tensor
    whose support is every entry dense; a packed tensor stays packed (it reads the same). It
    does to a model what ``tv`` does."""
    out = {}
    for name in sorted(tv):
        t = tv.stored(name)
        if t.nnz == 0:
            continue
        if isinstance(t, PackedTensor) and t.nnz == t.numel:
            t = SparseTensor(t.shape, None, t.dense)
        elif isinstance(t, SparseTensor) and t.indices is not None and t.nnz == t.numel:
            t = SparseTensor(t.shape, None, t.values)  # strictly increasing and numel of them: all
        out[name] = t
    return SparseTaskVector(out)


def same_support(a: SparseTaskVector, b: SparseTaskVector) -> bool:
    """Whether ``a`` and ``b`` (canonical) hold the same entries, in the same order."""
    if list(a) != list(b):
        return False
    for name in a:
        sa, sb = a.stored(name), b.stored(name)
        if isinstance(sa, PackedTensor) and isinstance(sb, PackedTensor):  # both bitmaps: compare them
            if sa.shape != sb.shape or not torch.equal(sa.bits, sb.bits):
                return False
            continue
        ta, tb = a[name], b[name]
        if ta.shape != tb.shape or (ta.indices is None) != (tb.indices is None):
            return False
        if ta.indices is not None and not torch.equal(ta.indices, tb.indices):  # same shape: same index dtype
            return False
    return True


def _dense(t: SparseTensor | PackedTensor | None, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, held) of ``t`` as flat dense tensors; zeros and nothing held for None."""
    if isinstance(t, PackedTensor):  # as stored, copied (callers write into them): no positions to build
        return torch.empty(numel, dtype=torch.float32).copy_(t.dense), t.held()
    vals, held = torch.zeros(numel, dtype=torch.float32), torch.zeros(numel, dtype=torch.bool)
    if t is not None:
        idx = t.flat_indices().cpu()
        vals[idx] = t.values.detach().float().cpu()
        held[idx] = True
    return vals, held


@torch.no_grad()
def change(old: SparseTaskVector, new: SparseTaskVector) -> SparseTaskVector | None:
    """The entries of ``new`` that ``old`` lacks or holds at another value (bit for bit), at
    their values in ``new``: ``overwrite(old, change(old, new))`` is ``new``. None when no
    change can say it: ``old`` holds an entry or tensor that ``new`` does not."""
    if set(old) - set(new):
        return None
    out = {}
    for name in new:
        a, b = old.stored(name) if name in old else None, new.stored(name)
        if a is not None and a.shape != b.shape:
            return None
        numel = math.prod(b.shape)
        va, ha = _dense(a, numel)
        vb, hb = _dense(b, numel)
        if bool((ha & ~hb).any()):
            return None
        differ = hb & (~ha | (va.view(torch.int32) != vb.view(torch.int32)))
        if bool(differ.any()):
            idx = torch.nonzero(differ).reshape(-1)
            out[name] = SparseTensor(b.shape, idx, vb[idx])
    return SparseTaskVector(out)


@torch.no_grad()
def overwrite(held: SparseTaskVector, changed: SparseTaskVector) -> SparseTaskVector:
    """``held`` with ``changed``'s entries set to its values (the supports united), in the
    canonical form the server's ``G`` has (a tensor held whole is dense)."""
    out = {}
    for name in dict.fromkeys([*held, *changed]):
        a, c = held.stored(name) if name in held else None, changed.get(name)
        if c is None:
            out[name] = a  # as stored (packed or not)
            continue
        if a is not None and a.shape != c.shape:
            raise DownlinkError(f"{name}: the change's shape {c.shape} differs from the held update's {a.shape}")
        numel = math.prod(c.shape)
        vals, hold = _dense(a, numel)
        idx = c.flat_indices().cpu()
        vals[idx] = c.values.detach().float().cpu()
        hold[idx] = True
        out[name] = SparseTensor.from_held(c.shape, vals, hold)
    return SparseTaskVector(out)


def _carries(tv: SparseTaskVector, values: str) -> bool:
    """Whether ``values`` holds every value of ``tv`` exactly: float32 always; bf16 when the
    values are bf16 numbers (``G`` decoded from bf16 always is); int8 never for a part of
    ``G`` (its per-tensor scale would be that part's, not ``G``'s)."""
    if values == "float32":
        return True
    if values == "bf16":
        return all(torch.equal(v := t.values.detach().float(), v.to(torch.bfloat16).float()) for t in tv.values())
    return False


def encode_exact(tv: SparseTaskVector, values: str, *, values_only: bool = False) -> bytes:
    """``tv`` encoded in ``values`` when that dtype carries its values exactly, else in
    float32: what the receiver decodes is ``tv``, bit for bit. ``values_only``: without
    indices (the receiver decodes against ``tv``'s support)."""
    return codec.encode(tv, values=values if _carries(tv, values) else "float32", values_only=values_only)


@dataclass(frozen=True)
class Step:
    """A rounded change of ``G``: its payload, the digest of the version it is added to, and
    its mode ("add": indexed; "add-values": on that version's support)."""

    payload: bytes
    base: str
    mode: str


@torch.no_grad()
def added(held: SparseTaskVector, payload: bytes, mode: str) -> SparseTaskVector:
    """``held`` plus the rounded change in ``payload``, canonical: how the server makes the
    rounded ``G`` and a client rebuilds it (the same bits). CodecError: it does not fit."""
    if mode not in ADD_MODES:
        raise DownlinkError(f"g-mode {mode!r} is not a rounded change ({ADD_MODES})")
    step = codec.decode(payload, mask=held) if mode == "add-values" else codec.decode(payload)
    return canonical(canonical(held).add(step))


@torch.no_grad()
def rounded(held: SparseTaskVector, change: SparseTaskVector, values: str) -> tuple[SparseTaskVector, Step]:
    """``held`` plus ``change`` (the round's merge) rounded to ``values`` (int8/int4 codes
    times a per-tensor scale), and the step that carries it: values on ``held``'s support
    (zeros where the change has none) when the change adds no entry, else indexed."""
    if values not in DOWNLINK_VALUES[1:]:
        raise ValueError(f"downlink values {values!r}: a rounding downlink is one of {DOWNLINK_VALUES[1:]}")
    held, change = canonical(held), canonical(change)
    on_support = canonical(held.with_values({n: torch.zeros(t.nnz) for n, t in held.items()}).add(change))
    on_held = len(held) > 0 and same_support(held, on_support)
    payload = codec.encode(on_support if on_held else change, values=values, values_only=on_held)
    mode = "add-values" if on_held else "add"
    return added(held, payload, mode), Step(payload, digest(held), mode)


@dataclass(frozen=True)
class Sent:
    """What a message carries of ``G``: a change from the version with digest ``base`` (EMPTY:
    from nothing) to the one with digest ``digest``. Versions are named by their digests, so
    a version number of another server (one that resumed) can never be taken for this one's."""

    payload: bytes
    base: str
    digest: str
    mode: str = "entries"  # or "values" (on the held support), "add", "add-values" (rounded: ``Step``)

    @property
    def ref(self) -> GlobalRef:
        """What the message's instruction says of its payload."""
        return GlobalRef(self.base, self.digest, self.mode)


def receive(held: SparseTaskVector | None, held_digest: str | None, payload: bytes, ref: GlobalRef):
    """The client's side: its copy of ``G`` (with digest ``held_digest``; None: it holds
    nothing) brought to the version ``ref`` names. Returns (G, its digest). Raises
    DownlinkError when the change is from a version the client does not hold (and it does
    not already hold the result), or when the result is not what the server holds."""
    base, want, mode = ref.base, ref.digest, ref.mode
    if mode in ("values", "add-values") and base == EMPTY:
        raise DownlinkError(f"g-mode {mode!r} from {base!r}: there is no support to put values on")
    if base == EMPTY:
        held = SparseTaskVector()
    elif held is None or held_digest != base:
        if held is not None and held_digest == want:  # applied before, but the reply was lost
            return held, want
        have = "nothing" if held is None else f"version {held_digest}"
        raise DownlinkError(
            f"the server sent the change of the global update from version {base}, but this client holds {have} "
            "(it lost its state); the server sends the whole update to it next time"
        )
    try:
        if mode == "values":  # G's values on the support the client holds
            got = codec.decode(payload, mask=held)
        elif mode in ADD_MODES:  # a rounded change, added as the server added it
            got = added(held, payload, mode)
        else:
            got = canonical(overwrite(held, codec.decode(payload)))
    except codec.CodecError as e:
        raise DownlinkError(f"the global update's change cannot be read: {e}") from None
    if digest(got) != want:
        raise DownlinkError(
            f"the global update rebuilt does not match the server's (digest {digest(got)} != {want}); "
            "the server sends the whole update to this client next time"
        )
    return got, want


def held_from(layout: bytes, values: bytes | None = None) -> SparseTaskVector:
    """The ``G`` a client kept (``to_keep``): ``layout`` decodes to ``G`` at some version;
    ``values``, when kept, are ``G``'s values now on that support."""
    g = canonical(codec.decode(layout))
    return g if values is None else codec.decode(values, mask=g)


def to_keep(
    layout: bytes | None, got: SparseTaskVector, payload: bytes, ref: GlobalRef, values: str
) -> tuple[bytes, bytes | None]:
    """What a client keeps of the ``G`` it just rebuilt (``got``, from ``payload``): the
    payloads as they came, so that keeping costs no encoding. The whole ``G`` is kept as it
    came; values on the held support replace the kept values; an indexed change (the
    support grew, or few entries changed) makes the client encode ``G`` (exactly) as its
    new layout: one encoding of ``G`` per such message, as after a rounded change (its
    values beside the layout when the support did not grow)."""
    if ref.mode == "add-values" and layout is not None:
        return layout, encode_exact(got, values, values_only=True)
    if ref.mode in ADD_MODES:
        return encode_exact(got, values), None
    if ref.base == EMPTY:
        return payload, None
    if ref.mode == "values" and layout is not None:
        return layout, payload
    return encode_exact(got, values), None
