"""LoTA's masked step against stock PyTorch, on a SmolLM2-135M-shaped model, in one run.

Three training steps over the same scope (attention and MLP matrices), batch, precision
and per-tensor clipping, alternating (stock, FFT, LoTA, stock, ...), median step kept:
  - stock: forward/backward, then ``torch.optim.RMSprop(foreach=True)`` (dense);
  - FFT:   the project's optimizer with no mask (what FFT clients run);
  - LoTA:  the project's optimizer with a 10% mask (what LoTA's sparse phase runs).
Then the optimizer step alone, on the same gradients (left in place, kinds alternating):
stock RMSprop against the masked one (no clipping in either). And the optimizer state each one holds.

Targets (issue 12): optimizer step masked / stock <= 1.2; whole step LoTA / stock and
FFT / stock <= 1.05; LoTA's state <= 15% of FFT's at 90% sparsity.

    python bench/masked_step.py [--steps 6] [--batch 8] [--seq 128] [--optimizer rmsprop|adamw]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fl_lota.training.train as train_mod
from common import SMOLLM2
from fl_lota.training.lota import scope_params
from fl_lota.training.masks import random_mask
from fl_lota.training.optim import build_optimizer, clip_per_tensor_
from fl_lota.training.train import TrainConfig, train

STOCK = {
    "rmsprop": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8, foreach=True),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, eps=1e-8, weight_decay=0.0, foreach=True),
}


class _StockClipped:
    """Stock torch optimizer behind the project's interface: the same per-tensor clip,
    then the stock step."""

    def __init__(self, opt: torch.optim.Optimizer, params: list, max_grad_norm: float | None) -> None:
        self.opt, self.params, self.max_grad_norm = opt, params, max_grad_norm

    def step(self) -> None:
        if self.max_grad_norm is not None:
            clip_per_tensor_(self.params, self.max_grad_norm)
        self.opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--optimizer", default="rmsprop", choices=sorted(STOCK))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--opt-reps", type=int, default=10, help="optimizer-only steps timed per kind")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(args.device)
    params = scope_params(model)
    mask = random_mask({n: p.shape for n, p in params.items()}, 0.9)
    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def batches():
        while True:
            yield batch

    cfg = TrainConfig(steps=args.steps, lr=1e-5, optimizer=args.optimizer, batch_size=args.batch, bf16=True)
    project_build = train_mod.build_optimizer

    def stock_build(name, ps, *, lr, weight_decay=0.0, masks=None, max_grad_norm=None):
        assert not masks
        ps = list(ps)
        return _StockClipped(STOCK[name](ps, lr), ps, max_grad_norm)

    times: dict[str, list[float]] = {"stock": [], "fft": [], "lota": []}
    base = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(args.rounds):
        for kind in times:
            train_mod.build_optimizer = stock_build if kind == "stock" else project_build
            try:
                st = train(model, params, batches(), cfg, masks=mask if kind == "lota" else None, progress=False)
            finally:
                train_mod.build_optimizer = project_build
            times[kind] += st.step_seconds[1:]  # the first step allocates optimizer state
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(base[n])

    # the optimizer step alone, on the same gradients (one backward fills them)
    plist = list(params.values())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in plist:
        p.requires_grad_(True)
    with torch.autocast(device_type=args.device, dtype=torch.bfloat16):
        model(**{k: v.to(args.device) for k, v in batch.items()}).loss.backward()
    opts = {
        "stock": STOCK[args.optimizer](plist, 1e-5),
        "fft": build_optimizer(args.optimizer, plist, lr=1e-5),
        "lota": build_optimizer(
            args.optimizer, plist, lr=1e-5, masks={params[n]: m.to(args.device) for n, m in mask.items()}
        ),
    }
    opt_times: dict[str, list[float]] = {k: [] for k in opts}
    # the gradients stay in place (no optimizer here writes them): a fresh copy per step
    # would time page faults, not the step; kinds alternate in order and reverse order
    for rep in range(args.opt_reps + 1):
        for kind, opt in list(opts.items())[:: 1 if rep % 2 else -1]:
            _sync(args.device)
            t0 = time.perf_counter()
            opt.step()
            _sync(args.device)
            if rep:  # the first step allocates state
                opt_times[kind].append(time.perf_counter() - t0)
    state = {
        k: sum(t.numel() * t.element_size() for s in o.state.values() for t in s.values() if torch.is_tensor(t))
        for k, o in opts.items()
    }

    med = {k: statistics.median(v) for k, v in times.items()}
    omed = {k: statistics.median(v) for k, v in opt_times.items()}
    n_train = sum(int(m.sum()) for m in mask.values())
    n_scope = sum(p.numel() for p in plist)
    print(
        f"device {args.device}, batch {args.batch} x {args.seq} tokens, bf16 autocast, {args.optimizer}, scope "
        f"{n_scope / 1e6:.1f}M entries, LoTA mask {n_train / n_scope:.1%}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print("whole training step (forward, backward, per-tensor clip, optimizer), median:")
    for k, label in (
        ("stock", f"stock torch.optim ({args.optimizer}, foreach)"),
        ("fft", "FFT (project)"),
        ("lota", "LoTA (project, 10% mask)"),
    ):
        print(f"  {label:40s} {med[k]:.3f} s (median of {len(times[k])})")
    print(
        f"  LoTA / stock = {med['lota'] / med['stock']:.3f}   FFT / stock = {med['fft'] / med['stock']:.3f}"
        "   (targets <= 1.05)"
    )
    print("optimizer step alone (same gradients, no clip), median:")
    for k in opts:
        print(f"  {k:6s} {omed[k] * 1e3:8.1f} ms (median of {len(opt_times[k])})")
    print(
        f"  masked / stock = {omed['lota'] / omed['stock']:.3f} (target <= 1.2); "
        f"project dense / stock = {omed['fft'] / omed['stock']:.3f}"
    )
    idx = opts["lota"].index_bytes()
    print(
        f"optimizer state: stock {state['stock'] / 1e6:.1f} MB, FFT {state['fft'] / 1e6:.1f} MB, LoTA "
        f"{state['lota'] / 1e6:.1f} MB = {state['lota'] / state['fft']:.1%} of FFT (target <= 15%); LoTA's mask "
        f"index {idx / 1e6:.1f} MB more ({(state['lota'] + idx) / state['fft']:.1%} with it; a dense bool mask "
        f"would be {n_scope / 1e6:.1f} MB)"
    )


if __name__ == "__main__":
    main()
