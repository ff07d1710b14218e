"""The server with the default model's uploads: peak memory of one round for 8, 16 and 32
clients, and the time to resume from a checkpoint.

Each client's upload is a LoTA update of SmolLM2-135M's scope (106M entries) at 10% density,
encoded as the client sends it (FLTV, bf16). A fresh process per client count runs one
``Aggregator.aggregate`` round (decode, validate against the model's shapes, merge, encode
the new global update) and reports its peak RSS above the RSS with the payloads in memory.
Target (issue 12): growth per client at the margin, (peak(n) - peak(m)) / (n - m), at most
one decoded sparse upload (int32 indices and float32 values: 8 bytes per kept entry), far
below a dense fp32 model per client (425 MB). The server holds an upload's bf16 values as
sent (2 bytes, one block per upload) and its indices as int32 (4 bytes), and ``G`` packed
(a bit per entry, values dense) where that is smaller.

    python bench/server.py [--clients 8 16 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import random_sparse, reset_peak_rss, smollm2_shapes
from fl_lota.federated import memory
from fl_lota.federated.aggregator import Aggregator, Upload
from fl_lota.federated.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fl_lota.federated.runconfig import RunConfig
from fl_lota.vectors import codec

SCOPE = {n: s for n, s in smollm2_shapes(with_embeddings=False).items() if len(s) == 2}


def one_round(n: int, folder: Path) -> dict:
    # payloads made by the parent: this process's heap holds no freed garbage from making
    # them, which the round would reuse unseen (its peak would read low)
    payloads = [(folder / f"{i}.fltv").read_bytes() for i in range(n)]
    agg = Aggregator(RunConfig(), shapes=smollm2_shapes())
    base = memory.rss_mb()
    reset_peak_rss()
    t0 = time.perf_counter()
    r = agg.aggregate([Upload(str(i), p, 1.0, partition=i) for i, p in enumerate(payloads)])
    seconds = time.perf_counter() - t0
    assert len(r.accepted) == n
    nnz = sum(t.nnz for t in agg.masks["0"].values())
    return {
        "clients": n,
        "payload_mb": sum(map(len, payloads)) / 1e6,
        "peak_extra_mb": memory.peak_mb() - base,
        "decoded_upload_mb": nnz * 8 / 1e6,  # int32 index + float32 value per kept entry
        "dense_model_mb": sum(t.numel for t in agg.masks["0"].values()) * 4 / 1e6,
        "seconds": seconds,
    }


def resume_time() -> dict:
    """Save and load a checkpoint as after round 2 of the default federation: G over the
    union of 4 masks (about 34% dense) and the 4 masks."""
    masks = {str(i): random_sparse(SCOPE, 0.1, seed=100 + i) for i in range(4)}
    g = masks["0"]
    for i in range(1, 4):
        g = g.add(masks[str(i)])
    ckpt = Checkpoint(2, g, masks, [{"round": 1}, {"round": 2}], RunConfig().__dict__, None)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_checkpoint(d, ckpt)
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
        t0 = time.perf_counter()
        back = load_checkpoint(d)
        agg = Aggregator(RunConfig())
        agg.restore(back.global_tv, back.masks, {int(n): n for n in back.masks})
        load_s = time.perf_counter() - t0
    return {"checkpoint_mb": size / 1e6, "save_s": save_s, "resume_s": load_s, "global_density": g.density}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="*", default=[8, 16, 32])
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one measurement
    ap.add_argument("--payloads", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_round(args.one, args.payloads)))
        return
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    for i in range(max(args.clients)):
        (folder / f"{i}.fltv").write_bytes(codec.encode(random_sparse(SCOPE, 0.1, seed=i)))
    print(
        "| clients | payloads MB | peak extra MB | per client MB (average) | per client MB (margin) "
        "| decoded upload MB | dense fp32 model MB | s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    prev = None
    for n in args.clients:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--payloads", str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        margin = "" if prev is None else f"{(r['peak_extra_mb'] - prev[1]) / (n - prev[0]):.0f}"
        print(
            f"| {n} | {r['payload_mb']:.0f} | {r['peak_extra_mb']:.0f} | {r['peak_extra_mb'] / n:.0f} | {margin} | "
            f"{r['decoded_upload_mb']:.0f} | {r['dense_model_mb']:.0f} | {r['seconds']:.1f} |",
            flush=True,
        )
        prev = (n, r["peak_extra_mb"])
    tmp.cleanup()
    r = resume_time()
    print(
        f"\ncheckpoint after round 2 (G {r['global_density']:.0%} dense + 4 masks): {r['checkpoint_mb']:.0f} MB, "
        f"written in {r['save_s']:.1f} s, resumed (read + restore) in {r['resume_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
