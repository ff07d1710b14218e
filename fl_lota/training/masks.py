"""LoTA masks: which parameters may train (scope), and which of their entries (mask).

A mask is ``dict[name, BoolTensor]`` with True = trainable (the reference code stores the
opposite). Extraction keeps *exactly* k entries: a ``>=`` threshold over mostly-equal scores
(zeros after LoTTO, ties in bf16) would keep far more than asked.

Paper: Panda et al., "Lottery Ticket Adaptation: Mitigating Destructive Interference in
LLMs", 2024, Algorithm 1 (extract) and Section 3.3 (LoTTO).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = [
    "DEFAULT_SCOPE",
    "MASK_SELECTORS",
    "Mask",
    "density",
    "extract_mask",
    "magnitude_mask",
    "overlap",
    "random_mask",
    "scope_names",
    "top_k_flat",
    "union",
]

Mask = dict[str, torch.Tensor]

# Weight matrices of attention and MLP blocks across common causal-LM families
# (Llama/Mistral/Qwen: self_attn.q_proj, mlp.gate_proj; GPT-2: attn.c_attn, mlp.c_fc;
# GPT-NeoX: attention.query_key_value, mlp.dense_h_to_4h). Embeddings, norms and the LM
# head do not match and stay frozen, as in the reference code.
DEFAULT_SCOPE: tuple[str, ...] = (r"(?:^|\.)(?:self_attn|attn|attention|mlp|feed_forward)\.(?:.+\.)?weight$",)
ALL_SCOPE: tuple[str, ...] = (r".*",)


def scope_names(
    named_shapes: Iterable[tuple[str, torch.Size | tuple[int, ...]]],
    patterns: Iterable[str] | str = DEFAULT_SCOPE,
    *,
    matrices_only: bool = True,
) -> list[str]:
    """Names (in order) that match any regex in ``patterns`` (``re.search``); with
    ``matrices_only`` 1-D tensors (norms, biases) are left out. ``"all"`` selects everything."""
    if isinstance(patterns, str):
        patterns = ALL_SCOPE if patterns == "all" else (patterns,)
    compiled = [re.compile(p) for p in patterns]
    names = []
    for name, shape in named_shapes:
        if matrices_only and len(shape) < 2:
            continue
        if any(c.search(name) for c in compiled):
            names.append(name)
    if not names:
        raise ValueError(f"no parameter matches the scope {list(p.pattern for p in compiled)}")
    return names


def _keep_count(numel: int, sparsity: float) -> int:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    return round((1.0 - sparsity) * numel)


@torch.no_grad()
def top_k_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (n,) with exactly k True at the largest scores; ties at the threshold are
    broken by position (first wins), so the result is deterministic."""
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if k >= n:
        keep.fill_(True)
        return keep
    thr = torch.kthvalue(scores, n - k + 1).values  # k-th largest
    keep = scores > thr
    need = k - int(keep.sum())
    if need > 0:
        ties = torch.nonzero(scores == thr, as_tuple=False).reshape(-1)[:need]
        keep[ties] = True
    return keep


@torch.no_grad()
def _scores_excluding(scores: Mapping[str, torch.Tensor], exclude: Iterable[Mask]) -> dict[str, torch.Tensor]:
    """Scores as float32 with excluded entries set to -1 (never selected: real scores are
    magnitudes >= 0). NaN scores are an error, not a silent choice."""
    out = {}
    exclude = list(exclude)
    for name, s in scores.items():
        s = s.detach().float().abs().reshape(-1).clone()
        if torch.isnan(s).any():
            raise ValueError(f"{name}: task vector holds NaN; cannot rank entries")
        for ex in exclude:
            if name in ex:
                s[ex[name].reshape(-1).to(s.device)] = -1.0
        out[name] = s
    return out


@torch.no_grad()
def magnitude_mask(
    delta: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    mode: str = "global",
    exclude: Iterable[Mask] = (),
) -> Mask:
    """Keep the largest |delta| entries: ``sparsity`` is the frozen fraction (0.9 keeps 10%).

    mode="global": one threshold over all tensors (the paper's reference code);
    mode="per_tensor": the same fraction in every tensor.
    exclude: earlier masks whose entries may not be chosen (LoTTO). The kept count stays
    ``(1 - sparsity) * numel`` of the whole scope, capped at what is not excluded.
    """
    scores = _scores_excluding(delta, exclude)
    if mode == "per_tensor":
        out = {}
        for name, s in scores.items():
            k = min(_keep_count(s.numel(), sparsity), int((s >= 0).sum()))
            out[name] = top_k_flat(s, k).reshape(delta[name].shape)
        return out
    if mode != "global":
        raise ValueError(f"unknown mask mode {mode!r}; expected 'global' or 'per_tensor'")
    flat = torch.cat(list(scores.values())) if scores else torch.zeros(0)
    k = min(_keep_count(flat.numel(), sparsity), int((flat >= 0).sum()))
    keep = top_k_flat(flat, k)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].reshape(delta[name].shape)
        start += s.numel()
    return out


@torch.no_grad()
def random_mask(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    sparsity: float,
    *,
    seed: int = 0,
    mode: str = "global",
    exclude: Iterable[Mask] = (),
) -> Mask:
    """Uniformly random mask at ``sparsity``: the paper's "0% of data" calibration baseline."""
    g = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(tuple(s), generator=g) for n, s in shapes.items()}
    return magnitude_mask(scores, sparsity, mode=mode, exclude=exclude)


def _select_random(delta: Mapping[str, torch.Tensor], sparsity: float, **kw) -> Mask:
    return random_mask({n: d.shape for n, d in delta.items()}, sparsity, **kw)


# selector name -> f(delta, sparsity, *, mode, exclude[, seed]) -> Mask
MASK_SELECTORS: dict[str, Callable[..., Mask]] = {
    "magnitude": magnitude_mask,
    "random": _select_random,
}


def extract_mask(
    delta: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    selector: str = "magnitude",
    mode: str = "global",
    exclude: Iterable[Mask] = (),
    seed: int = 0,
) -> Mask:
    """Registry front door: ``selector`` is a key of ``MASK_SELECTORS``."""
    if selector not in MASK_SELECTORS:
        raise ValueError(f"unknown mask selector {selector!r}; known: {sorted(MASK_SELECTORS)}")
    kw = {"mode": mode, "exclude": exclude}
    if selector == "random":
        kw["seed"] = seed
    return MASK_SELECTORS[selector](delta, sparsity, **kw)


def density(mask: Mapping[str, torch.Tensor]) -> float:
    """Fraction of trainable entries."""
    total = sum(m.numel() for m in mask.values())
    return sum(int(m.sum()) for m in mask.values()) / max(total, 1)


def overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How much two masks share: ``intersection`` (entries), ``jaccard`` (|a&b| / |a|b|),
    ``frac_of_a`` and ``frac_of_b`` (|a&b| / |a|, / |b|). Tensors in only one mask
    contribute nothing to the intersection."""
    inter = n_a = n_b = 0
    union_n = 0
    for name in set(a) | set(b):
        ma, mb = a.get(name), b.get(name)
        ca = int(ma.sum()) if ma is not None else 0
        cb = int(mb.sum()) if mb is not None else 0
        i = int((ma & mb).sum()) if ma is not None and mb is not None else 0
        inter, n_a, n_b, union_n = inter + i, n_a + ca, n_b + cb, union_n + ca + cb - i
    return {
        "intersection": float(inter),
        "jaccard": inter / union_n if union_n else 0.0,
        "frac_of_a": inter / n_a if n_a else 0.0,
        "frac_of_b": inter / n_b if n_b else 0.0,
    }


def union(masks: Iterable[Mapping[str, torch.Tensor]]) -> Mask:
    """Elementwise OR over masks (names from all of them)."""
    out: Mask = {}
    for m in masks:
        for name, t in m.items():
            out[name] = out[name] | t if name in out else t.clone()
    return out
