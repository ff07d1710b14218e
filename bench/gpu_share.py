"""One GPU, many clients: the figures of the README's GPU section, measured in one go.

``federation``: the default job with ``conf/gpu.toml`` at each GPU share per client (default
0.25 and 1.0), 4 clients; from each run's own records (metrics.jsonl) the wall time, client
training seconds, client-rounds per hour and each client's peak GPU memory; GPU utilisation
and memory sampled by nvidia-smi every second. Prints the client-rounds-per-hour ratio of the
first share to the last (target: at least 2x).

``big``: a random-init Llama of the SmolLM2 family built from a config (about 1B parameters
by default: SmolLM2-1.7B's widths, 14 layers): the median optimizer-step time of LoTA (10%
mask) and of FFT of the same scope, each one's peak GPU memory, and how many clients fit on
the GPU at once: k processes each load the model and train LoTA steps together, k = 1, 2, ...
until one runs out of memory; prints the largest k that ran and the steps per second of all
k together.

    python bench/gpu_share.py federation [--shares 0.25,1.0] [--out DIR]
    python bench/gpu_share.py federation --conf sims/heterogeneous_tasks/conf/tiny.toml \
        --shares 0 --clients 2   # a dry run on a CPU
    python bench/gpu_share.py big [--layers 14] [--batch 8] [--seq 256] [--max-clients 16]
    python bench/gpu_share.py big --preset tiny --device cpu   # a dry run of the code path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "sims" / "heterogeneous_tasks"

# SmolLM2-1.7B's widths (hidden 2048, MLP 8192, 32 heads, vocab 49152); 14 of its 24 layers
# make about 1.0B parameters
BIG = dict(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
TINY = dict(BIG, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, vocab_size=512)


class GpuSampler:
    """nvidia-smi's utilisation and memory in use, sampled every second in the background."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory MiB)
        self._proc = None
        self._thread = None

    def __enter__(self) -> GpuSampler:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits", "-lms", "1000"]
        try:
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except FileNotFoundError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((util, mem))

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"util_mean": None, "util_max": None, "mem_max_mib": None}
        utils = [u for u, _ in self.samples]
        return {
            "util_mean": statistics.mean(utils),
            "util_max": max(utils),
            "mem_max_mib": max(m for _, m in self.samples),
        }


# ---- federation ---------------------------------------------------------------------


def federation(args) -> None:
    from fl_lota.federated.launch import launch

    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-share-")).absolute()  # results-dir must be absolute
    results = {}
    shares = [float(s) for s in args.shares.split(",")]
    if len(set(shares)) != len(shares):
        raise SystemExit(f"--shares {args.shares}: each share once")
    for share in shares:
        res_dir = out / f"share-{share:g}"
        if res_dir.exists():  # a run there would resume, and its wall time would mean nothing
            raise SystemExit(f"{res_dir} exists; give a new --out")
        fed = {
            "num-supernodes": args.clients,
            "client-resources-num-cpus": args.cpus,
            "client-resources-num-gpus": share,
        }
        t0 = time.perf_counter()
        with GpuSampler() as gpu:
            launch(
                APP,
                config_file=args.conf,
                run_config={"results-dir": str(res_dir)},
                federation_config=fed,
                flwr_home=args.flwr_home,
            )
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (res_dir / "metrics.jsonl").read_text().splitlines()]
        clients = [c for r in rows for c in r["clients"]]
        peaks: dict[str, int] = {}
        for r in rows:
            for c in [*r["clients"], *r.get("eval_clients", [])]:
                if c.get("gpu_peak_bytes") is not None:
                    peaks[c["client"]] = max(peaks.get(c["client"], 0), c["gpu_peak_bytes"])
        train_wall = sum(r["seconds"]["round_wall"] - r["seconds"].get("eval_wall", 0.0) for r in rows)
        results[share] = {
            "wall_seconds": wall,
            "round_wall_seconds": sum(r["seconds"]["round_wall"] for r in rows),
            "train_wall_seconds": train_wall,
            "client_rounds": len(clients),
            "client_train_seconds": sum(c["train_seconds"] for c in clients),
            # per hour of the rounds themselves (Ray, Flower and model start-up left out), and of the launch
            "client_rounds_per_hour": len(clients) / (sum(r["seconds"]["round_wall"] for r in rows) / 3600),
            "client_rounds_per_hour_launch": len(clients) / (wall / 3600),
            "gpu_peak_gib_per_client": {k: v / 2**30 for k, v in sorted(peaks.items())},
            "mean_score": rows[-1].get("mean_score"),
        } | gpu.summary()
        print(f"share {share:g}: " + json.dumps(results[share]), flush=True)
    first, last = results[shares[0]], results[shares[-1]]
    print(
        f"\nGPU: {_gpu_name()}; {Path(args.conf).name}, {args.clients} clients, client-resources-num-cpus={args.cpus}"
    )
    print(
        "| share | launch s | rounds s | client-rounds | client-rounds/h (rounds) | (launch) | client train s "
        "| GPU util mean/max % | GPU mem max GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s, r in results.items():
        util = "n/a" if r["util_mean"] is None else f"{r['util_mean']:.0f} / {r['util_max']:.0f}"
        mem = "n/a" if r["mem_max_mib"] is None else f"{r['mem_max_mib'] / 1024:.1f}"
        print(
            f"| {s:g} | {r['wall_seconds']:.0f} | {r['round_wall_seconds']:.0f} | {r['client_rounds']} "
            f"| {r['client_rounds_per_hour']:.1f} | {r['client_rounds_per_hour_launch']:.1f} "
            f"| {r['client_train_seconds']:.0f} | {util} | {mem} |"
        )
    ratio = first["client_rounds_per_hour"] / last["client_rounds_per_hour"]
    print(f"client-rounds per hour of rounds, share {shares[0]:g} / share {shares[-1]:g} = {ratio:.2f} (target >= 2)")
    (out / "gpu_share.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(f"results: {out}")


def _gpu_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


# ---- big model ----------------------------------------------------------------------


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(TINY if args.preset == "tiny" else BIG, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(args.device)


def _steps(args, kind: str, steps: int, model=None) -> dict:
    """Train ``steps`` optimizer steps of ``kind`` (lota: 10% random mask; fft: the whole
    scope) on random tokens; the step times after the first and the peak GPU memory."""
    from fl_lota.training.lota import scope_params
    from fl_lota.training.masks import random_mask
    from fl_lota.training.train import TrainConfig, train

    model = model or _model(args)
    vocab = model.config.vocab_size
    params = scope_params(model)
    mask = random_mask({n: p.shape for n, p in params.items()}, 0.9) if kind == "lota" else None
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def batches():
        while True:
            yield batch

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cfg = TrainConfig(steps=steps, lr=1e-5, batch_size=args.batch, bf16=True)
    sub = {n: params[n] for n in mask} if mask else params
    st = train(model, sub, batches(), cfg, masks=mask, progress=False)
    return {
        "kind": kind,
        "params": sum(p.numel() for p in model.parameters()),
        "step_median_s": statistics.median(st.step_seconds[1:] or st.step_seconds),
        "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }


def worker(args) -> None:
    """One client process of the fit test: build the model, say so (a file in
    ``--ready-dir``), wait for the start file, train LoTA steps, print a JSON line."""
    try:
        model = _model(args)
        (Path(args.ready_dir) / f"ready-{os.getpid()}").touch()
        while not Path(args.ready_dir, "go").exists():
            time.sleep(0.05)
        t0 = time.perf_counter()
        r = _steps(args, "lota", args.steps, model)
        r |= {"seconds": time.perf_counter() - t0, "ok": True}
    except torch.cuda.OutOfMemoryError as e:
        r = {"ok": False, "error": str(e).splitlines()[0]}
    print(json.dumps(r), flush=True)


def big(args) -> None:
    results = {k: _steps(args, k, args.steps) for k in ("fft", "lota")}
    for r in results.values():
        print(json.dumps(r), flush=True)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    fft, lota = results["fft"], results["lota"]
    print(
        f"\n{_gpu_name()}; Llama ({args.preset}) {fft['params'] / 1e9:.2f}B parameters, batch {args.batch} x {args.seq}"
    )
    print(f"step: LoTA {lota['step_median_s']:.3f} s, FFT {fft['step_median_s']:.3f} s, LoTA / FFT = "
          f"{lota['step_median_s'] / fft['step_median_s']:.2f}")  # fmt: skip
    if lota["peak_gib"] is not None:
        print(f"peak GPU memory: LoTA {lota['peak_gib']:.1f} GiB, FFT {fft['peak_gib']:.1f} GiB")
    fit = 0
    for k in range(1, args.max_clients + 1):
        ok, rate = _together(args, k)
        print(
            f"{k} client(s) at once: {'ran' if ok else 'out of memory'}"
            + (f", {rate:.2f} steps/s in all" if ok else "")
        )
        if not ok:
            break
        fit = k
    print(f"clients that fit on the GPU at once (LoTA, this model): {fit}")


def _together(args, k: int) -> tuple[bool, float]:
    """k worker processes build the model, then train together once all are ready (or one
    has failed); whether all ran, and their steps per second together."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "worker", "--ready-dir", tmp, "--preset", args.preset]
        cmd += ["--layers", str(args.layers), "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--steps", str(args.steps), "--device", args.device]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        while len(list(Path(tmp).glob("ready-*"))) < k and all(p.poll() is None for p in procs):
            time.sleep(0.1)
        Path(tmp, "go").touch()
        outs = []
        for p in procs:
            lines = p.communicate()[0].strip().splitlines()
            outs.append(json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {p.returncode}"})
    if not all(o.get("ok") for o in outs):
        return False, 0.0
    return True, k / max(o["step_median_s"] for o in outs)  # warm-up step and mask building left out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("federation")
    f.add_argument("--shares", default="0.25,1.0")
    f.add_argument("--cpus", type=float, default=2)
    f.add_argument("--clients", type=int, default=4, help="the federation's client count (default: %(default)s)")
    f.add_argument("--conf", default=str(APP / "conf" / "gpu.toml"), help="run config (default: %(default)s)")
    f.add_argument("--out")
    f.add_argument("--flwr-home")
    for name in ("big", "worker"):
        b = sub.add_parser(name)
        b.add_argument("--preset", choices=("1b", "tiny"), default="1b")
        b.add_argument("--layers", type=int, default=14)
        b.add_argument("--batch", type=int, default=8)
        b.add_argument("--seq", type=int, default=256)
        b.add_argument("--steps", type=int, default=6)
        b.add_argument("--device", default="cuda")
        b.add_argument("--max-clients", type=int, default=16)
        b.add_argument("--ready-dir")
    args = ap.parse_args()
    {"federation": federation, "big": big, "worker": worker}[args.cmd](args)


if __name__ == "__main__":
    main()
