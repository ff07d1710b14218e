"""One front door for fine-tuning: ``finetune(method, model, examples, cfg, **options)``.

Registered methods (``FINETUNE_METHODS``): ``lota`` (sparse, the paper's method), ``fft``
(full fine-tuning of the same scope of weights) and ``lora`` (peft). All use the same
trainer, data order, optimizer and seed, and all leave ``model`` holding the tuned weights
and return the update as a SparseTaskVector (dense tensors for fft and lora).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from fl_lota.training.data import DataStream, Example
from fl_lota.training.lora import LoraOptions, lora_finetune
from fl_lota.training.lota import LotaConfig, calibrate, extract, lotto_frozen, scope_params, sparse_adapt
from fl_lota.training.masks import DEFAULT_SCOPE, Mask
from fl_lota.training.train import TrainConfig, train
from fl_lota.vectors import lowrank
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["FINETUNE_METHODS", "FinetuneResult", "finetune"]


@dataclass
class FinetuneResult:
    method: str
    delta: SparseTaskVector
    mask: Mask | None
    trained_params: int
    losses: list[float]
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase
    masks_history: list[Mask] = field(default_factory=list)  # iterative calibration
    factors: SparseTaskVector | None = None  # lora: the update as low-rank factors (fl_lota.vectors.lowrank)
    seen: list[int] = field(default_factory=list)  # example indices trained on, in order (all phases)
    passes: int = 0  # batches through forward + backward, every phase (LoTA's calibration too)
    stream_start: int = 0  # stream positions read: [stream_start, stream_end)
    stream_end: int = 0


def _check_options(method: str, given: Iterable[str], known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; known: {sorted(known)}")


def _lota(model, examples, cfg, data: DataStream, *, mask: Mask | None = None, exclude: Sequence[Mask] = (), **opts):
    """mask: reuse a mask (skip calibration, e.g. later federated rounds). exclude:
    earlier tasks' masks (LoTTO): calibrated with them frozen, extracted disjoint. Every
    phase reads on from ``data``: calibration's batches are not replayed by the sparse phase."""
    _check_options("lota", opts, LotaConfig.option_names())
    lc = LotaConfig(**opts)
    params = scope_params(model, lc.scope)
    phases, t0 = {}, time.perf_counter()
    frozen = lotto_frozen(exclude) if exclude else None
    history: list[Mask] = []
    if mask is None:
        delta, _ = calibrate(model, data, cfg, params, steps=lc.calib_steps(len(examples), cfg), frozen=frozen)
        phases["calibrate"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        mask = extract(delta, lc.sparsity, mode=lc.mask_mode, selector=lc.selector, exclude=exclude, seed=lc.seed)
        del delta
        phases["extract"] = time.perf_counter() - t1
    history.append(mask)
    sparse_cfg = replace(cfg, lr=lc.sparse_lr) if lc.sparse_lr is not None else cfg
    # the sparse steps are shared by the sparse phases (iterative calibration adds phases,
    # not steps): 20 steps at 90% then 99% are 10 + 10
    n_phases = len(lc.iterative) + 1
    if sparse_cfg.steps < n_phases:
        raise ValueError(
            f"{sparse_cfg.steps} sparse steps cannot feed {n_phases} sparse phases (iterative {list(lc.iterative)}); "
            "give more steps"
        )
    share = [sparse_cfg.steps // n_phases + (i < sparse_cfg.steps % n_phases) for i in range(n_phases)]
    losses = []
    base = {n: p.detach().clone() for n, p in params.items()} if lc.iterative else {}
    for i, sparsity in enumerate(lc.iterative):
        t1 = time.perf_counter()
        tv, st = sparse_adapt(model, data, sparse_cfg, params, mask, steps=share[i])
        losses += st.losses
        with torch.no_grad():
            for n, p in params.items():  # back to the base, bit for bit
                p.copy_(base[n])
        mask = extract(tv.to_dense(), sparsity, mode=lc.mask_mode, selector=lc.selector, exclude=exclude, seed=lc.seed)
        history.append(mask)
        phases[f"iterate_{sparsity}"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    tv, st = sparse_adapt(model, data, sparse_cfg, params, mask, steps=share[-1])
    phases["sparse_adapt"] = time.perf_counter() - t1
    n = sum(int(m.sum()) for m in mask.values())
    return FinetuneResult("lota", tv, mask, n, losses + st.losses, time.perf_counter() - t0, phases, history)


def _fft(model, examples, cfg, data: DataStream, *, scope: Sequence[str] | str = DEFAULT_SCOPE):
    """Full fine-tuning over ``scope`` (default: LoTA's scope, so that LoTA at sparsity 0
    is exactly FFT; ``"all"`` trains every parameter)."""
    params = scope_params(model, scope)
    base = {n: p.detach().clone() for n, p in params.items()}
    st = train(model, params, data, cfg, desc="fft")
    delta = {n: p.detach().float() - base[n].float() for n, p in params.items()}
    n = sum(p.numel() for p in params.values())
    return FinetuneResult(
        "fft", SparseTaskVector.from_dense(delta), None, n, st.losses, st.seconds, {"train": st.seconds}
    )


def _lora(model, examples, cfg, data: DataStream, **opts):
    _check_options("lora", opts, LoraOptions.option_names())
    res = lora_finetune(model, data, cfg, LoraOptions(**opts))
    st = res.stats
    return FinetuneResult(
        "lora",
        SparseTaskVector.from_dense(res.delta),
        None,
        res.n_params,
        st.losses,
        st.seconds,
        {"train": st.seconds},
        factors=lowrank.pack(res.factors),
    )


FINETUNE_METHODS: dict[str, Callable[..., FinetuneResult]] = {"lota": _lota, "fft": _fft, "lora": _lora}


def finetune(
    method: str,
    model: torch.nn.Module,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    pad_id: int,
    start: int = 0,
    stream_seed: int | str | None = None,
    **options,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``examples`` with a registered method. Batches come
    from position ``start`` of the seeded example stream (``fl_lota.training.data.stream_order``,
    seed ``stream_seed``, default ``cfg.seed``); the result records the examples seen and
    the forward/backward passes spent, calibration included."""
    if method not in FINETUNE_METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; known: {sorted(FINETUNE_METHODS)}")
    if not examples:
        raise ValueError("no training examples")
    seed = cfg.seed if stream_seed is None else stream_seed
    data = DataStream(examples, cfg.batch_size, pad_id=pad_id, seed=seed, start=start, max_len=cfg.max_len)
    res = FINETUNE_METHODS[method](model, examples, cfg, data, **options)
    res.seen, res.passes, res.stream_start, res.stream_end = list(data.seen), data.batches, data.start, data.position
    return res
