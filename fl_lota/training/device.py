"""Where a client computes: the device named by the run config, checked with named errors,
GPU memory figures, memory released between rounds, and out-of-memory as a named error.

Under Flower's Ray simulation a client sees a GPU only when it was given a GPU share
(``client-resources-num-gpus``): Ray then sets ``CUDA_VISIBLE_DEVICES`` for the actor, and
``cuda`` is that GPU. Several clients with shares below 1 run on the same GPU at once, each
in its own process, each holding its own copy of the model; ``release`` after every round
hands the cached blocks of that process back to the driver, so that the clients that follow
find the memory free.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import platform
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from fl_lota.training.models import cache_dir

__all__ = [
    "EVAL_PRECISIONS",
    "DeviceError",
    "GpuOutOfMemory",
    "autocast_bf16",
    "bf16_matmul_speedup",
    "check_bf16",
    "describe",
    "generation_bf16",
    "precision_name",
    "peak_bytes",
    "probe_file",
    "release",
    "resolve",
    "start_peak",
]

_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
SHARE_HINT = "client-resources-num-gpus"


class DeviceError(ValueError):
    """The run config names a device this process cannot use; the message says why and
    which setting to change."""


class GpuOutOfMemory(RuntimeError):
    """A client ran out of GPU memory; the message names the model, the GPU, this client's
    share of it and the settings that lower the need."""


def valid_spec(spec: str) -> bool:
    return bool(_SPEC.match(spec))


def resolve(spec: str) -> torch.device:
    """The torch device for a run config's ``device`` (``auto``: ``cuda`` when a GPU is
    visible, else ``cpu``). A GPU asked for and not usable is a DeviceError naming why:
    a CPU build of torch, no GPU visible to this process, or an index past the last GPU."""
    if not valid_spec(spec):
        raise DeviceError(f"device {spec!r}: must be auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.backends.cuda.is_built() and torch.version.hip is None:
        raise DeviceError(
            f"device {spec!r}: this torch ({torch.__version__}) is a CPU build; install the CUDA build of "
            "torch for your driver (README, Set-up) or set device=cpu"
        )
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = (
            f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from it"
            if visible is not None and not visible.strip(", ")
            else "torch finds no usable GPU (does nvidia-smi list one?)"
        )
        raise DeviceError(
            f"device {spec!r}: no GPU is visible to this process: {where}. In a Flower simulation a client "
            f"sees a GPU only with a GPU share: --federation-config '{SHARE_HINT}=0.25' (4 clients per GPU); "
            "or set device=cpu"
        )
    dev = torch.device(spec)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(
            f"device {spec!r}: this process sees {count} GPU(s) (cuda:0..cuda:{count - 1}); under Ray each client "
            "sees only the GPU of its share, as cuda:0: use device=cuda"
        )
    return dev


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100, 79.2 GiB)``, or ``cpu``."""
    if device.type != "cuda":
        return str(device)
    p = torch.cuda.get_device_properties(device)
    return f"{device} ({p.name}, {p.total_memory / 2**30:.1f} GiB)"


@functools.cache
def _cpu() -> tuple[str, frozenset[str]]:
    """This CPU's model name and instruction flags (Linux; elsewhere the platform's name and
    no flags)."""
    name, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return name, frozenset(flags)


# how clients generate at evaluation (run-config key eval-precision)
EVAL_PRECISIONS = ("auto", "bf16", "float32")
# bf16 generation casts the model (weights and activations in bf16, as an inference server
# serves it); fl-lota up to 7f7abcf generated under bf16 autocast and reported "bf16", so the
# comparison store keeps units scored either way apart
BF16_GENERATION = "bf16-model"
# "auto" on a CPU: bf16 only where a bf16 matmul measured at least this much faster here
BF16_SPEEDUP = 1.5


def generation_bf16(device: torch.device, precision: str, bf16: bool) -> bool:
    """Whether evaluation generates in bf16 (``fl_lota.tasks.evaluate.bf16_weights``).
    ``precision`` "bf16" / "float32" say so; "auto" generates in bf16 when the model trained
    under bf16 (``bf16``) and bf16 matmuls are native and fast here: on a GPU from Ampere on,
    and on a CPU with AMX or AVX512-BF16 where ``bf16_matmul_speedup`` measures bf16 at least
    ``BF16_SPEEDUP`` times as fast as float32 (a 2-core AMD EPYC with AVX512-BF16: 4.5x,
    and SmolLM2-135M answered 100 classify prompts in 2.9 s against 8.8 s in float32; a Xeon
    with AVX512-BF16 but no AMX ran generation under bf16 autocast slower than float32,
    17.9 s against 11.6 s, 2026-11-24). Float32 is the more exact of the two."""
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"eval precision {precision!r} is not one of {list(EVAL_PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    if not bf16:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    flags = _cpu()[1]
    return bool({"amx_bf16", "avx512_bf16"} & flags) and bf16_matmul_speedup() >= BF16_SPEEDUP


@functools.cache
def bf16_matmul_speedup() -> float:
    """How many times faster this CPU multiplies in bf16 than in float32, on a small language
    model's shapes (256 tokens x 1024 -> 1024; best of 5 each, about 50 ms in all): bf16
    kernels without native instructions run slower than float32. Measured once per machine:
    the first process stores the ratio in the model cache (``probe_file``), and every later
    process (each Ray actor, the comparison runner) reads it there, so all of them resolve
    ``auto`` alike, also while other clients load the cores."""
    path = probe_file()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return float(json.loads(path.read_text())["bf16_speedup"])
    g = torch.Generator().manual_seed(0)  # its own: the global generator is the run's
    x, w = torch.randn(256, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        torch.nn.functional.linear(a, b)  # warm the kernel
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            times.append(time.perf_counter() - t0)
        return min(times)

    ratio = best(x, w) / max(best(xb, wb), 1e-9)
    with contextlib.suppress(OSError):  # a read-only cache: measured again by the next process
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"bf16_speedup": ratio, "cpu": _cpu()[0], "torch": torch.__version__}))
        os.replace(tmp, path)  # a reader sees the whole file or none
    return ratio


def probe_file() -> Path:
    """Where this machine's bf16 probe is stored: the model cache (``$FL_LOTA_CACHE``), one
    file per CPU model, its flags, torch version and thread count."""
    name, flags = _cpu()
    key = hashlib.sha256(f"{name}|{sorted(flags)}|{torch.__version__}|{torch.get_num_threads()}".encode())
    return cache_dir() / "probes" / f"bf16-speedup-{key.hexdigest()[:16]}.json"


def precision_name(bf16: bool) -> str:
    """What a model generated in, as reports and comparison units name it: "bf16-model"
    (the model cast to bf16) or "float32"."""
    return BF16_GENERATION if bf16 else "float32"


def machine(device: torch.device) -> str:
    """What a result's numerics depend on besides the code: the GPU, or the CPU and its
    bf16 instructions (AMX, AVX512-BF16: bf16 matmuls round differently without them), and
    torch. Comparison units record it, so a table made on several machines says so."""
    if device.type == "cuda":
        where = describe(device)
    else:
        name, flags = _cpu()
        isa = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
        where = f"cpu {name} ({', '.join(isa) if isa else 'no bf16 instructions'}; {os.cpu_count()} cores)"
    return f"{where}, torch {torch.__version__}"


def start_peak(device: torch.device) -> None:
    """Start measuring this process's peak GPU memory (``peak_bytes``) afresh."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Most GPU memory this process's tensors held since ``start_peak`` (None off a GPU)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))


def release(device: torch.device) -> None:
    """Free what the last round left: collect unreachable tensors (optimizer state,
    activations held by a traceback) and return the cached GPU blocks to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory(
    model: str,
    device: torch.device,
    share: str,
    phase: str,
    batch_size: int,
    max_len: int,
    eval_batch_size: int | None = None,
) -> GpuOutOfMemory:
    """The error a client raises after a CUDA out-of-memory in ``phase``: what ran, on
    which GPU with which share, and the settings that lower the need."""
    return GpuOutOfMemory(
        f"CUDA out of memory while {phase} model {model!r} on {describe(device)}; this client's GPU share: "
        f"{share}. Give each client a larger share ({SHARE_HINT}=0.5 runs 2 clients per GPU at once, 1.0 one), "
        + (
            f"or lower eval-batch-size (now {eval_batch_size}: prompts answered together) in the run config"
            if phase == "evaluating" and eval_batch_size is not None
            else f"or lower batch-size (now {batch_size}) or max-len (now {max_len}) in the run config"
        )
    )


def check_bf16(device: torch.device) -> None:
    """A GPU without bf16 (before Ampere) is a DeviceError naming the setting, not an
    error deep in torch."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:  # bf16 needs Ampere or later
        raise DeviceError(
            f"{describe(device)} has no bfloat16 support; train in float32 with bf16=false in the run config "
            "(and generate in float32 with eval-precision=float32)"
        )


def autocast_bf16(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` (CPU and CUDA alike), for training (``check_bf16``)."""
    if not enabled:
        return nullcontext()
    check_bf16(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
