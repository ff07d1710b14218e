"""The training loop every fine-tuning method shares, so methods compare on equal terms:
same data order, loss (answer tokens only), optimizer, clipping, precision and seed."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

import torch
from tqdm.auto import tqdm

from fl_lota.training.device import autocast_bf16
from fl_lota.training.optim import OPTIMIZERS, build_optimizer

__all__ = ["TrainConfig", "TrainStats", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """steps: optimizer steps; each consumes ``grad_accum`` batches of ``batch_size``.
    max_grad_norm: per-tensor gradient-norm clip (None = off). bf16: autocast compute in
    bfloat16 on CPU and CUDA while weights and optimizer state stay float32."""

    steps: int = 30
    lr: float = 5e-5
    optimizer: str = "rmsprop"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_len: int | None = 256
    bf16: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; known: {sorted(OPTIMIZERS)}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be >= 1")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TrainConfig:
        """Build from a plain mapping; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class TrainStats:
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0


def train(
    model: torch.nn.Module,
    params: Mapping[str, torch.nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    masks: Mapping[str, torch.Tensor] | None = None,
    steps: int | None = None,
    desc: str = "train",
    progress: bool = True,
) -> TrainStats:
    """Train ``params`` (name -> parameter) for ``steps`` (default ``cfg.steps``) optimizer
    steps; every other parameter is frozen for the duration (requires_grad restored after).
    ``masks`` (name -> bool, True = trainable) restricts those tensors to their entries."""
    steps = cfg.steps if steps is None else steps
    device = next(model.parameters()).device
    masks = masks or {}
    unknown = set(masks) - set(params)
    if unknown:
        raise ValueError(f"masks for parameters not being trained: {sorted(unknown)[:5]}")
    pmasks = {params[n]: m.to(device) for n, m in masks.items()}
    trainable = list(params.values())
    opt = build_optimizer(
        cfg.optimizer,
        trainable,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        masks=pmasks,
        max_grad_norm=cfg.max_grad_norm,
    )
    del pmasks  # the optimizer keeps the masks' indices, not the masks
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    torch.manual_seed(cfg.seed)
    stats = TrainStats()
    was_training = model.training
    model.train()
    t0 = time.perf_counter()
    # a bar only on a terminal (None: tqdm shows it when stderr is one); a Ray actor's
    # stderr is not, so federated clients print no bars into the run's log
    bar = tqdm(total=steps, desc=desc, leave=False, disable=True if steps < 2 or not progress else None)
    try:
        for _ in range(steps):
            ts = time.perf_counter()
            total = 0.0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(batches).items()}
                with autocast_bf16(device, cfg.bf16):
                    loss = model(**batch).loss / cfg.grad_accum
                loss.backward()
                total += float(loss.detach())
                stats.tokens += int((batch["labels"] != -100).sum())
            if not torch.isfinite(torch.tensor(total)):
                raise FloatingPointError(f"loss became {total} at step {len(stats.losses)}; lower the learning rate")
            opt.step()  # clips each gradient (its trainable entries) to max_grad_norm, then steps
            opt.zero_grad(set_to_none=True)
            stats.losses.append(total)
            stats.step_seconds.append(time.perf_counter() - ts)
            bar.set_postfix(loss=f"{total:.3f}", refresh=False)
            bar.update()
    finally:
        bar.close()
        for p, rg in saved.items():
            p.requires_grad_(rg)
            p.grad = None
        model.train(was_training)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last step's kernels count in the seconds
    stats.seconds = time.perf_counter() - t0
    return stats
