"""Merge time and peak memory for N LoTA uploads of SmolLM2-135M's scope (10% dense each).

Peak memory is the rise of the process's peak RSS during the merge above the RSS with the
inputs already decoded in memory: it should be about one merged output plus a few dense
buffers the size of the largest single tensor, not a dense model per client.

    python bench/merge.py [--clients 8] [--density 0.1]
"""

from __future__ import annotations

import argparse
import time

from common import random_sparse, reset_peak_rss, smollm2_shapes
from fl_lota.federated import memory
from fl_lota.merging.merge import MERGE_METHODS, merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--density", type=float, default=0.1)
    args = ap.parse_args()

    shapes = {n: s for n, s in smollm2_shapes(with_embeddings=False).items() if len(s) == 2}
    vectors = [random_sparse(shapes, args.density, seed=i) for i in range(args.clients)]
    numel = vectors[0].numel
    inputs_mb = sum(v.nnz for v in vectors) * 12 / 1e6  # int64 index + float32 value
    dense_per_client_mb = numel * 4 / 1e6
    print(f"{args.clients} uploads x {numel:,} entries at {args.density:.0%} density: {inputs_mb:,.0f} MB decoded")
    print(f"(a dense fp32 copy per client would be {args.clients * dense_per_client_mb:,.0f} MB)")
    print()
    print("| method | seconds | merged nnz | peak extra MB |")
    print("|---|---|---|---|")
    for method in MERGE_METHODS:
        params = {"k": 0.2} if method == "ties" else {}
        before = memory.rss_mb()
        reset_peak_rss()
        t = time.perf_counter()
        out = merge(method, vectors, **params)
        dt = time.perf_counter() - t
        extra = memory.peak_mb() - before
        print(f"| {method} | {dt:.2f} | {out.nnz:,} | {extra:,.0f} |")
        del out


if __name__ == "__main__":
    main()
