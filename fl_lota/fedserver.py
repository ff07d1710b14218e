"""The server's side of a round, free of Flower: decode uploads, merge, update the global
model, and keep the books. ``server/strategy.py`` wraps this in a Flower strategy.

State: ``G``, the cumulative merged update (the global model is ``base + G``), and the
mask each LoTA client registered with its first (full) upload, against which its later
values-only uploads are decoded. ``G`` is kept exactly as clients decode it from the wire
(``decode(encode(G))``), so server and clients hold bit-identical global weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from . import codec, lowrank
from .merge import merge
from .runconfig import RunConfig
from .task_vector import SparseTaskVector

__all__ = ["Aggregator", "Upload", "UploadError"]


class UploadError(ValueError):
    """An upload that cannot be used this round; the message names the client and why."""


@dataclass
class Upload:
    client: str  # stable id of the sender (Flower node id)
    payload: bytes
    weight: float  # merge weight: the client's example count
    metrics: dict[str, float] = field(default_factory=dict)
    mask_key: str | None = None  # whose mask (default: client); stable across restarts, e.g. "p3"

    @property
    def key(self) -> str:
        return self.mask_key or self.client


@dataclass
class RoundMerge:
    """What one aggregation produced, for the round's record."""

    accepted: list[str]
    rejected: dict[str, str]  # client -> reason
    merge_seconds: float
    decode_seconds: float
    global_nnz: int
    global_numel: int
    global_bytes: int
    candidate_bytes: dict[str, int]


class Aggregator:
    """``shapes``: the model's parameter names and shapes (``fl_lota.models.param_shapes``);
    when given, every upload must name only those tensors, at those shapes."""

    def __init__(self, cfg: RunConfig, shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
        self.cfg = cfg
        self.shapes = dict(shapes) if shapes is not None else None
        self.global_tv = SparseTaskVector()
        self.global_payload = codec.encode(self.global_tv, values=cfg.values)
        self.masks: dict[str, SparseTaskVector] = {}  # client -> registered layout
        self.candidates: dict[str, bytes] = {}  # merge name -> G_m payload (scored, not kept)

    def restore(self, global_tv: SparseTaskVector, masks: Mapping[str, SparseTaskVector]) -> None:
        """State from a checkpoint: ``G`` as the clients decoded it, and the masks."""
        self.global_payload = codec.encode(global_tv, values=self.cfg.values)
        self.global_tv = codec.decode(self.global_payload)
        self.masks = dict(masks)
        self.candidates = {}

    def decode(self, up: Upload) -> SparseTaskVector:
        """The upload's task vector. Full payloads (re)register the client's mask;
        values-only payloads decode against it. Raises UploadError naming the problem."""
        try:
            head = codec.peek(up.payload, max_bytes=self.cfg.max_upload_bytes)
            if head.values_only:
                if up.key not in self.masks:
                    raise UploadError(f"client {up.client}: values-only upload but no mask registered")
                tv = codec.decode(up.payload, mask=self.masks[up.key], max_bytes=self.cfg.max_upload_bytes)
                return self._clip(tv)
            tv = codec.decode(up.payload, max_bytes=self.cfg.max_upload_bytes)
        except codec.CodecError as e:
            raise UploadError(f"client {up.client}: {e}") from None
        layout = tv
        if lowrank.is_lowrank(tv):  # LoRA factors: merge their exact products
            try:
                tv = lowrank.expand(tv)
            except ValueError as e:
                raise UploadError(f"client {up.client}: {e}") from None
        self._check_against_model(up.client, tv)
        if self.cfg.method == "lota":
            self.masks[up.key] = layout
        return self._clip(tv)

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
        return tv.with_values({n: t.values * f for n, t in tv.items()})

    def aggregate(self, uploads: Sequence[Upload]) -> RoundMerge:
        """Merge this round's uploads into ``G`` with the run's merge method, and build the
        candidates ``G + merge_m(uploads)`` for each further merge to be scored."""
        t0 = time.perf_counter()
        vectors, weights, accepted, rejected = [], [], [], {}
        for up in uploads:
            try:
                vectors.append(self.decode(up))
            except UploadError as e:
                rejected[up.client] = str(e)
                continue
            weights.append(up.weight)
            accepted.append(up.client)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.candidates = {}
        if len(vectors) < self.cfg.min_replies:  # too few: keep the global model as it is
            vectors, weights = [], []
        if vectors:
            for name in self.cfg.merges:
                merged = merge(name, vectors, weights, **self.cfg.merge_params(name))
                payload = codec.encode(self.global_tv.add(merged), values=self.cfg.values)
                self.candidates[name] = payload
            self.global_payload = self.candidates[self.cfg.merge]
            self.global_tv = codec.decode(self.global_payload)
        else:
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
        )
