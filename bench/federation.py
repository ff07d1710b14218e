"""The default federation under the comparison protocol: scores, bytes and time, measured.

    python bench/federation.py --out /abs/folder              # runs fl-lota compare (hours on a 2-core CPU)
    python bench/federation.py --from /abs/folder             # re-read a finished (or resumed) comparison

Runs ``fl-lota compare`` on sims/heterogeneous_tasks with its defaults (LoTA, FFT and LoRA;
each method's values tuned on validation splits; single-task references; every method x
merge its own federation; 3 seeds; evaluation after the last round only) and prints, from compare.json:
  - the merged models' absolute and normalized scores (mean +- std over seeds), and which
    differences exceed the seeds' spread, LoTA's losses included;
  - bytes per client and round: uplink, training downlink, evaluation downlink, and the
    FFT / LoTA uplink ratios;
  - the wall time of each federation and its share outside client training and evaluation.
The same arguments after ``--`` go to ``fl-lota compare`` (e.g. ``-- --seeds 2``).

    python bench/federation.py --from /abs/folder --records bench/results/federation

copies the comparison's records (the JSON of every finished unit, each federation's
metrics.jsonl and launch files; no updates, checkpoints or client state) into a folder small
enough to keep: copied back into an --out folder, they let a later call, on this or another
machine, resume where this one stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from fl_lota.cli import main as cli_main
from fl_lota.compare.stats import mean_std

MB = 1e6


def _fmt(values) -> str:
    m, sd, n = mean_std(values)
    return "-" if n == 0 else (f"{m:.3f}" if n == 1 else f"{m:.3f} ± {sd:.3f}")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def report(folder: Path) -> None:
    data = json.loads((folder / "compare.json").read_text())
    results, summary = data["results"], data["summary"]
    setup = results["setup"]
    for where, n in sorted(setup.get("machines", {}).items()):
        print(f"ran on {where}: {n} units and federations")
    print(f"\n== merged models ({setup['federation']}, {setup['rounds']} rounds, seeds {setup['seeds']}) ==")
    for run, e in summary.items():
        if not e["seeds"]:
            print(f"{run:18s} failed in every seed")
            continue
        print(f"{run:18s} mean {_fmt(e['scores']['mean'])}  normalized {_fmt(e['normalized'].get('mean', []))}")
    ok = {run: e for run, e in summary.items() if e["seeds"]}
    lota = ok.get("lota:mask_aware")
    if lota:
        m0, s0, _ = mean_std(lota["scores"]["mean"])
        print("\n== LoTA + mask_aware against the others (task-average absolute score; 'clear' = means apart by more")
        print("   than the sum of the two standard deviations) ==")
        for run, e in ok.items():
            if run == "lota:mask_aware":
                continue
            m1, s1, _ = mean_std(e["scores"]["mean"])
            gap = m0 - m1
            clear = abs(gap) > (s0 if s0 == s0 else 0) + (s1 if s1 == s1 else 0)
            verdict = ("wins" if gap > 0 else "LOSES") + (" clearly" if clear else " (within the seeds' spread)")
            print(f"  vs {run:18s} {m0:.3f} vs {m1:.3f}: LoTA {verdict}")
        refs = results["references"]
        for method in refs:
            means = [_mean(v["scores"].values()) for v in refs[method].values()]
            print(f"  single-task {method:5s} {_fmt(means)}")

    print("\n== bytes per client and round (MB, mean over clients and seeds) ==")
    for run, e in ok.items():
        print(
            f"{run:18s} uplink r1 {_mean(e['uplink_r1']) / MB:8.2f}  uplink r2+ {_mean(e['uplink_later']) / MB:8.2f}  "
            f"downlink r2+ {_mean(e['downlink_later']) / MB:8.2f}  eval downlink {_mean(e['eval_downlink']) / MB:8.2f}"
        )
    if "lota:mask_aware" in ok and "fft:fedavg" in ok:
        a, b = ok["lota:mask_aware"], ok["fft:fedavg"]
        print(
            f"FFT / LoTA uplink: round 1 {_mean(b['uplink_r1']) / _mean(a['uplink_r1']):.1f}x, "
            f"rounds 2+ {_mean(b['uplink_later']) / _mean(a['uplink_later']):.1f}x"
        )
        up, down, ev = _mean(a["uplink_later"]), _mean(a["downlink_later"]), _mean(a["eval_downlink"])
        print(
            f"LoTA downlink r2+ / uplink r2+: {down / up:.1f}x (training message), "
            f"{(down + ev) / up:.1f}x with the evaluation message"
        )

    print("\n== wall time per federation (seed 0) ==")
    for run, by_seed in results["federations"].items():
        fed = by_seed.get(str(setup["seeds"][0]), {})
        rows, wall = fed.get("rows"), fed.get("wall_seconds")
        if not rows or not wall:
            continue
        train = sum(c["train_seconds"] for r in rows for c in r["clients"])
        evals = sum(r["seconds"].get("client_eval", 0.0) for r in rows)
        other = wall - train - evals
        print(
            f"{run:18s} wall {wall:6.0f} s: client training {train:5.0f} s, evaluation {evals:5.0f} s, everything else "
            f"{other:4.0f} s ({100 * other / max(wall - evals, 1e-9):.1f}% of the non-evaluation time)"
        )
    if setup.get("wall_seconds"):
        print(f"\nwhole comparison: {setup['wall_seconds'] / 3600:.2f} h (units reused from earlier calls count 0)")
    sys.stdout.flush()


# what a comparison folder holds that a resumed comparison needs (everything else is large)
RECORDS = ("*.json", "*.jsonl", "*.md")
SKIP = ("checkpoint", "client-state", "client_updates")


def copy_records(folder: Path, dest: Path) -> int:
    """Copy the records of ``folder`` into ``dest`` (same relative paths); returns bytes copied."""
    total = 0
    for pattern in RECORDS:
        for f in folder.rglob(pattern):
            rel = f.relative_to(folder)
            if any(part in SKIP or ".stale-" in part for part in rel.parts) or ".tmp-" in f.name:
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / rel)
            total += f.stat().st_size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="absolute folder for a new (or resumed) comparison")
    ap.add_argument("--from", dest="src", help="a finished comparison folder")
    ap.add_argument("--flwr-home", help="private Flower state folder")
    ap.add_argument("--records", help="copy the comparison's records (small) into this folder")
    ap.add_argument("extra", nargs="*", help="further fl-lota compare arguments, after --")
    args = ap.parse_args()
    if not (args.out or args.src):
        ap.error("give --out (run) or --from (re-read)")
    folder = Path(args.src or args.out).absolute()
    if args.out:
        # eval-every above the round count: only the last round is scored (it always is)
        argv = ["compare", "--out", str(folder), "--set", "eval-every=1000", *args.extra]
        if args.flwr_home:
            argv += ["--flwr-home", args.flwr_home]
        t0 = time.perf_counter()
        rc = cli_main(argv)
        print(f"compare took {time.perf_counter() - t0:.0f} s (exit {rc})")
    if args.records:
        n = copy_records(folder, Path(args.records))
        print(f"records of {folder} copied to {args.records} ({n / MB:.2f} MB)")
    if (folder / "compare.json").is_file():
        report(folder)
    else:
        print(f"{folder} has no compare.json yet (the comparison has not reached its table)")


if __name__ == "__main__":
    main()
