"""Peak memory of one federated client per method: LoTA, FFT and LoRA, round 1 and round 2.

    python bench/client_memory.py                      # the default model, all three methods
    python bench/client_memory.py --model tiny --set local-steps=2 --set calibration-steps=1

Each method and round runs in a fresh process (so none inherits another's freed memory):
one client of the default federation (partition 0, the math task, every other setting the
run config's defaults) trains round 1 from the base model; the server's ``Aggregator``
merges its upload; the client trains round 2 from that ``G`` (LoTA with its mask: values
only), as ``LocalNode.train`` does inside a Flower client. Printed per method and round: the process's resident memory
with the model and data loaded (``loaded``), its peak during the round (``peak``, Linux
/proc: VmHWM after a reset) and the rise above ``loaded``; on a GPU also the round's peak
GPU memory (``gpu_peak_bytes``, as clients report it). LoTA's round 1 holds a dense
calibration phase (full fine-tuning for ``calibration-steps``) and the mask's extraction, so
it peaks at least as high as FFT; round 2 trains the mask alone, with optimizer state only
for its entries. Round 2's ``G`` is merged from this one client's upload: in a federation
it is the merge of all clients' (for LoTA the union of their masks, larger), which the
client holds decoded beside the model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import reset_peak_rss
from fl_lota.federated import memory

METHODS = ("lota", "fft", "lora")


def one(method: str, rnd: int, folder: Path, sets: list[str]) -> dict:
    """Round ``rnd`` of one client with ``method`` in this process, what memory it took.
    Round 1 starts from the base model and leaves its upload (and LoTA's mask) in
    ``folder``; round 2 starts from ``folder/g.fltv``, the server's merge of that upload."""
    from fl_lota.federated.node import LocalNode
    from fl_lota.vectors.task_vector import SparseTaskVector

    node = LocalNode(_config(method, sets), 0)
    g = (folder / "g.fltv").read_bytes() if rnd > 1 else SparseTaskVector()
    mask = (folder / "mask.fltv").read_bytes() if rnd > 1 and (folder / "mask.fltv").is_file() else None
    node._model_at(SparseTaskVector())  # the model loaded before measuring
    loaded = memory.rss_mb()
    reset_peak_rss()
    res = node.train(g, mask, server_round=rnd)
    peak = memory.peak_mb()
    if rnd == 1:
        (folder / "upload.fltv").write_bytes(res.payload)
        if res.mask_payload is not None:
            (folder / "mask.fltv").write_bytes(res.mask_payload)
    return {
        "method": method,
        "round": rnd,
        "model": node.cfg.model,
        "task": node.data.tasks[0].name,
        "loaded_mb": loaded,
        "peak_mb": peak,
        "rise_mb": peak - loaded,
        "gpu_peak_bytes": res.report.gpu_peak_bytes,
        "values_only": res.values_only,
        "payload_mb": len(res.payload) / 1e6,
        "num_examples": res.report.num_examples,
    }


def _config(method: str, sets: list[str]):
    from fl_lota.cli import parse_sets
    from fl_lota.federated.runconfig import RunConfig

    return RunConfig.from_run_config({"method": method, **parse_sets(sets)})


def merged(method: str, folder: Path, sets: list[str], report_row: dict) -> None:
    """The server's side between the rounds: ``Aggregator`` merges the one upload into the
    ``G`` the client is sent in round 2 (``folder/g.fltv``)."""
    from fl_lota.federated.aggregator import Aggregator, Upload
    from fl_lota.training.models import param_shapes

    cfg = _config(method, sets)
    agg = Aggregator(cfg, param_shapes(cfg.model))
    up = Upload("1", (folder / "upload.fltv").read_bytes(), float(report_row["num_examples"]), partition=0)
    result = agg.aggregate([up])
    if result.accepted != ["1"]:
        raise SystemExit(f"{method}: the server refused the upload: {result.rejected}")
    (folder / "g.fltv").write_bytes(agg.global_payload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a run-config key=value")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one method and round in this process
    ap.add_argument("--round", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.round, args.dir, args.set)))
        return
    rows = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in (1, 2):
                cmd = [sys.executable, __file__, "--one", method, "--round", str(rnd), "--dir", tmp]
                done = subprocess.run(cmd + [f"--set={s}" for s in args.set], capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{method}, round {rnd}: the client failed:\n{done.stderr[-2000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                if rnd == 1:
                    merged(method, Path(tmp), args.set, rows[-1])
    r0 = rows[0]
    print(f"one client (partition 0, {r0['task']}) of the default federation, model {r0['model']!r}")
    print("| method | round | loaded MB | peak MB | rise MB | GPU peak MiB | upload MB |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        gpu = "" if x["gpu_peak_bytes"] is None else f"{x['gpu_peak_bytes'] / 2**20:.0f}"
        up = f"{x['payload_mb']:.1f}" + (" (values only)" if x["values_only"] else "")
        print(
            f"| {x['method']} | {x['round']} | {x['loaded_mb']:.0f} | {x['peak_mb']:.0f} | {x['rise_mb']:.0f} "
            f"| {gpu} | {up} |"
        )


if __name__ == "__main__":
    main()
