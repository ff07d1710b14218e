"""The default federation on this machine: bytes, merged-model quality and overhead.

    python bench/federation.py --out /abs/folder            # runs fl-lota compare (~40 min, 2-core CPU)
    python bench/federation.py --from /abs/folder           # re-read a finished comparison

Prints, from one comparison (LoTA, FFT and LoRA runs of sims/heterogeneous_tasks, same data,
seeds and steps):
  - per-round uplink bytes, LoTA vs FFT (targets: >= 10x fewer in round 1, >= 20x after);
  - the merged model's task-average normalized score for LoTA+mask_aware, LoTA+ties,
    FFT+fedavg, FFT+ties, LoRA+fedavg (target: LoTA+mask_aware above both FFT merges);
  - the share of wall time spent outside client training (target: < 15%), counting
    federated evaluation apart, since it is measurement rather than overhead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fl_lota import report
from fl_lota.cli import main as cli_main

GRID = "lota:mask_aware,ties fft:fedavg,ties lora:fedavg"


def overhead(rows: list[dict], wall: float) -> dict[str, float]:
    train = sum(r["seconds"]["client_train"] for r in rows)
    evals = sum(r["seconds"].get("client_eval", 0.0) + r["seconds"].get("client_eval_in_train", 0.0) for r in rows)
    return {
        "wall": wall,
        "client_train": train,
        "evaluation": evals,
        "other": wall - train - evals,
        "other_share_excl_eval": (wall - train - evals) / max(wall - evals, 1e-9),
        "outside_training_share": (wall - train) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="absolute folder for a new comparison")
    ap.add_argument("--from", dest="src", help="a finished comparison folder")
    ap.add_argument("--grid", default=GRID)
    ap.add_argument("--flwr-home", help="private Flower state folder")
    ap.add_argument("extra", nargs="*", help="further fl-lota compare arguments, e.g. --set n-test=64")
    args = ap.parse_args()
    if not (args.out or args.src):
        ap.error("give --out (run) or --from (re-read)")
    folder = Path(args.src or args.out).absolute()
    walls: dict[str, float] = {}
    if args.out:
        argv = ["compare", "--out", str(folder), "--grid", args.grid, *args.extra]
        if args.flwr_home:
            argv += ["--flwr-home", args.flwr_home]
        t0 = time.perf_counter()
        rc = cli_main(argv)
        print(f"compare took {time.perf_counter() - t0:.0f} s (exit {rc})")
    runs = {
        p.name: report.read_rows(p / "metrics.jsonl")
        for p in sorted(folder.iterdir())
        if (p / "metrics.jsonl").is_file()
    }
    for name in runs:  # the whole flwr run, Ray start-up included
        info = folder / name / "launch.json"
        if info.exists():
            walls[name] = json.loads(info.read_text())["seconds"]
    entries = json.loads((folder / "compare.json").read_text())

    print("\n== uplink bytes per round (all clients) ==")
    for name, rows in runs.items():
        print(f"{name:5s} " + "  ".join(f"r{r['round']}: {r['uplink_bytes'] / 1e6:8.2f} MB" for r in rows))
    if "lota" in runs and "fft" in runs:
        for a, b in zip(runs["lota"], runs["fft"]):
            print(f"round {a['round']}: FFT / LoTA uplink = {b['uplink_bytes'] / a['uplink_bytes']:.1f}x")

    print("\n== merged model, task-average normalized score (common reference: best single-task score) ==")
    for e in entries:
        if "error" in e:
            print(f"{e['run']}: failed")
            continue
        scores = " ".join(f"{t}={v:.3f}" for t, v in e["scores"].items())
        head = f"{e['method']:5s} + {e['merge']:15s} normalized {e['normalized']:.3f}"
        print(f"{head}  mean {e['mean_score']:.3f}  {scores}")

    print("\n== wall time ==")
    for name, rows in runs.items():
        if name in walls:
            o = overhead(rows, walls[name])
            print(
                f"{name:5s} wall {o['wall']:.0f} s: client training {o['client_train']:.0f} s, evaluation "
                f"{o['evaluation']:.0f} s, everything else {o['other']:.0f} s = "
                f"{100 * o['other_share_excl_eval']:.1f}% "
                f"of the non-evaluation time ({100 * o['outside_training_share']:.1f}% of all time is outside training)"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
