"""Optimizers that update only masked entries, with frozen entries left bit-identical.

The reference code fuses the mask into a per-parameter RMSprop step. We do the same for
RMSprop and AdamW: the step is computed densely (optimizer state stays dense, as in the
reference), then written back only where the mask is True with ``torch.where``. Multiplying
the update by the mask is not enough: ``w + (-lr * 0)`` turns -0.0 into +0.0, and a NaN in
a frozen entry's update would leak. Weight decay is decoupled and masked too: plain AdamW
decay moves every weight, frozen or not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["OPTIMIZERS", "MaskedAdamW", "MaskedRMSprop", "build_optimizer", "clip_per_tensor_"]


class _Masked(torch.optim.Optimizer):
    """Base: ``masks`` maps a parameter to its bool mask (True = trainable); parameters
    without one are trained densely."""

    def __init__(self, params, defaults, masks: Mapping[torch.nn.Parameter, torch.Tensor] | None):
        super().__init__(params, defaults)
        self._masks = {id(p): m for p, m in (masks or {}).items()}

    def _write(self, p: torch.Tensor, new: torch.Tensor) -> None:
        m = self._masks.get(id(p))
        p.copy_(new if m is None else torch.where(m, new, p))

    def _with_grads(self):
        """(group, param, float32 grad, state) for every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield group, p, p.grad.float(), self.state[p]

    def mask_grads_(self) -> None:
        """Zero gradients at frozen entries (call before clipping, so norms count only
        trainable entries, and so optimizer state never accumulates there)."""
        for group in self.param_groups:
            for p in group["params"]:
                m = self._masks.get(id(p))
                if m is not None and p.grad is not None:
                    p.grad.mul_(m)


class MaskedRMSprop(_Masked):
    """RMSprop without momentum (the paper's default: alpha 0.99, eps 1e-8)."""

    def __init__(self, params, lr=1e-5, alpha=0.99, eps=1e-8, weight_decay=0.0, masks=None):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay), masks)

    @torch.no_grad()
    def step(self, closure=None):
        for group, p, g, st in self._with_grads():
            lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            if not st:
                st["square_avg"] = torch.zeros_like(p, dtype=torch.float32)
            v = st["square_avg"]
            v.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            new = p.float() * (1 - lr * wd) if wd else p.float()
            new = new.addcdiv(g, v.sqrt().add_(eps), value=-lr)
            self._write(p, new.to(p.dtype))


class MaskedAdamW(_Masked):
    """AdamW (Loshchilov & Hutter, 2019) with decoupled, masked weight decay."""

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, masks=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), masks)

    @torch.no_grad()
    def step(self, closure=None):
        for group, p, g, st in self._with_grads():
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            if not st:
                st["step"] = 0
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            st["step"] += 1
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
            denom = (v / bc2).sqrt_().add_(eps)
            new = p.float() * (1 - lr * wd) if wd else p.float()
            new = new.addcdiv(m, denom, value=-lr / bc1)
            self._write(p, new.to(p.dtype))


OPTIMIZERS = {"rmsprop": MaskedRMSprop, "adamw": MaskedAdamW}


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    masks: Mapping[torch.nn.Parameter, torch.Tensor] | None = None,
) -> _Masked:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr=lr, weight_decay=weight_decay, masks=masks)


@torch.no_grad()
def clip_per_tensor_(params: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient so its L2 norm is at most ``max_norm`` (the
    reference code clips per tensor, not over the whole model)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(max_norm / (n.float() + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)
