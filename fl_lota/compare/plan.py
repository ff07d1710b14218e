"""The comparison's plan: the grid of methods and merges, the tuning candidates, the seeds,
the tasks, and the counts and time estimate printed before anything runs."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import statistics
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fl_lota.compare.isolated import validation_task
from fl_lota.federated.runconfig import KEYS, RunConfig, RunConfigError
from fl_lota.merging.merge import MERGE_METHODS
from fl_lota.tasks import Task, get_task, task_label
from fl_lota.training.methods import FINETUNE_METHODS

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_TUNE",
    "MERGE_KEYS",
    "RESERVED",
    "ComparePlan",
    "TuneSpec",
    "effective_config",
    "parse_grid",
    "probe_speed",
    "setting_slug",
    "slug",
]

DEFAULT_GRID = "lota:mask_aware,ties fft:fedavg,ties lora:fedavg"
# widened while bench/federation.py's comparison tuned (README): its first pass chose FFT's
# and LoRA's smallest rate, LoRA's largest rank and FFT+TIES's largest lambda, so each grid
# goes past that end (FFT's, TIES's and LoRA's rank twice: FFT's 1.25e-5, FFT+TIES's k=0.1,
# lambda=2.0 and LoRA's rank 32 won at the end again)
DEFAULT_TUNE = (
    "lota.sparse-lr=5e-5,1e-4,2e-4 fft.lr=6.25e-6,1.25e-5,2.5e-5,5e-5,1e-4 lora.lr=1e-4,2e-4,1e-3 "
    "lora.lora-rank=8,16,32,64 ties.ties-k=0.05,0.1,0.2,0.4 ties.merge-lam=0.8,1.0,1.4,2.0,3.0"
)
# per merge, the run-config keys that are its parameters (what a merge grid may name)
MERGE_KEYS = {"ties": ("ties-k", "merge-lam"), "task_arithmetic": ("merge-lam",), "mask_aware": ("merge-lam",)}
# what compare decides for every run, so a --set cannot name it
RESERVED = ("method", "merge", "eval-merges", "seed", "results-dir", "client-state-dir")
FEDERATION_OVERHEAD_S = 40.0  # Ray and SuperLink start-up, model loads: measured ~30-45 s on 2 CPU cores


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"lota:mask_aware,ties fft:fedavg"`` -> [("lota", ["mask_aware", "ties"]), ("fft", ["fedavg"])]."""
    out = []
    for part in text.split():
        method, sep, merges = part.partition(":")
        names = [m for m in merges.split(",") if m]
        if not sep or not names:
            raise ValueError(f"bad grid entry {part!r}; expected method:merge[,merge...]")
        if method not in FINETUNE_METHODS:
            raise ValueError(f"unknown fine-tuning method {method!r} in grid; known: {sorted(FINETUNE_METHODS)}")
        bad = [m for m in names if m not in MERGE_METHODS]
        if bad:
            raise ValueError(f"unknown merge method(s) {bad} in grid; known: {sorted(MERGE_METHODS)}")
        if any(m == method for m, _ in out):
            raise ValueError(f"method {method!r} appears twice in the grid; list its merges once: {method}:a,b")
        out.append((method, list(dict.fromkeys(names))))
    if not out:
        raise ValueError("empty grid")
    return out


def _value(raw: str) -> object:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


@dataclass(frozen=True)
class TuneSpec:
    """Candidate values per method (``lota.sparse-lr=5e-5,1e-4``) and per merge
    (``ties.ties-k=0.1,0.2``); a method's candidates are the product of its keys' values."""

    methods: Mapping[str, Mapping[str, tuple]] = field(default_factory=dict)
    merges: Mapping[str, Mapping[str, tuple]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> TuneSpec:
        methods: dict[str, dict[str, tuple]] = {}
        merges: dict[str, dict[str, tuple]] = {}
        for part in text.split():
            scope, dot, rest = part.partition(".")
            key, eq, values = rest.partition("=")
            if not dot or not eq or not values:
                raise ValueError(f"bad tuning entry {part!r}; expected method.key=v1,v2 (e.g. fft.lr=5e-5,1e-4)")
            if key not in KEYS:
                raise RunConfigError(f"tuning entry {part!r}: unknown run config key {key!r}")
            if key in RESERVED:
                raise ValueError(f"tuning entry {part!r}: {key!r} is set by compare itself")
            vals = tuple(dict.fromkeys(_value(v) for v in values.split(",") if v))
            if scope in FINETUNE_METHODS:
                methods.setdefault(scope, {})[key] = vals
            elif scope in MERGE_KEYS:
                if key not in MERGE_KEYS[scope]:
                    raise ValueError(f"tuning entry {part!r}: {scope} takes {', '.join(MERGE_KEYS[scope])}")
                merges.setdefault(scope, {})[key] = vals
            else:
                raise ValueError(
                    f"tuning entry {part!r}: {scope!r} is neither a method ({sorted(FINETUNE_METHODS)}) nor a "
                    f"tunable merge ({sorted(MERGE_KEYS)})"
                )
        return cls(methods, merges)

    @staticmethod
    def _product(grid: Mapping[str, tuple]) -> list[dict[str, object]]:
        keys = list(grid)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))] or [{}]

    def candidates(self, method: str) -> list[dict[str, object]]:
        return self._product(self.methods.get(method, {}))

    def merge_candidates(self, merge: str) -> list[dict[str, object]]:
        return self._product(self.merges.get(merge, {}))


def effective_config(app: Path, conf: str | None, sets: Mapping[str, object]) -> dict[str, object]:
    """The run config the apps will see (the app's defaults, then ``conf``, then ``sets``),
    as dashed keys; checked (RunConfigError names a bad key)."""
    pyproject = Path(app) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"no Flower app at {app} (expected {pyproject})")
    base = dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])
    if conf:
        if not Path(conf).is_file():
            raise FileNotFoundError(f"run config file not found: {conf}")
        base |= tomllib.loads(Path(conf).read_text())
    base |= dict(sets)
    RunConfig.from_run_config(base)
    return base


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)[:80]


def setting_slug(setting: Mapping[str, object]) -> str:
    """A folder name for a candidate: readable, and unique (a digest of the full setting)."""
    text = ",".join(f"{k}={v}" for k, v in setting.items()) or "configured"
    digest = hashlib.blake2b(json.dumps(setting, sort_keys=True).encode(), digest_size=4).hexdigest()
    return f"{slug(text)[:60]}-{digest}"


@dataclass
class ComparePlan:
    app: Path
    base: dict[str, object]  # dashed run config shared by every run
    grid: list[tuple[str, list[str]]]
    seeds: list[int]
    tune: TuneSpec | None
    val_size: int = 64
    federation_config: dict[str, object] = field(default_factory=dict)
    flwr_home: str | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("give at least one seed")
        self.cfg = RunConfig.from_run_config(self.base)
        spec = self.cfg.spec
        self.tasks: list[Task] = []
        seen: set[str] = set()
        for t in spec.tasks:  # one reference per distinct task; index = the client it belongs to
            if task_label(t) in seen:
                continue
            seen.add(task_label(t))
            self.tasks.append(get_task(t, n_train=self.cfg.n_train, n_test=self.cfg.n_test, seed=self.cfg.data_seed))
        self.partitions = [spec.tasks.index(t) for t in dict.fromkeys(spec.tasks)]
        # one task per client: a reference reads its client's example stream; in a mixed
        # federation no client holds a whole task, so references train on the task's data
        self.mixed = spec.alpha is not None

    # ---- run configs ----------------------------------------------------------------

    @property
    def methods(self) -> list[str]:
        return [m for m, _ in self.grid]

    def config(self, overrides: Mapping[str, object]) -> RunConfig:
        return RunConfig.from_run_config(self.base | dict(overrides))

    def val_tasks(self) -> list[Task]:
        return [validation_task(t, self.val_size, self.cfg.data_seed) for t in self.tasks]

    # ---- the plan, printed before anything starts ---------------------------------------

    def counts(self) -> dict[str, int]:
        cfg, n = self.cfg, len(self.tasks)
        per_run = cfg.num_server_rounds * cfg.local_steps  # forward/backward batches per client
        candidates = sum(len(self.tune.candidates(m)) for m in self.methods) if self.tune else 0
        tune_runs = candidates * n
        merge_evals = 0
        if self.tune:
            merge_evals = sum(
                len(self.tune.merge_candidates(g)) for _, gs in self.grid for g in gs if g in self.tune.merges
            )
        fed_runs = len(self.seeds) * sum(len(gs) for _, gs in self.grid)
        clients = cfg.spec.num_clients
        rounds = range(1, cfg.num_server_rounds + 1)
        eval_rounds = sum(1 for r in rounds if r % cfg.eval_every == 0 or r == cfg.num_server_rounds)
        val_items = sum(len(t.test) for t in self.val_tasks()) if self.tune else 0
        test_items = sum(len(t.test) for t in self.tasks)
        return {
            "tune_runs": tune_runs,
            "merge_candidates": merge_evals,
            "reference_runs": len(self.seeds) * len(self.methods) * n,
            "federations": fed_runs,
            "passes_per_client_run": per_run,
            "passes": (tune_runs + len(self.seeds) * len(self.methods) * n) * per_run + fed_runs * clients * per_run,
            "eval_items": (candidates + merge_evals) * val_items
            + (len(self.seeds) * len(self.methods) + 1) * test_items
            + fed_runs * eval_rounds * test_items,
        }

    def describe(self, probe: Mapping[str, float] | None = None) -> str:
        cfg, c = self.cfg, self.counts()
        lines = [
            f"fl-lota compare: model {cfg.model!r}, federation {cfg.federation!r} "
            f"({cfg.spec.num_clients} clients), {cfg.num_server_rounds} rounds, seeds {self.seeds}",
            f"  budget: {cfg.local_steps} optimizer steps x batch {cfg.batch_size} = {cfg.examples_per_round} examples "
            f"(forward+backward passes) per client and round, every method; LoTA's {cfg.calibration_steps} "
            "calibration steps are part of its first round",
        ]
        if self.tune:
            for m in self.methods:
                grid = self.tune.methods.get(m, {})
                desc = " x ".join(f"{k} {list(v)}" for k, v in grid.items()) or "configured values only"
                lines.append(
                    f"  tuning {m}: {desc}: {len(self.tune.candidates(m))} x {len(self.tasks)} single-task runs"
                )
            for merge, grid in self.tune.merges.items():
                if any(merge in gs for _, gs in self.grid):
                    desc = " x ".join(f"{k} {list(v)}" for k, v in grid.items())
                    lines.append(f"  tuning {merge}: {desc}, one-shot merges of the tuned single-task updates")
            lines.append(
                f"  (validation: {len(self.val_tasks()[0].test)} examples held out of each task's training split, "
                f"seed {self.seeds[0]}; test splits are never used for tuning)"
            )
        else:
            lines.append("  no tuning: every method runs at the configured values")
        lines += [
            f"  single-task references: {len(self.methods)} methods x {len(self.seeds)} seeds x {len(self.tasks)} tasks"
            f" = {c['reference_runs']} runs",
            f"  federations: {', '.join(f'{m}+{g}' for m, gs in self.grid for g in gs)} x {len(self.seeds)} seeds"
            f" = {c['federations']} flwr runs",
            f"  training: {c['passes']:,} forward/backward batches of {cfg.batch_size}; evaluation: "
            f"{c['eval_items']:,} generations",
        ]
        if probe:
            est = self.estimate(probe)
            lines.append(
                f"  estimated time: {est / 3600:.1f} h on this machine (measured: {probe['step_s']:.2f} s per "
                f"training step, {probe['item_s']:.2f} s per generated answer; runs already finished are reused)"
            )
        return "\n".join(lines)

    def estimate(self, probe: Mapping[str, float]) -> float:
        c = self.counts()
        isolated = c["tune_runs"] + c["reference_runs"]
        return (
            c["passes"] * probe["step_s"]
            + c["eval_items"] * probe["item_s"]
            + c["federations"] * FEDERATION_OVERHEAD_S
            + isolated * 2.0
        )


def probe_speed(plan: ComparePlan, steps: int = 3, items: int = 64) -> dict[str, float]:
    """Seconds per training step and per generated answer of this model on this machine:
    a few FFT steps on the first task, one evaluation batch per task (the base weights are
    put back afterwards)."""
    from fl_lota.federated.node import load_base
    from fl_lota.tasks.evaluate import evaluate
    from fl_lota.tasks.prompting import to_examples
    from fl_lota.training.data import DataStream
    from fl_lota.training.lota import scope_params
    from fl_lota.training.train import train

    cfg = plan.cfg
    model, tok, base = load_base(cfg.model, cfg.resolved_device())
    examples = to_examples(tok, plan.tasks[0].train)
    stream = DataStream(examples, cfg.batch_size, pad_id=tok.pad_token_id, max_len=cfg.max_len)
    try:
        stats = train(model, scope_params(model), stream, cfg.train_config(), steps=steps, progress=False)
        t0 = time.perf_counter()
        n = 0
        for t in plan.tasks:
            sample = t.test[:items]
            evaluate(
                model, tok, t, samples=sample, progress=False, batch_size=cfg.eval_batch_size, bf16=cfg.eval_bf16()
            )
            n += len(sample)
        item_s = (time.perf_counter() - t0) / max(n, 1)
    finally:
        model.load_state_dict(base)
    step_s = statistics.median(stats.step_seconds[1:] or stats.step_seconds)
    return {"step_s": step_s, "item_s": item_s}
