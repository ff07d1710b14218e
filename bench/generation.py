"""Evaluation's generation: bf16 (the model cast) against float32, and the loop that drops
finished rows against Hugging Face's ``generate``, on the default tasks' test prompts.

    python bench/generation.py --update RESULTS/global_update.safetensors   # a run's merged model
    python bench/generation.py                                              # the base model

For each task (100 test prompts, one batch, its own token budget) and each precision, both
decoders answer the same prompts twice, alternating; printed: the better of the two times,
how many replies are identical between the decoders, and each one's score. Times are
seconds of this machine, comparable within one run only.
"""

from __future__ import annotations

import argparse
import time

import fl_lota.tasks.evaluate as ev
from fl_lota.tasks import get_task
from fl_lota.training.models import load
from fl_lota.vectors.task_vector import SparseTaskVector

TASKS = ("math", "sql", "classify", "instruct")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--update", help="a global_update.safetensors to apply to the model (default: none)")
    ap.add_argument("--n-test", type=int, default=100)
    args = ap.parse_args()
    model, tok = load(args.model, device="cpu")
    if args.update:
        SparseTaskVector.load(args.update).apply_to(model)
    dropping = ev._plain_greedy
    print("| task | precision | HF generate s | dropping rows s | identical replies | score HF / dropping |")
    print("|---|---|---|---|---|---|")
    for name in TASKS:
        task = get_task(name, n_test=args.n_test)
        prompts = [s.prompt for s in task.test]
        for bf16 in (True, False):
            secs: dict[str, list[float]] = {"hf": [], "drop": []}
            outs: dict[str, list[str]] = {}
            for way in ("hf", "drop", "hf", "drop"):
                ev._plain_greedy = dropping if way == "drop" else (lambda m: False)
                t0 = time.perf_counter()
                outs[way] = ev.generate(
                    model, tok, prompts, max_new_tokens=task.max_new_tokens, progress=False, bf16=bf16
                )
                secs[way].append(time.perf_counter() - t0)
            ev._plain_greedy = dropping
            same = sum(a == b for a, b in zip(outs["hf"], outs["drop"], strict=True))
            scores = [task.score(outs[w], task.test)["score"] for w in ("hf", "drop")]
            print(
                f"| {name} | {'bf16 model' if bf16 else 'float32'} | {min(secs['hf']):.2f} | {min(secs['drop']):.2f} "
                f"| {same} of {len(prompts)} | {scores[0]:.2f} / {scores[1]:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
