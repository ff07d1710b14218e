"""FLTV codec on a SmolLM2-135M-sized (134.5M entries) task vector at 10% density.

Prints index bits per kept entry against the entropy bound, value bits per entry for each
value dtype, payload sizes against int32 indices + fp32 values and a dense fp32 update,
and encode / decode throughput.

    python bench/codec.py [--density 0.1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from common import random_sparse, smollm2_shapes
from fl_lota.vectors import codec


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    shapes = smollm2_shapes()
    t0 = time.perf_counter()
    tv = random_sparse(shapes, args.density, seed=0)
    print(
        f"vector: {tv.numel:,} entries, {tv.nnz:,} kept ({tv.density:.2%}), built in {time.perf_counter() - t0:.1f} s"
    )
    bound = sum(codec.index_entropy_bits(t.numel, t.nnz) for t in tv.values()) / tv.nnz
    dense_mb = tv.numel * 4 / 1e6
    naive_mb = tv.nnz * (4 + 4) / 1e6
    print(f"dense fp32 update: {dense_mb:,.1f} MB;  int32 indices + fp32 values: {naive_mb:,.1f} MB")
    print()
    print(
        "| values | payload MB | index bits/entry | bound | value bits/entry | vs dense "
        "| encode s | decode s | encode MB/s | decode MB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    vo_sizes = {}
    for values in ("bf16", "float32", "int8"):
        t_enc, data = timed(lambda v=values: codec.encode(tv, values=v), args.repeat)
        t_dec, back = timed(lambda d=data: codec.decode(d), args.repeat)
        assert back.nnz == tv.nnz
        vo = codec.encode(tv, values=values, values_only=True)
        vo_sizes[values] = len(vo)
        idx_bits = 8 * (len(data) - len(vo)) / tv.nnz
        val_bits = 8 * len(vo) / tv.nnz
        mb = len(data) / 1e6
        print(
            f"| {values} | {mb:.2f} | {idx_bits:.2f} | {bound:.2f} | {val_bits:.2f} | {dense_mb / mb:.1f}x "
            f"| {t_enc:.2f} | {t_dec:.2f} | {dense_mb / t_enc:.0f} | {dense_mb / t_dec:.0f} |"
        )
    print()
    print("MB/s are of the dense fp32 update the payload stands for (538 MB at 134.5M entries).")
    bf16_mb, int8_mb = vo_sizes["bf16"] / 1e6, vo_sizes["int8"] / 1e6
    print(f"values-only (rounds after the first): bf16 {bf16_mb:.2f} MB, int8 {int8_mb:.2f} MB")
    t_fp, _ = timed(lambda: codec.mask_fingerprint(tv), args.repeat)
    print(f"mask fingerprint: {t_fp:.2f} s")


if __name__ == "__main__":
    main()
