"""Merging sparse task vectors, built from three small tensor functions.

- ``trim_top_k``: keep the largest-magnitude entries of one vector (TIES step 1).
- ``elect_sign``: per coordinate, the sign of the summed (weighted) values (TIES step 2).
- ``masked_mean``: per coordinate, the weighted mean over the vectors that hold it and pass
  a filter; the divisor counts only those vectors (guarded: no vector, no coordinate).

Methods, one registry keyed by the names used in run configs:
- ``mask_aware``: masked_mean over every vector whose mask holds the coordinate. A
  coordinate only one client trained keeps that client's value instead of being shrunk
  by 1/N (the dilution plain FedAvg causes). Precedent: HeteroFL, mergekit's ``ram``.
- ``ties``: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
  NeurIPS 2023: trim, elect sign, disjoint mean over agreeing nonzero entries, times lambda.
- ``task_arithmetic``: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023:
  lambda * sum_i tau_i. Unweighted, as in the paper: the clients' weights (example counts)
  would scale the sum by the data's size.
- ``fedavg``: McMahan et al., 2017: sum_i w_i tau_i / sum_i w_i over *all* vectors.

Work goes tensor by tensor: peak memory is the sparse inputs plus a few dense buffers the
size of the largest single tensor, never clients x parameters dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from fl_lota.training.masks import top_k_flat
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

__all__ = ["MERGE_METHODS", "elect_sign", "masked_mean", "merge", "merge_tensors", "register", "trim_top_k"]

# one tensor's inputs: per vector (indices or None for dense, values), aligned with weights
Entries = list[tuple[torch.Tensor | None, torch.Tensor]]


def _scatter_add(acc: torch.Tensor, idx: torch.Tensor | None, vals: torch.Tensor) -> None:
    if idx is None:
        acc.add_(vals)
    else:
        acc.index_add_(0, idx, vals)


def _gather(buf: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return buf if idx is None else buf[idx]


def trim_top_k(values: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean keep-masks over ``values`` (one vector's tensors, flat) with exactly
    ``min(k, total)`` True at the largest |value|; ties broken by position. Zeros are
    never kept ahead of a nonzero. Selecting exactly k avoids the ``>=`` threshold pitfall
    (over mostly-zero vectors it keeps far more than k)."""
    sizes = [v.numel() for v in values]
    flat = torch.cat([v.detach().float().abs().reshape(-1) for v in values]) if values else torch.zeros(0)
    keep = top_k_flat(flat, min(k, flat.numel())) & (flat != 0)
    return list(torch.split(keep, sizes))


def elect_sign(entries: Entries, weights: Sequence[float], numel: int) -> torch.Tensor:
    """(numel,) in {-1, 0, 1}: sign of sum_i w_i * v_i per coordinate (zeros do not vote)."""
    total = torch.zeros(numel, dtype=torch.float32)
    for (idx, vals), w in zip(entries, weights, strict=True):
        _scatter_add(total, idx, vals.float() * w)
    return torch.sign(total)


def masked_mean(
    entries: Entries,
    weights: Sequence[float],
    numel: int,
    include: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None,
    divisor: str = "holders",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean per coordinate. ``include(idx, vals) -> bool (nnz,)`` filters which
    entries of a vector take part (default: all it holds). divisor="holders" divides by
    the summed weights of the vectors that contributed to that coordinate; "none" returns
    the weighted sum. Weights must be positive. Returns (indices, values) over the
    coordinates that got at least one contribution, in increasing order."""
    if divisor not in ("holders", "none"):
        raise ValueError(f"unknown divisor {divisor!r}; expected 'holders' or 'none'")
    acc = torch.zeros(numel, dtype=torch.float32)
    wsum = torch.zeros(numel, dtype=torch.float32)
    for (idx, vals), w in zip(entries, weights, strict=True):
        vals = vals.float()
        if include is not None:
            keep = include(idx, vals)
            idx = torch.nonzero(keep, as_tuple=False).reshape(-1) if idx is None else idx[keep]
            vals = vals[keep]
        _scatter_add(acc, idx, vals * w)
        _scatter_add(wsum, idx, torch.full_like(vals, float(w)))
    held = torch.nonzero(wsum > 0, as_tuple=False).reshape(-1)  # weights > 0: held iff wsum > 0
    if divisor == "none":
        return held, acc[held]
    return held, acc[held] / wsum[held]


# ---------------------------------------------------------------------------- methods

# one tensor's merge: (entries, weights, numel) -> (indices, values)
One = Callable[[Entries, Sequence[float], int], tuple[torch.Tensor, torch.Tensor]]
# a method prepares its inputs (TIES trims them) and says how each tensor merges
Plan = tuple[Sequence[SparseTaskVector], Sequence[float], One]
MergeFn = Callable[..., Plan]
MERGE_METHODS: dict[str, MergeFn] = {}


def register(name: str) -> Callable[[MergeFn], MergeFn]:
    """Add a method under ``name``: ``fn(vectors, weights, **params) -> (vectors, weights,
    one)``, the (prepared) vectors and weights and ``one(entries, weights, numel) ->
    (indices, values)``, which merges one tensor's entries."""

    def deco(fn: MergeFn) -> MergeFn:
        MERGE_METHODS[name] = fn
        return fn

    return deco


def _tensors(plan: Plan, onto: SparseTaskVector | None) -> Iterator[tuple[str, SparseTensor]]:
    """The merge, one tensor at a time: each tensor name of the vectors (union, first-seen
    order; vectors without it do not take part in it). ``onto``: the tensors of
    ``onto.add(merged)``, in its order (onto's tensors, then the merge's new ones), each
    built when it is yielded."""
    vectors, weights, one = plan
    names: dict[str, tuple[int, ...]] = {}
    for v in vectors:
        for name, t in v.items():
            if name in names and names[name] != t.shape:
                raise ValueError(f"{name}: shapes disagree across vectors ({names[name]} vs {t.shape})")
            names.setdefault(name, t.shape)

    def merged(name: str) -> SparseTensor:
        part = [(v[name], w) for v, w in zip(vectors, weights, strict=True) if name in v]
        idx, vals = one([(t.indices, t.values) for t, _ in part], [w for _, w in part], math.prod(names[name]))
        return SparseTensor(names[name], idx, vals)

    if onto is None:
        for name in names:
            yield name, merged(name)
        return
    # a tensor of onto that the merge leaves alone goes through the same sum (0 + a)
    for name in onto:
        yield name, _add_one(onto, name, merged(name) if name in names else None)
    for name in names:
        if name not in onto:
            yield name, _add_one(onto, name, merged(name))


def _add_one(onto: SparseTaskVector, name: str, t: SparseTensor | None) -> SparseTensor:
    """``onto.add(SparseTaskVector({name: t}))[name]`` (``t`` None: nothing added)."""
    mine = SparseTaskVector({name: onto[name]} if name in onto else {})
    return mine.add(SparseTaskVector({} if t is None else {name: t}))[name]


@register("mask_aware")
def mask_aware(vectors, weights, *, lam: float = 1.0) -> Plan:
    def one(entries, w, numel):
        idx, vals = masked_mean(entries, w, numel, divisor="holders")
        return idx, vals * lam

    return vectors, weights, one


@register("fedavg")
def fedavg(vectors, weights) -> Plan:
    total = float(sum(weights))  # divide by all clients, also where few hold a coordinate

    def one(entries, w, numel):
        return masked_mean(entries, w, numel, divisor="none")

    return vectors, [w / total for w in weights], one


@register("task_arithmetic")
def task_arithmetic(vectors, weights, *, lam: float = 1.0) -> Plan:
    def one(entries, w, numel):
        idx, vals = masked_mean(entries, w, numel, divisor="none")
        return idx, vals * lam

    return vectors, [1.0] * len(vectors), one  # weights unused: see the module docstring


@register("ties")
def ties(vectors, weights, *, k: float = 0.2, lam: float = 1.0, trim: str = "global") -> Plan:
    """k: density kept per vector, as a fraction of its numel (0.2 = top 20% of all
    coordinates; a vector already sparser than k keeps every entry, it is not re-trimmed).
    trim: "global" (one threshold per vector, reference code) or "per_tensor" (mergekit)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"ties k must lie in (0, 1], got {k}")
    trimmed = []
    for v in vectors:
        names = list(v)
        if trim == "global":
            keeps = trim_top_k([v[n].values for n in names], round(k * v.numel))
        elif trim == "per_tensor":
            keeps = [trim_top_k([v[n].values], round(k * v[n].numel))[0] for n in names]
        else:
            raise ValueError(f"unknown ties trim {trim!r}; expected 'global' or 'per_tensor'")
        trimmed.append(
            SparseTaskVector(
                {
                    # a tensor that loses nothing is shared, not copied (sparse uploads under k)
                    n: v[n] if keep.all() else SparseTensor(v[n].shape, v[n].flat_indices()[keep], v[n].values[keep])
                    for n, keep in zip(names, keeps, strict=True)
                }
            )
        )

    def one(entries, w, numel):
        sign = elect_sign(entries, w, numel)

        def agree(idx, vals):
            return (vals != 0) & (torch.sign(vals) == _gather(sign, idx))

        idx, vals = masked_mean(entries, w, numel, include=agree, divisor="holders")
        return idx, vals * lam

    return trimmed, weights, one


def _plan(method: str, vectors: Sequence[SparseTaskVector], weights: Sequence[float] | None, params) -> Plan:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; known: {sorted(MERGE_METHODS)}")
    if not vectors:
        raise ValueError("nothing to merge: no task vectors given")
    weights = [1.0] * len(vectors) if weights is None else [float(w) for w in weights]
    if len(weights) != len(vectors):
        raise ValueError(f"{len(weights)} weights for {len(vectors)} vectors")
    if any(not (w > 0) for w in weights):
        raise ValueError(f"merge weights must be positive, got {weights}")
    return MERGE_METHODS[method](list(vectors), weights, **params)


def merge(
    method: str,
    vectors: Sequence[SparseTaskVector],
    weights: Sequence[float] | None = None,
    *,
    onto: SparseTaskVector | None = None,
    **params,
) -> SparseTaskVector:
    """Merge task vectors with a registered method. ``weights`` default to 1 each (e.g.
    pass example counts); they must be positive. ``params`` go to the method
    (``lam``; for ties also ``k`` and ``trim``). ``onto``: return ``onto.add(merged)``,
    bit for bit, built tensor by tensor (the merged update is never held whole)."""
    return SparseTaskVector(dict(_tensors(_plan(method, vectors, weights, params), onto)))


def merge_tensors(
    method: str,
    vectors: Sequence[SparseTaskVector],
    weights: Sequence[float] | None = None,
    *,
    onto: SparseTaskVector | None = None,
    **params,
) -> Callable[[], Iterator[tuple[str, SparseTensor]]]:
    """``merge(...)``'s tensors, built one at a time each time the returned function is
    called (the method's preparation, e.g. TIES's trimming, is done once, here): for a
    consumer that holds one tensor at a time (``codec.encode_tensors``)."""
    plan = _plan(method, vectors, weights, params)
    return lambda: _tensors(plan, onto)
