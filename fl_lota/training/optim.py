"""Optimizers that update only masked entries, with frozen entries left bit-identical.

Each mask is turned once into the flat indices of its trainable entries (int32 where the
tensor allows). Every step gathers those entries of the parameter and its gradient
(``index_select``), updates them with the same foreach kernels as stock ``torch.optim``
and writes them back (``index_put_``); no step syncs with the GPU or passes over the
whole tensor more than once. Frozen entries are never written, so they stay bit-identical
(no ``-0.0`` turned into ``+0.0``, no NaN leaking from a frozen entry), and the optimizer
state of a masked parameter holds only its trainable entries: at 90% sparsity a tenth of a
dense optimizer's state, plus the index (4 bytes per trainable entry, against the dense
bool mask's 1 byte per entry, which the optimizer does not keep). Parameters without a
mask are stepped densely with the same kernels as stock RMSprop / AdamW (bit-identical to
them without weight decay; ours decays decoupled, stock RMSprop's decay is L2). A mask
that is mostly True (LoTTO's calibration freezes only earlier tasks' entries) is stepped
densely instead, its frozen entries' gradients zeroed and their weights put back after the
step. ``index_put_`` widens an int32 index to int64 for each call: a transient copy the size
of one tensor's index.

Gradients are clipped per tensor inside ``step`` (``max_grad_norm``), on the trainable
entries only: the norm of a masked gradient counts its mask's entries, as in the
reference code, and no dense masking pass over the gradient is needed. Weight decay is
decoupled and masked too: plain AdamW decay would move every weight, frozen or not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fl_lota.vectors.task_vector import index_dtype

__all__ = ["OPTIMIZERS", "MaskedAdamW", "MaskedRMSprop", "build_optimizer", "clip_per_tensor_"]


class _Masked(torch.optim.Optimizer):
    """Base: ``masks`` maps a parameter to its bool mask (True = trainable); parameters
    without one are trained densely. ``max_grad_norm``: per-tensor clip inside ``step``
    (None: off). Float32 parameters only (bf16 autocast keeps float32 masters)."""

    _state_keys: tuple[str, ...] = ()

    def __init__(self, params, defaults, masks, max_grad_norm: float | None):
        super().__init__(params, defaults)
        masks = {id(p): m for p, m in (masks or {}).items()}
        self.max_grad_norm = max_grad_norm
        self._index: dict[int, torch.Tensor] = {}  # trainable entries of a mostly frozen parameter
        self._frozen: dict[int, torch.Tensor] = {}  # frozen entries of a mostly trainable one
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32 or not p.is_contiguous():
                    raise TypeError(
                        f"{type(self).__name__} steps contiguous float32 parameters; got a "
                        f"{'' if p.is_contiguous() else 'non-contiguous '}{p.dtype} one"
                    )
                m = masks.get(id(p))
                if m is None:
                    continue
                if m.dtype != torch.bool or m.shape != p.shape:
                    raise ValueError(
                        f"a mask must be bool of its parameter's shape {tuple(p.shape)}; got {m.dtype} {tuple(m.shape)}"
                    )
                m = m.to(p.device).reshape(-1)
                if int(m.sum()) * 2 > m.numel():
                    # mostly trainable (LoTTO's calibration freezes only earlier masks): the
                    # step is dense, and the frozen entries are put back bit for bit after it
                    self._frozen[id(p)] = _index((~m).nonzero().squeeze(1), p.numel())
                else:
                    self._index[id(p)] = _index(m.nonzero().squeeze(1), p.numel())

    def _gather(self, group) -> tuple[list, list, list, list[tuple]]:
        """(params, grads, states, write-backs) of a group's parameters that have a
        gradient: a masked parameter contributes its trainable entries as flat copies
        (written back by ``_scatter``); a dense one contributes itself."""
        ps, gs, states, back = [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            idx = self._index.get(id(p))
            st = self.state[p]
            if idx is None:
                frozen = self._frozen.get(id(p))
                if frozen is not None:
                    # frozen gradients count nowhere (clip norm, state); the weights come back after
                    if not p.grad.is_contiguous():
                        p.grad = p.grad.contiguous()
                    p.grad.view(-1).index_put_((frozen,), p.grad.new_zeros(()))
                    back.append((p, frozen, p.view(-1).index_select(0, frozen)))
                ps.append(p)
                gs.append(p.grad)
                shape = p
            else:
                if idx.numel() == 0:
                    continue
                flat = p.view(-1).index_select(0, idx)
                ps.append(flat)
                gs.append(p.grad.reshape(-1).index_select(0, idx))
                back.append((p, idx, flat))
                shape = flat
            if not st:
                st["step"] = 0
                for k in self._state_keys:
                    st[k] = torch.zeros_like(shape, memory_format=torch.preserve_format)
            st["step"] += 1
            states.append(st)
        if self.max_grad_norm is not None:
            clip_per_tensor_(gs, self.max_grad_norm)
        return ps, gs, states, back

    @staticmethod
    def _scatter(back: list[tuple]) -> None:
        for p, idx, flat in back:
            p.view(-1).index_put_((idx,), flat)

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors (what a dense optimizer holds for every entry)."""
        return sum(
            t.numel() * t.element_size()
            for st in self.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )

    def index_bytes(self) -> int:
        """Bytes of the masks' indices (what this optimizer keeps instead of the masks)."""
        return sum(i.numel() * i.element_size() for d in (self._index, self._frozen) for i in d.values())


class MaskedRMSprop(_Masked):
    """RMSprop without momentum (the paper's default: alpha 0.99, eps 1e-8)."""

    _state_keys = ("square_avg",)

    def __init__(self, params, lr=1e-5, alpha=0.99, eps=1e-8, weight_decay=0.0, masks=None, max_grad_norm=None):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay), masks, max_grad_norm)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ps, gs, states, back = self._gather(group)
            if not ps:
                continue
            lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            vs = [st["square_avg"] for st in states]
            torch._foreach_mul_(vs, alpha)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - alpha)
            avg = torch._foreach_sqrt(vs)
            torch._foreach_add_(avg, eps)
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_addcdiv_(ps, gs, avg, value=-lr)
            self._scatter(back)


class MaskedAdamW(_Masked):
    """AdamW (Loshchilov & Hutter, 2019) with decoupled, masked weight decay."""

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, masks=None, max_grad_norm=None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), masks, max_grad_norm)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ps, gs, states, back = self._gather(group)
            if not ps:
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            ms, vs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
            if wd:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_lerp_(ms, gs, 1 - b1)
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
            steps = [st["step"] for st in states]  # per parameter: one may have missed a step
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, [math.sqrt(1 - b2**n) for n in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, ms, denom, [-lr / (1 - b1**n) for n in steps])
            self._scatter(back)


OPTIMIZERS = {"rmsprop": MaskedRMSprop, "adamw": MaskedAdamW}


def build_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    masks: Mapping[torch.nn.Parameter, torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> _Masked:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr=lr, weight_decay=weight_decay, masks=masks, max_grad_norm=max_grad_norm)


@torch.no_grad()
def clip_per_tensor_(tensors: Iterable[torch.Tensor | torch.nn.Parameter], max_norm: float) -> None:
    """Scale each gradient so its L2 norm is at most ``max_norm`` (the reference code clips
    per tensor, not over the whole model). Takes gradients, or parameters (their ``.grad``)."""
    grads = [t.grad if isinstance(t, torch.nn.Parameter) else t for t in tensors]
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    factors = [torch.clamp(max_norm / (n.float() + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)


def _index(idx: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat indices in int32 where the tensor allows (half the bytes of int64)."""
    return idx.to(index_dtype(numel))
