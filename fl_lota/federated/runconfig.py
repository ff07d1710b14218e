"""The federated run's settings: parsed once, where they enter, into a frozen dataclass.

Flower hands both apps the run config as a flat mapping (``[tool.flwr.app.config]`` in the
app's pyproject.toml, overridden by ``flwr run --run-config``). ``RunConfig.from_run_config``
is the only place that reads it: an unknown key, a value of the wrong type or out of range
is an error naming the key. Keys are the dashed names below (``KEYS``); a sim's
pyproject.toml and every file under its ``conf/`` are checked against them by the tests.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from pathlib import Path

import torch

from fl_lota.federated.downlink import DOWNLINK_VALUES
from fl_lota.merging.merge import MERGE_METHODS
from fl_lota.tasks.partition import FederationSpec
from fl_lota.training import device as devices
from fl_lota.training.methods import FINETUNE_METHODS
from fl_lota.training.optim import OPTIMIZERS
from fl_lota.training.train import TrainConfig
from fl_lota.vectors import codec

__all__ = ["COSMETIC", "KEYS", "RESUME_MAY_CHANGE", "RunConfig", "RunConfigError"]

# what a run resumed from a checkpoint may change (more rounds, another timeout, and where
# its folders now are: a moved results folder resumes); any other difference is refused
# eval_batch_size may change too: lowering it is the cure for an evaluation out of GPU memory
RESUME_MAY_CHANGE = (
    "num_server_rounds",
    "round_timeout",
    "results_dir",
    "client_state_dir",
    "verbose",
    "eval_batch_size",
)
# what changes only what a person sees, never a result: left out of every stored unit's key
COSMETIC = ("verbose",)


class RunConfigError(ValueError):
    """A run-config key that is unknown, ill-typed or out of range."""


@dataclass(frozen=True)
class RunConfig:
    num_server_rounds: int = 2
    model: str = "default"  # 'default' (embedded SmolLM2-135M-Instruct), 'tiny', hub id or path
    federation: str = "math,sql,classify,instruct"  # see fl_lota.tasks.partition.FederationSpec
    method: str = "lota"  # lota | fft | lora
    merge: str = "mask_aware"  # the merge that makes the global model
    eval_merges: str = ""  # further merges scored on the same uploads each round, comma-separated
    sparsity: float = 0.9  # lota: frozen fraction
    mask_mode: str = "global"
    iterative_sparsity: str = ""  # lota: further sparsities ('0.99'), each from the last phase's vector
    lotto: bool = False  # lota: a client making its mask leaves the global update's entries (earlier masks) frozen
    calibration_steps: int = 10  # lota: full fine-tuning steps that find the mask, part of the first round's budget
    local_steps: int = 20  # optimizer steps per client and round, every method (lota's calibration included)
    lr: float = 5e-5
    sparse_lr: float = 1e-4  # lota: learning rate of the sparse phase; 0 = same as lr
    optimizer: str = "rmsprop"
    batch_size: int = 8
    max_grad_norm: float = 1.0
    max_len: int = 256
    bf16: bool = True
    lora_rank: int = 8
    merge_lam: float = 1.0  # scale of the merged update (task arithmetic's lambda)
    ties_k: float = 0.2  # ties: kept fraction of each update
    values: str = "bf16"  # wire dtype of update values: float32 | bf16 | int8 | int4
    downlink_values: str = "exact"  # G on the downlink: exact, or each round's change of G rounded to int8 | int4
    n_train: int = 256
    n_test: int = 100
    eval_every: int = 1  # federated evaluation every N rounds (the last round always)
    eval_base: bool = True  # round 1: clients also score the base model (the floor)
    eval_local: bool = False  # evaluation rounds: clients also score their own model after local training
    eval_batch_size: int = 128  # prompts generated together at evaluation
    eval_precision: str = "auto"  # generation: auto | bf16 | float32 (fl_lota.training.device.generation_bf16)
    fraction_train: float = 1.0
    min_train_nodes: int = 0  # at least this many clients train per round (0: fraction-train decides, >= 1)
    max_upload_mb: float = 2048.0  # larger uploads are refused before decoding
    clip_norm: float = 0.0  # > 0: scale each client's update down to this L2 norm
    min_replies: int = 1  # usable uploads a round needs to change the global model
    round_timeout: float = 3600.0  # seconds to wait for replies
    results_dir: str = ""  # absolute; '' = ~/fl-lota-results/<timestamp>-<method>-<merge>
    client_state_dir: str = ""  # absolute; clients also keep their LoTA mask here (survives restarts)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # training randomness: the order of each client's example stream, LoRA/random-mask init
    data_seed: int = 0  # which examples each task holds (generated samples, held-out splits)
    verbose: bool = False  # clients keep the libraries' progress bars and messages (fl_lota.federated.console)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> RunConfigError:
            return RunConfigError(f"run config {key!r}: {why}")

        for name, choices in (("method", FINETUNE_METHODS), ("merge", MERGE_METHODS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in choices:
                raise bad(name, f"{getattr(self, name)!r} is not one of {sorted(choices)}")
        for m in self.extra_merges:
            if m not in MERGE_METHODS:
                raise bad("eval-merges", f"{m!r} is not one of {sorted(MERGE_METHODS)}")
        if self.values not in codec.VALUE_DTYPES:
            raise bad("values", f"{self.values!r} is not one of {sorted(codec.VALUE_DTYPES)}")
        if self.downlink_values not in DOWNLINK_VALUES:
            raise bad("downlink-values", f"{self.downlink_values!r} is not one of {list(DOWNLINK_VALUES)}")
        if self.eval_precision not in devices.EVAL_PRECISIONS:
            raise bad("eval-precision", f"{self.eval_precision!r} is not one of {list(devices.EVAL_PRECISIONS)}")
        if self.mask_mode not in ("global", "per_tensor"):
            raise bad("mask-mode", "must be 'global' or 'per_tensor'")
        if not 0.0 <= self.sparsity < 1.0:
            raise bad("sparsity", f"must lie in [0, 1), got {self.sparsity}")
        for key in (
            "num_server_rounds",
            "local_steps",
            "calibration_steps",
            "batch_size",
            "eval_every",
            "n_test",
            "eval_batch_size",
        ):
            if getattr(self, key) < 1:
                raise bad(key.replace("_", "-"), f"must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "max_upload_mb", "round_timeout", "n_train", "max_len", "lora_rank"):
            if not getattr(self, key) > 0:
                raise bad(key.replace("_", "-"), f"must be > 0, got {getattr(self, key)}")
        for key in ("sparse_lr", "max_grad_norm", "min_train_nodes", "clip_norm", "min_replies"):
            if getattr(self, key) < 0:
                raise bad(key.replace("_", "-"), f"must be >= 0, got {getattr(self, key)}")
        if self.method == "lota" and self.calibration_steps >= self.local_steps:
            raise bad(
                "calibration-steps",
                f"{self.calibration_steps} leaves no sparse steps: LoTA's calibration counts against the round's "
                f"budget of local-steps={self.local_steps}; give fewer calibration steps or more local steps",
            )
        # one spelling per setting ("0.99", not " 0.99 ,"), so that equal settings share an identity
        object.__setattr__(self, "iterative_sparsity", ",".join(repr(x) for x in self.iterative))
        steps = [self.sparsity, *self.iterative]
        if self.method != "lota" and (self.iterative or self.lotto):
            raise bad(
                "iterative-sparsity" if self.iterative else "lotto",
                f"is a LoTA setting; method {self.method!r} has no mask (leave it at its default)",
            )
        if any(not a < b < 1 for a, b in pairwise(steps)):
            raise bad(
                "iterative-sparsity",
                f"{self.iterative_sparsity!r}: each sparsity must exceed the one "
                f"before (sparsity={self.sparsity}) and lie below 1",
            )
        if self.method == "lota" and self.local_steps - self.calibration_steps < len(steps):
            raise bad(
                "iterative-sparsity",
                f"{len(steps)} sparse phases need at least {len(steps)} of the "
                f"{self.local_steps - self.calibration_steps} steps left after calibration",
            )
        if not 0 < self.fraction_train <= 1:
            raise bad("fraction-train", f"must lie in (0, 1], got {self.fraction_train}")
        if not 0 < self.ties_k <= 1:
            raise bad("ties-k", f"must lie in (0, 1], got {self.ties_k}")
        if not devices.valid_spec(self.device):
            raise bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.results_dir and not Path(os.path.expanduser(self.results_dir)).is_absolute():
            raise bad(
                "results-dir",
                f"{self.results_dir!r} is relative; give an absolute path (the SuperLink that runs the "
                "ServerApp keeps the working directory of its first launch, not yours)",
            )
        if self.client_state_dir and not Path(os.path.expanduser(self.client_state_dir)).is_absolute():
            raise bad("client-state-dir", f"{self.client_state_dir!r} is relative; give an absolute path")
        try:
            FederationSpec.parse(self.federation)
        except ValueError as e:
            raise bad("federation", str(e)) from None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> RunConfig:
        """Parse Flower's run config (dashed keys). Unknown keys and wrong types are errors."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise RunConfigError(f"unknown run config key(s) {unknown}; known: {sorted(known)}")
        kw = {}
        for key, value in run_config.items():
            f = known[key]
            want = type(getattr(cls(), f.name))  # the default's type
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if f.name == "iterative_sparsity" and isinstance(value, float | int) and not isinstance(value, bool):
                value = str(value)  # iterative-sparsity = 0.99 means "0.99"
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise RunConfigError(f"run config {key!r}: expected {want.__name__}, got {value!r}")
            kw[f.name] = value
        return cls(**kw)

    def identity(self) -> dict[str, object]:
        """Every setting that can change a result (all but ``COSMETIC``): the key under
        which comparison units are stored and reused."""
        out = {k: v for k, v in asdict(self).items() if k not in COSMETIC}
        # what evaluation generates in ("auto" resolved on this machine): it changes the scores
        bf16 = self.eval_bf16() if self.eval_precision == "auto" else self.eval_precision == "bf16"
        out["eval_precision"] = devices.precision_name(bf16)
        return out

    def resumable(self) -> dict[str, object]:
        """The settings a checkpoint must match to be resumed (all but ``RESUME_MAY_CHANGE``)."""
        return {k: v for k, v in asdict(self).items() if k not in RESUME_MAY_CHANGE}

    @classmethod
    def completed(cls, stored: Mapping[str, object]) -> dict[str, object]:
        """Stored settings (a checkpoint's, a comparison unit's) with the keys added to
        RunConfig since they were written filled in at their defaults: a key that did not
        exist then had its default's behaviour."""
        defaults = asdict(cls())
        if "eval_precision" not in stored:  # before the key, evaluation generated as the model trained
            defaults["eval_precision"] = "bf16" if stored.get("bf16", True) else "float32"  # "bf16": autocast
        return {k: stored.get(k, defaults[k]) if k in defaults else stored[k] for k in set(stored) | set(defaults)}

    # ---- derived settings -------------------------------------------------------------

    @property
    def spec(self) -> FederationSpec:
        return FederationSpec.parse(self.federation)

    @property
    def extra_merges(self) -> tuple[str, ...]:
        names = [m.strip() for m in self.eval_merges.split(",") if m.strip()]
        return tuple(dict.fromkeys(m for m in names if m != self.merge))

    @property
    def merges(self) -> tuple[str, ...]:
        """The global model's merge first, then the ones only scored."""
        return (self.merge, *self.extra_merges)

    def merge_params(self, method: str) -> dict[str, object]:
        if method == "ties":
            return {"k": self.ties_k, "lam": self.merge_lam}
        if method in ("mask_aware", "task_arithmetic"):
            return {"lam": self.merge_lam}
        return {}

    def train_config(self, *, first_round: bool = False) -> TrainConfig:
        """The round's training settings. Every method gets ``local-steps`` optimizer steps
        per round; LoTA's calibration is part of them, so in the round where a LoTA client
        makes its mask it trains ``local-steps - calibration-steps`` sparse steps."""
        steps = self.local_steps
        if self.method == "lota" and first_round:
            steps -= self.calibration_steps
        return TrainConfig(
            steps=steps,
            lr=self.lr,
            optimizer=self.optimizer,
            max_grad_norm=self.max_grad_norm or None,
            batch_size=self.batch_size,
            max_len=self.max_len,
            bf16=self.bf16,
            seed=self.seed,
        )

    @property
    def max_client_examples(self) -> int:
        """The most training examples one client of this federation can hold: ``n-train``
        of its task, or of every task in a mixed federation (a bound on merge weights)."""
        spec = self.spec
        return self.n_train * (len(spec.tasks) if spec.alpha is not None else 1)

    @property
    def examples_per_round(self) -> int:
        """Examples each client trains on per round (one forward and backward pass each)."""
        return self.local_steps * self.batch_size

    def stream_start(self, server_round: int) -> int:
        """Where round ``server_round`` begins in a client's example stream: each round
        continues through the local data (a deterministic function of the round, so a
        resumed run or a client that missed rounds reads the same examples)."""
        if server_round < 1:
            raise ValueError(f"rounds count from 1, got {server_round}")
        return (server_round - 1) * self.examples_per_round

    @property
    def iterative(self) -> tuple[float, ...]:
        """``iterative-sparsity`` as numbers (a RunConfigError names a bad entry)."""
        try:
            return tuple(float(x) for x in self.iterative_sparsity.split(",") if x.strip())
        except ValueError:
            raise RunConfigError(
                f"run config 'iterative-sparsity': {self.iterative_sparsity!r} is not a comma-separated list of "
                "numbers (e.g. '0.99')"
            ) from None

    def finetune_options(self, *, first_round: bool) -> dict[str, object]:
        if self.method == "lota":
            opts: dict[str, object] = {"sparsity": self.sparsity, "mask_mode": self.mask_mode, "seed": self.seed}
            if self.sparse_lr:
                opts["sparse_lr"] = self.sparse_lr
            if first_round:
                opts["calibration_steps"] = self.calibration_steps
                opts["iterative"] = self.iterative
            return opts
        if self.method == "lora":
            return {"rank": self.lora_rank, "alpha": 2 * self.lora_rank}
        return {}

    def resolved_device(self) -> str:
        """The device this process computes on (``fl_lota.training.device.resolve``: a GPU asked for
        and not usable here is a DeviceError naming why)."""
        return str(devices.resolve(self.device))

    def eval_bf16(self, device: torch.device | str | None = None) -> bool:
        """Whether evaluation on ``device`` (default: this process's) generates in bf16
        (``eval-precision``; "auto": ``fl_lota.training.device.generation_bf16``)."""
        return devices.generation_bf16(torch.device(device or self.resolved_device()), self.eval_precision, self.bf16)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)


KEYS: tuple[str, ...] = tuple(f.name.replace("_", "-") for f in fields(RunConfig))
