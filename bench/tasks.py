"""Each generated task on the default model: base, LoTA (90% sparse) and FFT scores, at
equal budgets: FFT trains as many steps as LoTA's calibration and sparse phases together.

One seed, the learning rates given on the command line (not tuned): a quick look per task.
The comparison with tuned rates, seeds and single-task references is bench/federation.py.

    python bench/tasks.py [--tasks math,sql,classify,instruct,summarize] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys

from fl_lota.tasks import GENERATED, get_task
from fl_lota.tune import build_parser, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=",".join(GENERATED))
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=40, help="LoTA's sparse-adaptation steps (FFT: these + calibration)")
    ap.add_argument("--calibration-steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sparse-lr", type=float, default=None, help="LoTA's sparse-phase learning rate (default --lr)")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--out", default=None, help="append one JSON line per run here")
    args = ap.parse_args()

    rows = []
    print(
        "| task | metric | base | LoTA 90% | FFT | LoTA gain | LoTA / FFT "
        "| LoTA steps (calib.+sparse) | LoTA s | FFT steps | FFT s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.tasks.split(","):
        task = get_task(name, n_train=args.n_train, n_test=args.n_test)
        common = [
            f"--task={name}",
            f"--model={args.model}",
            f"--steps={args.steps}",
            f"--lr={args.lr}",
            f"--n-train={args.n_train}",
            f"--n-test={args.n_test}",
        ]
        lota_args = [*common, "--method=lota", f"--calibration-steps={args.calibration_steps}"]
        if args.sparse_lr:
            lota_args.append(f"--sparse-lr={args.sparse_lr}")
        lota = run(build_parser().parse_args(lota_args), task)
        budget = args.steps + args.calibration_steps  # LoTA's calibration counts against its budget
        fft_args = [a for a in common if not a.startswith("--steps=")] + [f"--steps={budget}"]
        fft = run(build_parser().parse_args([*fft_args, "--method=fft", "--skip-base"]), task)
        base = lota["base"]
        row = dict(
            task=name,
            metric=task.metric,
            base=base,
            lota=lota["tuned"],
            fft=fft["tuned"],
            lota_steps=lota["steps"],
            lota_s=lota["train_seconds"],
            fft_steps=fft["steps"],
            fft_s=fft["train_seconds"],
        )
        rows.append(row)
        ratio = lota["tuned"] / fft["tuned"] if fft["tuned"] > 0 else float("nan")
        print(
            f"| {name} | {task.metric} | {base:.3f} | {lota['tuned']:.3f} | {fft['tuned']:.3f} | "
            f"{100 * (lota['tuned'] - base):+.1f} pts | {ratio:.2f} | {lota['calibration_steps']}+{lota['steps']} | "
            f"{lota['train_seconds']:.0f} | "
            f"{fft['steps']} | {fft['train_seconds']:.0f} |",
            flush=True,
        )
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"lota": lota, "fft": fft}) + "\n")
    ok = all(
        (r["lota"] - r["base"] >= 0.2 or r["lota"] >= 2 * r["base"] > 0) and r["lota"] >= 0.9 * r["fft"] for r in rows
    )
    print(f"\ntargets (gain >= 20 pts or 2x, LoTA >= 90% of FFT) met on every task: {ok}")
    sys.exit(0)


if __name__ == "__main__":
    main()
