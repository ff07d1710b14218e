"""The server's side of a round, free of Flower: decode uploads, merge, update the global
model, and keep the books. ``server/strategy.py`` wraps this in a Flower strategy.

State: ``G``, the cumulative merged update (the global model is ``base + G``), and the
mask each LoTA client registered with its first (full) upload, against which its later
values-only uploads are decoded. ``G`` is kept exactly as clients decode it from the wire
(``decode(encode(G))``), so server and clients hold bit-identical global weights; bf16
values are held as bfloat16 (exact), indices as int32, and a tensor where ``G`` is dense
enough is packed (a bit per entry and dense values: ``PackedTensor``), so ``G``'s memory
stops growing with the union of the clients' masks. With a rounding downlink
(``downlink-values`` int8 or int4), ``G`` is the held ``G`` plus the round's change rounded
(``fl_lota.federated.downlink.rounded``): what the clients rebuild, bit for bit.

Masks and partitions are bound to the sender's identity (Flower's node id; on the
deployment engine with SuperNode authentication, an authenticated key): the first node to
report partition ``p`` owns it and registers its mask under its own id. Another node that
reports ``p`` while the owner is online is refused; a node may not change its partition.
When the owner has not been online since this server started (a restarted simulation has
only new node ids; a machine that never came back), the next node that reports ``p``
takes it over, keeping the registered mask if its values-only upload was encoded against
it (the mask's fingerprint), so a resumed run goes on exactly as an uninterrupted one
would. An owner that was online in this server's lifetime and is offline now loses its
partition only to a values-only upload encoded against its registered mask. A node whose
partition was taken over gets it back with its next upload (its node id persists on the
deployment engine). A node whose values-only upload found no matching mask is asked, in
its next round, to send a full upload (``register-mask``) so that its mask is registered
again rather than refused forever.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fl_lota.federated.downlink import Step, encode_exact, rounded
from fl_lota.federated.protocol import TrainReport
from fl_lota.federated.runconfig import RunConfig
from fl_lota.merging.merge import merge, merge_tensors
from fl_lota.vectors import codec, lowrank
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["MAX_UPDATE_ABS", "Aggregator", "Upload", "UploadError", "accepted_shapes"]


class UploadError(ValueError):
    """An upload that cannot be used this round; the message names the client and why."""


# No fine-tuning step moves a weight by this much: a larger update value is refused at
# decoding, which also keeps every weighted sum of accepted values far from float32's range.
MAX_UPDATE_ABS = 1e4


def accepted_shapes(method: str, shapes: Mapping[str, tuple[int, ...]], lora_rank: int) -> dict[str, tuple[int, ...]]:
    """The tensors an upload of ``method`` may hold: the model's parameters, or for LoRA
    the factors ``<W>::lora_B`` (out, r) and ``<W>::lora_A`` (r, in) of its matrices."""
    if method != "lora":
        return dict(shapes)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            out[name + lowrank.SUFFIX_B] = (shape[0], lora_rank)
            out[name + lowrank.SUFFIX_A] = (lora_rank, shape[1])
    return out


@dataclass
class Upload:
    client: str  # the sender's identity: Flower's node id
    payload: bytes
    weight: float  # merge weight: the client's example count (checked by the caller)
    report: TrainReport | None = None  # what the client says of it (checked against the payload)
    partition: int | None = None  # the partition it reports (None: not bound to one)


@dataclass
class RoundMerge:
    """What one aggregation produced, for the round's record. The round's policy is decided
    here, once: which uploads count, whether there were enough (``too_few``), whether G
    changed (``updated``)."""

    accepted: list[str]
    rejected: dict[str, str]  # client -> reason
    merge_seconds: float
    decode_seconds: float
    global_nnz: int
    global_numel: int
    global_bytes: int
    candidate_bytes: dict[str, int]
    merge_error: str | None = None  # the merge failed: G unchanged this round
    too_few: bool = False  # fewer usable uploads than min-replies: G unchanged this round
    # what the server measured of each accepted upload (not what the client claims):
    # payload_bytes, values_only, nnz (values sent), numel (entries of the dense update they
    # stand for), index_entropy_bytes (the entropy bound of a full upload's mask)
    measured: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def updated(self) -> bool:
        """Whether this round changed G."""
        return not self.too_few and self.merge_error is None


class Aggregator:
    """``shapes``: the model's parameter names and shapes (``fl_lota.training.models.param_shapes``);
    when given, every upload must name only those tensors, at those shapes."""

    def __init__(self, cfg: RunConfig, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.cfg = cfg
        self.shapes = dict(shapes) if shapes is not None else None
        self.accepted = accepted_shapes(cfg.method, shapes, cfg.lora_rank) if shapes is not None else None
        # no upload can hold more entries than the tensors it may name
        self.max_entries = sum(math.prod(s) for s in self.accepted.values()) if self.accepted else codec.MAX_ENTRIES
        self.global_tv = SparseTaskVector()
        self.global_payload = codec.encode(self.global_tv, values=cfg.values)
        self.masks: dict[str, SparseTaskVector] = {}  # node -> registered layout
        self.owners: dict[int, str] = {}  # partition -> the node that owns it
        self.candidates: dict[str, bytes] = {}  # merge name -> G_m payload (scored, not kept)
        self._measured: dict[str, dict[str, float]] = {}  # this round's uploads, as decoded
        self.seen: set[str] = set()  # nodes online at some round since this server started
        self.former: dict[int, str] = {}  # partition -> the owner it was taken over from
        self.resend_mask: set[str] = set()  # nodes to ask for a full upload (no mask matched)
        self.last: dict[str, bytes] = {}  # node -> its upload accepted this round (the payload as sent)
        self.step: Step | None = None  # downlink-values int8/int4: this round's rounded change of G

    def restore(
        self, global_tv: SparseTaskVector, masks: Mapping[str, SparseTaskVector], owners: Mapping[int, str]
    ) -> None:
        """State from a checkpoint: ``G`` as the clients decoded it, the masks and who owns
        each partition (a node id that is gone is taken over by the next node reporting it)."""
        # exactly: G's values are those of the run's dtype, or sums a rounding downlink made
        self.global_payload = encode_exact(global_tv, self.cfg.values)
        self.global_tv = codec.decode(self.global_payload, native=True, pack=True)
        self.masks = {k: m.support() for k, m in masks.items()}
        self.owners = {int(p): str(n) for p, n in owners.items()}
        self.candidates = {}

    def partition_of(self, node: str) -> int | None:
        return next((p for p, n in self.owners.items() if n == node), None)

    def _claim(self, up: Upload, online: set[str] | None) -> tuple[str | None, bool]:
        """Check the partition ``up`` reports against the bindings; returns the node whose
        partition (and mask) it takes over, if any, and whether ``up``'s node is taking back
        a partition that was taken over from it. Raises UploadError."""
        if up.partition is None:
            return None, False
        mine = self.partition_of(up.client)
        if mine is not None and mine != up.partition:
            raise UploadError(f"client {up.client}: reports partition {up.partition}, but it is partition {mine}")
        owner = self.owners.get(up.partition)
        if owner is None or owner == up.client:
            return None, False
        if self.former.get(up.partition) == up.client:
            return owner, True  # the partition's owner is back: it takes the partition back
        if online is None or owner in online:
            raise UploadError(
                f"client {up.client}: reports partition {up.partition}, which belongs to node {owner} (online)"
            )
        return owner, False

    def needs_mask(self, node: str) -> bool:
        """Whether to ask ``node`` for a full upload this round (its values-only upload found
        no mask registered for it)."""
        return self.cfg.method == "lota" and node in self.resend_mask

    def _bind(self, up: Upload, gone: str | None, layout: SparseTaskVector | None, reclaim: bool = False) -> None:
        if gone is not None:
            self.masks.pop(gone, None)
            if reclaim:
                self.former.pop(up.partition, None)
            elif up.partition is not None:
                self.former[up.partition] = gone
        if up.partition is not None:
            self.owners[up.partition] = up.client
        if layout is not None:
            self.masks[up.client] = layout.support()  # its indices: the upload's values are not kept

    def decode(self, up: Upload, online: set[str] | None = None) -> SparseTaskVector:
        """The upload's task vector. Full payloads (re)register the client's mask;
        values-only payloads decode against it. ``online``: the nodes connected now (None:
        treat every owner as online). Raises UploadError naming the problem."""
        gone, reclaim = self._claim(up, online)
        limits = dict(
            max_bytes=self.cfg.max_upload_bytes,
            shapes=self.accepted,
            max_abs=MAX_UPDATE_ABS,
            max_entries=self.max_entries,
        )
        try:
            head = codec.peek(up.payload, max_bytes=self.cfg.max_upload_bytes)
            if gone is not None and not reclaim and gone in self.seen:
                if not head.values_only or gone not in self.masks:
                    raise UploadError(
                        f"client {up.client}: reports partition {up.partition} of node {gone}, which has been "
                        "online since the server started; only an upload encoded against that node's registered "
                        "mask (values-only, from its client-state-dir) may take it over"
                    )
                mask = self.masks[gone]
            elif head.values_only:
                mask = self.masks.get(up.client) or (self.masks.get(gone) if gone is not None else None)
                if mask is None:
                    self.resend_mask.add(up.client)
                    raise UploadError(
                        f"client {up.client}: values-only upload but no mask registered for it; "
                        "it is asked for a full upload next round"
                    )
            else:
                mask = None
            try:
                # bf16 values held as sent (half the memory of float32); merges compute in float32
                # values in one block: freed as one piece after the merge (the mask keeps the positions)
                tv = codec.decode(up.payload, mask=mask, native=True, one_block=True, **limits)  # mask: None: full
            except codec.MaskMismatchError:
                self.resend_mask.add(up.client)
                raise
        except codec.CodecError as e:
            raise UploadError(f"client {up.client}: {e}") from None
        layout = tv
        if lowrank.is_lowrank(tv):  # LoRA factors: merge their exact products
            try:
                tv = lowrank.expand(tv)
            except ValueError as e:
                raise UploadError(f"client {up.client}: {e}") from None
        if not head.values_only:
            self._check_against_model(up.client, tv)
        self._measure(up, head.values_only, layout, tv)
        self._bind(up, gone, mask if head.values_only else (layout if self.cfg.method == "lota" else None), reclaim)
        self.resend_mask.discard(up.client)
        self.last[up.client] = up.payload  # this round's only: the server app writes them to disk
        return self._clip(tv)

    def _measure(self, up: Upload, values_only: bool, layout: SparseTaskVector, tv: SparseTaskVector) -> None:
        """Record what the upload holds; a client whose report disagrees is refused (its
        books would be wrong even when its update is not)."""
        m = {
            "payload_bytes": len(up.payload),
            "values_only": values_only,
            "nnz": layout.nnz,
            "numel": tv.numel,
            "index_entropy_bytes": 0.0 if values_only else codec.index_entropy_bytes(layout),
        }
        for key, field_name in (("payload_bytes", "payload-bytes"), ("nnz", "nnz"), ("values_only", "values-only")):
            claim = getattr(up.report, key) if up.report is not None else m[key]
            if claim != m[key]:
                raise UploadError(f"client {up.client}: reports {field_name} {claim:g}, its upload holds {m[key]:g}")
        self._measured[up.client] = m

    def _check_against_model(self, client: str, tv: SparseTaskVector) -> None:
        if self.shapes is None:
            return
        for name, t in tv.items():
            if name not in self.shapes:
                raise UploadError(f"client {client}: tensor {name!r} is not a parameter of model {self.cfg.model!r}")
            if tuple(t.shape) != tuple(self.shapes[name]):
                raise UploadError(
                    f"client {client}: tensor {name!r} has shape {t.shape}, the model's is {self.shapes[name]}"
                )

    def _clip(self, tv: SparseTaskVector) -> SparseTaskVector:
        """Scale an update down to L2 norm ``clip-norm`` (bounds one client's influence)."""
        if not self.cfg.clip_norm:
            return tv
        norm = math.sqrt(sum(float(t.values.double().pow(2).sum()) for t in tv.values()))
        if norm <= self.cfg.clip_norm:
            return tv
        f = self.cfg.clip_norm / norm
        return tv.with_values({n: t.values.float() * f for n, t in tv.items()})

    def aggregate(self, uploads: Sequence[Upload], online: set[str] | None = None) -> RoundMerge:
        """Merge this round's uploads into ``G`` with the run's merge method, and build the
        candidates ``G + merge_m(uploads)`` for each further merge to be scored. ``online``:
        the nodes connected now (partitions of nodes that are gone may be taken over)."""
        t0 = time.perf_counter()
        vectors, weights, accepted, rejected = [], [], [], {}
        self._measured = {}
        self.last = {}
        self.seen |= online or set()
        for up in uploads:
            try:
                vectors.append(self.decode(up, online))
            except UploadError as e:
                rejected[up.client] = str(e)
                continue
            except Exception as e:  # untrusted input: whatever breaks, it breaks this upload only
                rejected[up.client] = f"client {up.client}: upload could not be used ({type(e).__name__}: {e})"
                continue
            weights.append(up.weight)
            accepted.append(up.client)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.candidates, self.step = {}, None
        too_few = len(vectors) < max(1, self.cfg.min_replies)
        if too_few:  # keep the global model as it is
            vectors, weights = [], []
        merge_error = None
        if vectors:
            try:
                for name in self.cfg.merges:
                    params = self.cfg.merge_params(name)
                    if name == self.cfg.merge and self.cfg.downlink_values != "exact":
                        # a rounding downlink: G plus the merge rounded (fl_lota.federated.downlink)
                        change = merge(name, vectors, weights, **params)
                        g, self.step = rounded(self.global_tv, change, self.cfg.downlink_values)
                        self.candidates[name] = encode_exact(g, self.cfg.values)
                        del change, g
                        continue
                    # G + merge, each tensor built as the encoder reaches it (twice: sizes,
                    # then streams) and dropped once encoded: the sum is never held whole
                    tensors = merge_tensors(name, vectors, weights, onto=self.global_tv, **params)
                    self.candidates[name] = codec.encode_tensors(tensors, values=self.cfg.values)
                    del tensors
                del vectors[:]  # the decoded uploads are not needed any more
                new_tv = codec.decode(self.candidates[self.cfg.merge], native=True, pack=True)
            except (ValueError, RuntimeError, FloatingPointError) as e:  # CodecError included
                # accepted uploads are bounded, so this is not expected; if it happens the
                # round leaves G as it was rather than stopping the run or storing garbage
                merge_error = f"{type(e).__name__}: {e}"
                self.candidates, self.step = {}, None
            else:
                self.global_payload, self.global_tv = self.candidates[self.cfg.merge], new_tv
        if not self.candidates:
            self.candidates = {self.cfg.merge: self.global_payload}
        return RoundMerge(
            accepted=accepted,
            rejected=rejected,
            merge_seconds=time.perf_counter() - t0,
            decode_seconds=decode_s,
            global_nnz=self.global_tv.nnz,
            global_numel=self.global_tv.numel,
            global_bytes=len(self.global_payload),
            candidate_bytes={k: len(v) for k, v in self.candidates.items()},
            merge_error=merge_error,
            too_few=too_few,
            measured={c: self._measured[c] for c in accepted},
        )
