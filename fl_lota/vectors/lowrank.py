"""LoRA updates on the wire as their low-rank factors, not as dense deltas.

A LoRA client's update to weight ``W`` (out, in) is ``B @ A`` with ``B`` (out, r) already
scaled by alpha / r and ``A`` (r, in): sending the factors costs r * (out + in) values
instead of out * in. They travel as an ordinary SparseTaskVector of dense tensors named
``<W>::lora_B`` and ``<W>::lora_A`` (so the FLTV codec needs nothing new), and the server
``expand``s each client's factors into its exact dense delta before merging: merging the
products, not averaging A and B separately, which would not average the updates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

__all__ = ["SUFFIX_A", "SUFFIX_B", "expand", "is_lowrank", "pack"]

SUFFIX_A, SUFFIX_B = "::lora_A", "::lora_B"


def pack(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> SparseTaskVector:
    """``{weight: (B, A)}`` -> a task vector of the factors (dense tensors)."""
    out = {}
    for name, (b, a) in factors.items():
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{name}: factors of shapes {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
        out[name + SUFFIX_B] = SparseTensor(tuple(b.shape), None, b.detach().float().reshape(-1).clone())
        out[name + SUFFIX_A] = SparseTensor(tuple(a.shape), None, a.detach().float().reshape(-1).clone())
    return SparseTaskVector(out)


def is_lowrank(tv: SparseTaskVector) -> bool:
    return len(tv) > 0 and all(n.endswith((SUFFIX_A, SUFFIX_B)) for n in tv)


def expand(tv: SparseTaskVector) -> SparseTaskVector:
    """Factors -> dense deltas ``B @ A`` per weight. Raises ValueError naming a weight whose
    factors are missing, sparse or of shapes that do not multiply."""
    names = [n[: -len(SUFFIX_B)] for n in tv if n.endswith(SUFFIX_B)]
    orphans = [n for n in tv if n.endswith(SUFFIX_A) and n[: -len(SUFFIX_A)] not in names]
    if orphans or len(names) * 2 != len(tv):
        raise ValueError(f"low-rank update with unpaired factors: {(orphans or list(tv))[:3]}")
    out = {}
    for name in names:
        b, a = tv.get(name + SUFFIX_B), tv.get(name + SUFFIX_A)
        if a is None:
            raise ValueError(f"low-rank update lacks {name + SUFFIX_A}")
        if not (b.is_dense and a.is_dense and len(b.shape) == 2 and len(a.shape) == 2 and b.shape[1] == a.shape[0]):
            raise ValueError(f"{name}: factors of shapes {b.shape} and {a.shape} do not multiply")
        delta = b.values.float().reshape(b.shape) @ a.values.float().reshape(a.shape)
        out[name] = SparseTensor((b.shape[0], a.shape[1]), None, delta.reshape(-1))
    return SparseTaskVector(out)
