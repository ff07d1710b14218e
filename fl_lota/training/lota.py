"""LoTA's three phases, LoTTO and iterative calibration, as functions to call one by one.

Panda et al., "Lottery Ticket Adaptation: Mitigating Destructive Interference in LLMs", 2024:
(1) calibrate: full fine-tune from the base, task vector = tuned - base;
(2) extract: keep the top-k |delta| entries as the mask;
(3) sparse adaptation: from the base, train only the masked entries.
LoTTO (their Algorithm 2): a later task's mask excludes earlier masks, so the tasks' sparse
task vectors are disjoint and never interfere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields

import torch

from fl_lota.training.masks import DEFAULT_SCOPE, MASK_SELECTORS, Mask, extract_mask, scope_names, union
from fl_lota.training.train import TrainConfig, TrainStats, train
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

__all__ = ["LotaConfig", "calibrate", "extract", "scope_params", "sparse_adapt"]

Batches = Callable[[], Iterator[dict[str, torch.Tensor]]]  # a fresh, seeded iterator per phase


@dataclass(frozen=True)
class LotaConfig:
    """sparsity: frozen fraction (0.9 = 10% trainable). calibration_steps, or
    calibration_fraction of one epoch (default: as many steps as the sparse phase).
    iterative: further sparsities, each extracted from the previous LoTA model's task
    vector (e.g. (0.99,) for the paper's 90 -> 99). sparse_lr: learning rate of the sparse
    phase (default: the training config's, as for calibration); the reference scripts give
    the sparse run a higher rate than full fine-tuning, since with RMSprop each entry moves
    about ``lr`` per step and only the masked fraction moves at all."""

    sparsity: float = 0.9
    mask_mode: str = "global"
    selector: str = "magnitude"
    calibration_steps: int | None = None
    calibration_fraction: float | None = None
    scope: tuple[str, ...] = DEFAULT_SCOPE
    iterative: tuple[float, ...] = ()
    sparse_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for s in (self.sparsity, *self.iterative):
            if not 0.0 <= s < 1.0:
                raise ValueError(f"sparsity must lie in [0, 1), got {s}")
        if self.mask_mode not in ("global", "per_tensor"):
            raise ValueError(f"mask_mode must be 'global' or 'per_tensor', got {self.mask_mode!r}")
        if self.selector not in MASK_SELECTORS:
            raise ValueError(f"unknown mask selector {self.selector!r}; known: {sorted(MASK_SELECTORS)}")
        if self.calibration_steps is not None and self.calibration_steps < 1:
            raise ValueError("calibration_steps must be >= 1")
        if self.calibration_fraction is not None and not 0 < self.calibration_fraction <= 1:
            raise ValueError("calibration_fraction must lie in (0, 1]")
        if self.sparse_lr is not None and not self.sparse_lr > 0:
            raise ValueError(f"sparse_lr must be > 0, got {self.sparse_lr}")
        if self.calibration_steps is not None and self.calibration_fraction is not None:
            raise ValueError("give calibration_steps or calibration_fraction, not both")
        object.__setattr__(self, "scope", tuple([self.scope] if isinstance(self.scope, str) else self.scope))
        object.__setattr__(self, "iterative", tuple(self.iterative))

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def calib_steps(self, n_examples: int, cfg: TrainConfig) -> int:
        if self.calibration_steps is not None:
            return self.calibration_steps
        if self.calibration_fraction is not None:
            per_step = cfg.batch_size * cfg.grad_accum
            return max(1, math.ceil(self.calibration_fraction * n_examples / per_step))
        return max(1, cfg.steps)


def scope_params(model: torch.nn.Module, scope: Iterable[str] | str = DEFAULT_SCOPE) -> dict[str, torch.nn.Parameter]:
    """The parameters LoTA may train, by name, in model order."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in scope_names(((n, p.shape) for n, p in params.items()), scope)}


def calibrate(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    params: Mapping[str, torch.nn.Parameter],
    *,
    steps: int,
    frozen: Mask | None = None,
) -> tuple[dict[str, torch.Tensor], TrainStats]:
    """Phase 1: fine-tune ``params`` for ``steps`` (down to 1), return delta = tuned - base
    (float32) and put the weights back to the base. ``frozen`` entries (earlier tasks'
    masks, for LoTTO) do not train."""
    base = {n: p.detach().clone() for n, p in params.items()}
    masks = {n: ~m for n, m in frozen.items() if n in params} if frozen else None
    stats = train(model, params, batches, cfg, masks=masks, steps=steps, desc="lota calibrate")
    with torch.no_grad():
        delta = {n: p.detach().float() - base[n].float() for n, p in params.items()}
        for n, p in params.items():
            p.copy_(base[n])
    return delta, stats


# Phase 2: the mask (True = trainable) at a sparsity; ``exclude`` earlier masks for LoTTO.
extract = extract_mask


def sparse_adapt(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    params: Mapping[str, torch.nn.Parameter],
    mask: Mask,
    *,
    steps: int | None = None,
) -> tuple[SparseTaskVector, TrainStats]:
    """Phase 3: from the current (base) weights train only ``mask``'s entries; returns
    the sparse task vector over the mask. Every entry outside it is left bit-identical."""
    missing = set(mask) - set(params)
    if missing:
        raise ValueError(f"mask names parameters outside the scope: {sorted(missing)[:5]}")
    idx = {n: torch.nonzero(m.reshape(-1), as_tuple=False).reshape(-1) for n, m in mask.items()}
    base_vals = {n: params[n].detach().reshape(-1)[i].float().clone() for n, i in idx.items()}
    sub = {n: params[n] for n in mask}
    stats = train(model, sub, batches, cfg, masks=mask, steps=steps, desc="lota sparse")
    tv = SparseTaskVector(
        {
            n: SparseTensor(
                tuple(params[n].shape), i.cpu(), (params[n].detach().reshape(-1)[i].float() - base_vals[n]).cpu()
            )
            for n, i in idx.items()
        }
    )
    return tv, stats


def lotto_frozen(earlier: Iterable[Mask]) -> Mask:
    """What a LoTTO task may not touch: the union of earlier tasks' masks."""
    return union(earlier)
