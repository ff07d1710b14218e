"""The global update on the downlink: each client keeps the ``G`` it was sent, and the server
sends only what changed since the version that client holds.

Every message that carries ``G`` carries a *change*: the entries of ``G`` that the client's
copy lacks or holds at another value, with their new values (``change``). The client
overwrites its copy with them (``overwrite``) and checks the result against the digest the
server sent (``digest``), so a copy that drifted in any way is an error, never a wrong model.
A client that holds nothing (a new client, one that lost its state, every client after the
server resumed) is sent the whole of ``G`` as a change from the empty update; so is one whose
version the server no longer keeps, or one for which the whole is smaller than the change.

The server side is ``Downlink``: ``G``'s versions, the version each node confirmed it holds
(its reply reports it), and the payload for a node. Values travel in the run's value dtype
when that is exact for the values ``G`` holds (``G``'s values were decoded from that dtype),
else in float32; a change never rounds anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from . import codec
from .task_vector import SparseTaskVector, SparseTensor

__all__ = ["Downlink", "DownlinkError", "Sent", "change", "digest", "encode_exact", "overwrite", "receive"]

EMPTY = "nothing"  # the base of a change from nothing (the whole update); Flower refuses "" in a record


class DownlinkError(ValueError):
    """A change that cannot be applied: the client holds another version than the one the
    change is from, or the result is not the update the server holds."""


def digest(tv: SparseTaskVector) -> str:
    """A digest of what ``tv`` does to a model: per tensor (by name) its shape, support and
    float32 values. Forms that do the same hash the same: the tensors' order, a tensor with
    no entries (left out), a tensor whose support is every entry (as dense)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tv):
        t = tv[name]
        if t.nnz == 0:
            continue
        h.update(name.encode() + b"\0" + repr(t.shape).encode())
        whole = t.indices is None or t.nnz == t.numel
        h.update(b"dense" if whole else t.indices.cpu().numpy().tobytes())
        h.update(t.values.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _dense(t: SparseTensor | None, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, held) of ``t`` as flat dense tensors; zeros and nothing held for None."""
    vals, held = torch.zeros(numel, dtype=torch.float32), torch.zeros(numel, dtype=torch.bool)
    if t is not None:
        idx = t.flat_indices().cpu()
        vals[idx] = t.values.detach().float().cpu()
        held[idx] = True
    return vals, held


def _tensor(shape: tuple[int, ...], vals: torch.Tensor, held: torch.Tensor) -> SparseTensor:
    """The canonical form ``SparseTaskVector.add`` gives: dense when every entry is held."""
    if bool(held.all()):
        return SparseTensor(shape, None, vals)
    idx = torch.nonzero(held).reshape(-1)
    return SparseTensor(shape, idx, vals[idx])


@torch.no_grad()
def change(old: SparseTaskVector, new: SparseTaskVector) -> SparseTaskVector | None:
    """The entries of ``new`` that ``old`` lacks or holds at another value (bit for bit), at
    their values in ``new``: ``overwrite(old, change(old, new))`` is ``new``. None when no
    change can say it: ``old`` holds an entry or tensor that ``new`` does not."""
    if set(old) - set(new):
        return None
    out = {}
    for name, b in new.items():
        a = old.get(name)
        if a is not None and a.shape != b.shape:
            return None
        va, ha = _dense(a, b.numel)
        vb, hb = _dense(b, b.numel)
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
        a, c = held.get(name), changed.get(name)
        if c is None:
            out[name] = a
            continue
        if a is not None and a.shape != c.shape:
            raise DownlinkError(f"{name}: the change's shape {c.shape} differs from the held update's {a.shape}")
        numel = math.prod(c.shape)
        vals, hold = _dense(a, numel)
        idx = c.flat_indices().cpu()
        vals[idx] = c.values.detach().float().cpu()
        hold[idx] = True
        out[name] = _tensor(c.shape, vals, hold)
    return SparseTaskVector(out)


def encode_exact(tv: SparseTaskVector, values: str) -> bytes:
    """``tv`` encoded in ``values`` when that dtype carries its values exactly (they were
    decoded from it), else in float32: what the receiver decodes is ``tv``, bit for bit."""
    if values != "float32":
        payload = codec.encode(tv, values=values)
        back = codec.decode(payload)
        if all(torch.equal(back[n].values, t.values.detach().float().cpu()) for n, t in tv.items()):
            return payload
    return codec.encode(tv, values="float32")


@dataclass(frozen=True)
class Sent:
    """What a message carries of ``G``: a change from the version with digest ``base`` (EMPTY:
    from nothing) to the one with digest ``digest``. Versions are named by their digests, so
    a version number of another server (one that resumed) can never be taken for this one's."""

    payload: bytes
    base: str
    digest: str

    def config(self) -> dict[str, str]:
        return {"g-base": self.base, "g-digest": self.digest}


def receive(held: SparseTaskVector | None, held_digest: str | None, payload: bytes, meta: Mapping[str, object]):
    """The client's side: its copy of ``G`` (with digest ``held_digest``; None: it holds
    nothing) brought to the version the message names. Returns (G, its digest). Raises
    DownlinkError when the change is from a version the client does not hold (and it does
    not already hold the result), or when the result is not what the server holds."""
    base, want = meta.get("g-base"), meta.get("g-digest")
    if not isinstance(base, str) or not isinstance(want, str) or not want:
        raise DownlinkError("the message lacks the global update's g-base and g-digest")
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
    got = overwrite(held, codec.decode(payload))
    if digest(got) != want:
        raise DownlinkError(
            f"the global update rebuilt does not match the server's (digest {digest(got)} != {want}); "
            "the server sends the whole update to this client next time"
        )
    return got, want


class Downlink:
    """The server's side. ``publish`` a new ``G``; ``for_node`` is what a node is sent;
    ``confirm`` (a reply came: the node holds what it was sent) and ``forget`` (it failed:
    what it holds is unknown) keep track. Old versions are kept only while a node holds one,
    at most ``keep`` of them (a node holding an older one is sent the whole update)."""

    def __init__(self, values: str, *, keep: int = 4) -> None:
        self.values, self.keep = values, keep
        self.tv = SparseTaskVector()
        self.digest = digest(self.tv)
        self.versions: dict[str, SparseTaskVector] = {}  # digest -> an old version some node holds
        self.held: dict[str, str] = {}  # node -> the digest of the version it holds
        self._sent: dict[str, str] = {}  # node -> the digest its last message brings it to
        self._changes: dict[str, bytes] = {}  # base digest -> change payload to the current version
        self._whole: bytes | None = None

    def publish(self, tv: SparseTaskVector, whole: bytes | None = None) -> None:
        """``tv`` is the new global update as the clients decode it; ``whole``: its payload,
        when one that decodes to ``tv`` exactly is at hand."""
        d = digest(tv)
        if d == self.digest:
            return
        self.versions[self.digest] = self.tv
        self.tv, self.digest = tv, d
        self._changes, self._whole = {}, whole
        self._prune()

    def _prune(self) -> None:
        needed = set(self.held.values()) | set(self._sent.values())
        for v in [v for v in self.versions if v not in needed]:
            del self.versions[v]
        while len(self.versions) > self.keep:
            del self.versions[next(iter(self.versions))]  # the oldest

    def whole(self) -> bytes:
        if self._whole is None:
            self._whole = encode_exact(self.tv, self.values)
        return self._whole

    def for_node(self, node: str) -> Sent:
        """The change that brings ``node`` from the version it holds to the current one (the
        whole update when it holds none the server keeps, or when the whole is smaller)."""
        base = self.held.get(node, EMPTY)
        payload = self._change_from(base) if base == self.digest or base in self.versions else None
        if payload is None or len(payload) >= len(self.whole()):
            base, payload = EMPTY, self.whole()
        self._sent[node] = self.digest
        return Sent(payload, base, self.digest)

    def _change_from(self, base: str) -> bytes | None:
        if base not in self._changes:
            old = self.tv if base == self.digest else self.versions[base]
            ch = change(old, self.tv)
            self._changes[base] = b"" if ch is None else encode_exact(ch, self.values)
        return self._changes[base] or None

    def confirm(self, node: str) -> None:
        """``node`` replied: it holds what its last message brought it to."""
        if node in self._sent:
            self.held[node] = self._sent[node]

    def forget(self, node: str) -> None:
        """``node`` failed or its reply was refused: what it holds is unknown."""
        self.held.pop(node, None)
        self._sent.pop(node, None)
        self._prune()
