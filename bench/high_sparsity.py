"""Uplink bytes of one LoTA client per round, against dense fp32 of the trained scope.

One client (partition 0 of the default federation, the math task) trains two rounds on the
default model exactly as in a federated run (``LocalNode``: calibration and mask in round 1,
values only against the mask from round 2), at each setting given; the payloads are the
bytes its uploads put on the wire (the Flower message adds a few bytes of record keys).

    python bench/high_sparsity.py            # 90% bf16 (default), 99% int8, 90% -> 99% int8
    python bench/high_sparsity.py --set sparsity=0.95 --set values=int8

Scores are not measured here: the merged model's quality at each setting comes from the
comparison protocol (``bench/federation.py`` with ``-- --set ...``).
"""

from __future__ import annotations

import argparse
import time

from fl_lota.cli import parse_sets
from fl_lota.federated.node import LocalNode, load_base
from fl_lota.federated.runconfig import RunConfig
from fl_lota.training.lota import scope_params
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector

SETTINGS = {
    "90% bf16 (default)": {},
    "99% int8, straight": {"sparsity": 0.99, "values": "int8"},
    "90% -> 99% int8 (iterative)": {"iterative-sparsity": "0.99", "values": "int8"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], help="key=value run-config overrides: one setting")
    ap.add_argument("--partition", type=int, default=0)
    args = ap.parse_args()
    settings = {" ".join(args.set): parse_sets(args.set)} if args.set else SETTINGS
    empty = codec.encode(SparseTaskVector())
    rows = []
    first = RunConfig.from_run_config(next(iter(settings.values())))
    model, _, _ = load_base(first.model, first.resolved_device())
    dense = 4 * sum(p.numel() for p in scope_params(model).values())  # the same scope for every setting
    for label, sets in settings.items():
        cfg = RunConfig.from_run_config(sets)
        node = LocalNode(cfg, args.partition)
        t0 = time.perf_counter()
        r1 = node.train(empty, server_round=1)
        r2 = node.train(empty, r1.mask_payload, server_round=2)
        rows.append((label, r1, r2, dense, time.perf_counter() - t0))
        print(
            f"{label}: round 1 {len(r1.payload) / 1e6:.2f} MB ({dense / len(r1.payload):.0f}x below dense fp32), "
            f"round 2 values-only {len(r2.payload) / 1e6:.3f} MB ({dense / len(r2.payload):.0f}x); "
            f"{int(r1.metrics['nnz']):,} of {dense // 4:,} scope entries; {rows[-1][-1]:.0f} s",
            flush=True,
        )
    print(
        f"\ndense fp32 of the trained scope: {rows[0][3] / 1e6:.1f} MB "
        f"(model {first.model!r}, partition {args.partition})"
    )
    print("| setting | round 1 MB | x below dense | round 2+ MB (values only) | x below dense |")
    print("|---|---|---|---|---|")
    for label, r1, r2, dense, _ in rows:
        print(
            f"| {label} | {len(r1.payload) / 1e6:.2f} | {dense / len(r1.payload):.0f}x | {len(r2.payload) / 1e6:.3f} "
            f"| {dense / len(r2.payload):.0f}x |"
        )


if __name__ == "__main__":
    main()
