"""The server's side of the downlink (``fl_lota.federated.downlink`` says how it works):
``G``'s versions, the version each node holds, and the payload that brings a node from its
version to the current one."""

from __future__ import annotations

import time

from fl_lota.federated.downlink import (
    DownlinkError,
    Sent,
    Step,
    canonical,
    change,
    digest,
    encode_exact,
    same_support,
)
from fl_lota.federated.protocol import EMPTY
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["Downlink"]


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
        self._changes: dict[str, Sent | None] = {}  # base digest -> the change to the current version
        self._whole: bytes | None = None
        self._values_only: bytes | None = None  # the current version's values on its support
        self._step: Step | None = None  # the rounded change that made the current version

    def publish(self, tv: SparseTaskVector, whole: bytes | None = None, step: Step | None = None) -> None:
        """``tv`` is the new global update as the clients decode it; ``whole``: its payload,
        when one that decodes to ``tv`` exactly is at hand; ``step``: the rounded change
        that makes ``tv`` from the version published before (``rounded``)."""
        d = digest(tv)
        if d == self.digest:
            return
        if step is not None and step.base != self.digest:
            raise DownlinkError(f"a rounded change from {step.base} published onto version {self.digest}")
        self.versions[self.digest] = self.tv
        self.tv, self.digest = canonical(tv), d
        self._changes, self._whole, self._values_only, self._step = {}, whole, None, step
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
        if node in self._sent and self._sent[node] != base:
            # a message went out and no reply came back: the node holds that message's version
            # or the one before, and only the whole update suits both
            base = EMPTY
        if base == EMPTY and self._step is not None and self._step.base == digest(SparseTaskVector()):
            sent = Sent(self._step.payload, EMPTY, self.digest, self._step.mode)  # added to nothing
        else:
            sent = self._change_from(base) if base == self.digest or base in self.versions else None
        if sent is None or len(sent.payload) >= len(self.whole()):
            sent = Sent(self.whole(), EMPTY, self.digest)
        self._sent[node] = self.digest
        return sent

    def prepare(self) -> float:
        """Encode now what the nodes will be sent of the current version: the change from
        each version some node holds, and the whole update (what ``for_node`` compares it
        with). The server calls it once ``G`` is published, so that this downlink work is
        counted with the merge that made the version, not with the evaluation or training
        message that first carries it (``for_node`` then finds it done). Returns seconds."""
        t0 = time.perf_counter()
        self.whole()
        for base in sorted(set(self.held.values())):
            if base == self.digest or base in self.versions:
                self._change_from(base)
        return time.perf_counter() - t0

    def _change_from(self, base: str) -> Sent | None:
        """The rounded change to a node holding its base; else the smaller of the values-only
        (same support) and the indexed change; the empty one to a node holding this version."""
        if base == self.digest:
            base_is_current = Sent(encode_exact(SparseTaskVector(), self.values), base, self.digest, "entries")
            return self._changes.setdefault(base, base_is_current)
        if base not in self._changes:
            if self._step is not None and base == self._step.base:  # codes: smaller than any exact change
                self._changes[base] = Sent(self._step.payload, base, self.digest, self._step.mode)
                return self._changes[base]
            old, options = self.versions[base], []
            if same_support(old, self.tv):
                if self._values_only is None:  # the same for every base with this support
                    self._values_only = encode_exact(self.tv, self.values, values_only=True)
                options.append(Sent(self._values_only, base, self.digest, "values"))
            ch = change(old, self.tv)
            if ch is not None:
                options.append(Sent(encode_exact(ch, self.values), base, self.digest, "entries"))
            self._changes[base] = min(options, key=lambda s: len(s.payload)) if options else None
        return self._changes[base]

    def confirm(self, node: str) -> None:
        """``node`` replied: it holds what its last message brought it to."""
        if node in self._sent:
            self.held[node] = self._sent[node]

    def forget(self, node: str) -> None:
        """``node`` failed or its reply was refused: what it holds is unknown."""
        self.held.pop(node, None)
        self._sent.pop(node, None)
        self._prune()
