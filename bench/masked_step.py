"""Cost of LoTA's masking: masked-step time / dense-step time on a SmolLM2-135M-shaped model.

Both runs train the same scope (attention and MLP matrices) with the same optimizer, batch
and precision; the masked run zeroes gradients outside a 10% mask and writes the step back
only inside it. Runs alternate (dense, masked, dense, masked) and the median step is kept.

    python bench/masked_step.py [--steps 6] [--batch 8] [--seq 128] [--optimizer rmsprop]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from common import SMOLLM2
from fl_lota.lota import scope_params
from fl_lota.masks import random_mask
from fl_lota.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--optimizer", default="rmsprop")
    ap.add_argument("--rounds", type=int, default=2)
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
    times = {"dense": [], "masked": []}
    base = {n: p.detach().clone() for n, p in params.items()}
    for _ in range(args.rounds):
        for kind in ("dense", "masked"):
            st = train(model, params, batches(), cfg, masks=mask if kind == "masked" else None)
            times[kind] += st.step_seconds[1:]  # the first step allocates optimizer state
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(base[n])
    dense, masked = statistics.median(times["dense"]), statistics.median(times["masked"])
    print(f"device {args.device}, batch {args.batch} x {args.seq} tokens, bf16 autocast, {args.optimizer}")
    print(f"dense step  (FFT of the scope): {dense:.3f} s (median of {len(times['dense'])})")
    print(f"masked step (LoTA, 10% mask):   {masked:.3f} s (median of {len(times['masked'])})")
    print(f"masked / dense = {masked / dense:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
