"""Bytes per LoTA client and round in both directions, and the downlink / uplink ratio.

    python bench/downlink.py --out /abs/folder                 # the default job, then the table
    python bench/downlink.py --out /abs/folder --short         # 3 rounds of 3 steps, 8 test items
    python bench/downlink.py --out /abs/folder --set downlink-values=int4   # the rounding downlink
    python bench/downlink.py --from /abs/folder/metrics.jsonl  # the table of any run

The run is ``fl-lota run`` of the default job (SmolLM2-135M, 4 clients, LoTA, mask_aware;
``--set`` changes it). ``--short`` checks the mechanism in minutes, but its figures are not
the default job's: after 1 to 3 steps the values are few and compress far better than after
20, on both links. Every figure is per client and round as counted on its own Flower
messages: uplink (its reply), training downlink (the training instruction), evaluation
downlink (the evaluation instruction); the ratio is (training + evaluation downlink) /
uplink, for rounds >= 2 (round 1's uplink carries the mask and its downlink is empty).
Also printed: each round's evaluation wall time as a share of the round's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fl_lota.cli import main as cli_main
from fl_lota.federated.report import read_rows

MB = 1e6
SHORT = ["num-server-rounds=3", "local-steps=3", "calibration-steps=2", "n-test=8", "eval-base=false"]


def table(path: Path) -> None:
    rows = read_rows(path)
    print(f"{'round':>5} {'client':10} {'uplink MB':>10} {'train down MB':>14} {'eval down MB':>13} {'down/up':>8}")
    ratios = []
    for r in rows:
        evals = {c["partition"]: c["downlink_bytes"] for c in r.get("eval_clients", [])}
        for c in sorted(r["clients"], key=lambda c: c["partition"]):
            up, down, ev = c["message_bytes"], c["downlink_bytes"], evals.get(c["partition"], 0)
            ratio = (down + ev) / up if up else float("nan")
            if r["round"] >= 2:
                ratios.append(ratio)
            print(
                f"{r['round']:>5} {c['client']:10} {up / MB:10.3f} {down / MB:14.3f} {ev / MB:13.3f} {ratio:8.2f}"
                + ("  (values-only)" if c.get("values_only") else "  (mask + values)")
            )
    for r in rows:
        sec = r.get("seconds", {})
        if sec.get("round_wall"):
            print(
                f"round {r['round']}: wall {sec['round_wall']:.0f} s, evaluation {sec.get('eval_wall', 0):.0f} s "
                f"({100 * sec.get('eval_wall', 0) / sec['round_wall']:.1f}%; clients' own eval seconds "
                f"{sec.get('client_eval', 0):.0f} s"
                + (
                    f"; the new G's downlink encoded at publish, before it: {sec['downlink_prep']:.1f} s"
                    if "downlink_prep" in sec
                    else ""
                )
                + ")"
                + (
                    f"; and {sec['client_eval_in_train']:.0f} s of clients' seconds scoring the received model "
                    "inside the training messages (round 1: the base model, eval-base)"
                    if sec.get("client_eval_in_train")
                    else ""
                )
            )
    if ratios:
        lo, hi = min(ratios), max(ratios)
        print(f"rounds >= 2: (training + evaluation downlink) / uplink per client: {lo:.2f} .. {hi:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="absolute results folder for a new run")
    ap.add_argument("--from", dest="src", help="a run's metrics.jsonl")
    ap.add_argument("--set", action="append", default=[], help="further run-config settings (key=value)")
    ap.add_argument("--short", action="store_true", help="3 rounds of 3 steps (the mechanism, not the figures)")
    ap.add_argument("--flwr-home", help="private Flower state folder")
    args = ap.parse_args()
    if not (args.out or args.src):
        ap.error("give --out (run) or --from (read)")
    if args.out:
        argv = ["run", "--set", f"results-dir={Path(args.out).absolute()}"]
        for kv in [*(SHORT if args.short else []), *args.set]:
            argv += ["--set", kv]
        if args.flwr_home:
            argv += ["--flwr-home", args.flwr_home]
        rc = cli_main(argv)
        if rc:
            raise SystemExit(rc)
    table(Path(args.src) if args.src else Path(args.out).absolute() / "metrics.jsonl")


if __name__ == "__main__":
    main()
