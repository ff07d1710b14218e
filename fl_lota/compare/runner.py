"""Running a ComparePlan: the base model, tuning, single-task references, federations.

Each finished unit is a JSON file (with the settings that made it) in the output folder;
running again with the same folder reuses it. A federation stopped part-way resumes from its
server checkpoint, with its clients' masks kept under its folder (``client-state-dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import codec
from .. import device as devices
from ..isolated import isolated_run, score_merge, score_models
from ..launch import RunFailed, launch, stop_run
from ..report import read_rows
from ..runconfig import RESUME_MAY_CHANGE, RunConfig
from ..task_vector import SparseTaskVector
from ..tasks import Task
from .plan import RESERVED, ComparePlan, probe_speed, setting_slug, slug
from .table import write_comparison

__all__ = ["Comparison", "run_compare"]


# ---- the stored units ------------------------------------------------------------------


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _completed(stored: Mapping[str, object], current: Mapping[str, object]) -> dict[str, object]:
    """A stored run config with the keys RunConfig gained since filled in at their
    defaults (``RunConfig.completed``), restricted to the keys either side holds."""
    filled = RunConfig.completed(stored)
    return {k: v for k, v in filled.items() if k in current or k in stored}


def _same_key(stored: object, key: Mapping[str, object]) -> bool:
    if not isinstance(stored, dict):
        return False
    if isinstance(stored.get("config"), dict) and "config" in key:
        stored = stored | {"config": _completed(stored["config"], key["config"])}
    return stored == key


def _stored(path: Path, key: Mapping[str, object]) -> dict | None:
    """The result stored at ``path`` if it was made with ``key`` (settings that RunConfig
    gained since count at their defaults), else None."""
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if _same_key(stored.get("key"), _plain(key)):
            return stored["result"]
    return None


def _cached(path: Path, key: Mapping[str, object], compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The stored result at ``path`` if it was made with ``key``, else ``compute()``
    (stored with its key). Returns (result, reused)."""
    stored = _stored(path, key)
    if stored is not None:
        return stored, True
    result = compute()
    _store(path, key, result)
    return result, False


def _plain(key: Mapping[str, object]) -> dict:
    """``key`` as it reads back from JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(key, sort_keys=True))


def _store(path: Path, key: Mapping[str, object], result: dict) -> None:
    _write_json(path, {"key": _plain(key), "result": result})


def _unit_key(cfg: RunConfig, task: Task, part: int) -> dict:
    """What makes a single-task run: its settings, its data and its partition."""
    return {"config": cfg.identity(), "task": task_fingerprint(task), "partition": part}


def _digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def task_fingerprint(task: Task) -> str:
    """The task's name and a digest of its train and test items: a stored unit is reused
    only for the very data it was made with."""
    h = hashlib.blake2b(digest_size=16)
    for split in (task.train, task.test):
        for s in split:
            h.update(json.dumps([s.prompt, s.answer], ensure_ascii=False).encode())
        h.update(b"\x00")
    return f"{task.name}:{h.hexdigest()}"


def _isolated_unit(cfg: RunConfig, partition: int, task: Task, *, vector_path: Path | None = None) -> dict:
    res = isolated_run(cfg, partition, task)
    if vector_path is not None:
        vector_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = vector_path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_bytes(res.payload)
        os.replace(tmp, vector_path)
    return {
        "scores": res.scores,
        "passes": res.passes,
        "examples": res.examples,
        "train_seconds": res.train_seconds,
        "eval_seconds": res.eval_seconds,
        "update_bytes": len(res.payload),
        "update_digest": _digest(res.payload),
        "machine": devices.machine(devices.resolve(cfg.device)),
    }


@dataclass
class _Unit:
    """A stored single-task tuning run: its record's path, settings and result."""

    path: Path
    cfg: RunConfig
    part: int
    task: Task
    result: dict


class Comparison:
    """Runs a ``ComparePlan`` into ``out``; every step reuses what is already there."""

    def __init__(self, plan: ComparePlan, out: Path, log: Callable[[str], None] = print) -> None:
        self.plan, self.out, self.log = plan, Path(out), log
        self.results: dict = {
            "setup": self.setup(),
            "tuning": {},
            "base": {},
            "references": {},
            "federations": {},
        }

    def setup(self) -> dict:
        p, cfg = self.plan, self.plan.cfg
        return {
            "model": cfg.model,
            "federation": cfg.federation,
            "clients": cfg.spec.num_clients,
            "tasks": [t.name for t in p.tasks],
            "metrics": {t.name: t.metric for t in p.tasks},
            "n_test": {t.name: len(t.test) for t in p.tasks},
            "n_train": {t.name: len(t.train) for t in p.tasks},
            "rounds": cfg.num_server_rounds,
            "local_steps": cfg.local_steps,
            "calibration_steps": cfg.calibration_steps,
            "batch_size": cfg.batch_size,
            "examples_per_round": cfg.examples_per_round,
            "seeds": p.seeds,
            "val_size": p.val_size if p.tune else None,
            "tuned": bool(p.tune),
            "mixed": p.mixed,
            "grid": [[m, gs] for m, gs in p.grid],
            "base_config": p.base,
        }

    def _say(self, text: str) -> None:
        self.log(f"fl-lota compare: {text}")

    # ---- 0. the base model ------------------------------------------------------------

    def base_scores(self) -> dict[str, float]:
        from ..fedclient import LocalNode
        from ..partition import ClientData

        p = self.plan

        def compute() -> dict:
            node = LocalNode(p.cfg, 0, ClientData(0, list(p.tasks[0].train), list(p.tasks)))
            scores = score_models(node, {"base": codec.encode(SparseTaskVector())})["base"]
            return {"scores": scores, "machine": devices.machine(node.device)}

        # the evaluation settings are part of the key: bf16 autocast and the batch change scores
        key = {
            "model": p.cfg.model,
            "tasks": [task_fingerprint(t) for t in p.tasks],
            "bf16": p.cfg.bf16,
            "eval_batch_size": p.cfg.eval_batch_size,
        }
        res, reused = _cached(self.out / "base.json", key, compute)
        self._ran_on(res)
        self._say(f"base model {'(stored) ' if reused else ''}{_scores_text(res['scores'])}")
        self.results["base"] = res["scores"]
        return res["scores"]

    # ---- 1. tuning ----------------------------------------------------------------------

    def tune(self) -> dict[str, dict[str, object]]:
        """Chosen run-config values per method (and per method's merges: ``merges``)."""
        p = self.plan
        chosen: dict[str, dict[str, object]] = {m: {} for m in p.methods}
        merge_chosen: dict[tuple[str, str], dict[str, object]] = {}
        if not p.tune:
            self.results["tuning"] = {}
            return {"methods": chosen, "merges": merge_chosen}
        seed = p.seeds[0]
        val = p.val_tasks()
        for method, merges in p.grid:
            rows, units_of = [], {}
            for cand in p.tune.candidates(method):
                cfg = p.config(cand | {"method": method, "seed": seed})
                folder = self.out / "tune" / method / setting_slug(cand)
                scores, passes, units = {}, 0, []
                for part, task in zip(p.partitions, val, strict=True):
                    path = folder / f"{part}-{slug(task.name)}.json"
                    res, reused = self._single(path, cfg, part, task, keep=True)
                    units.append(_Unit(path, cfg, part, task, res))
                    scores |= res["scores"]
                    passes += res["passes"]
                    self._say(
                        f"tune {method} {_setting_text(cand)} {task.name}: validation "
                        f"{res['scores'].get(task.name, 0):.3f}{_took(res, reused)}"
                    )
                rows.append({"setting": cand, "val": scores, "mean": _mean(scores.values()), "passes": passes})
                units_of[setting_slug(cand)] = units
            best = self._best(rows, {"method": method})
            chosen[method] = dict(best["setting"])
            entry: dict = {"candidates": rows, "chosen": chosen[method], "merges": {}}
            for merge in merges:
                cands = p.tune.merge_candidates(merge)
                if merge not in p.tune.merges or cands == [{}]:
                    continue
                entry["merges"][merge] = self._tune_merge(
                    method, merge, best["setting"], cands, units_of[setting_slug(best["setting"])]
                )
                merge_chosen[(method, merge)] = entry["merges"][merge]["chosen"]
            self.results["tuning"][method] = entry
            self._say(f"tuned {method}: {_setting_text(chosen[method])}")
        return {"methods": chosen, "merges": merge_chosen}

    def _best(self, rows: list[dict], context: Mapping[str, object]) -> dict:
        """The candidate with the best validation mean. Among equals (64 items score in steps
        of 1/64, so ties happen), the configured value wins, else the first listed; every
        tied candidate is marked ``tied`` for the table."""
        top = max(r["mean"] for r in rows)
        tied = [r for r in rows if r["mean"] == top]
        for r in tied:
            r["tied"] = len(tied) > 1
        configured = self.plan.config(context)
        for r in tied:
            if self.plan.config(dict(context) | dict(r["setting"])) == configured:
                return r
        return tied[0]

    def _single(self, path: Path, cfg: RunConfig, part: int, task: Task, *, keep: bool) -> tuple[dict, bool]:
        """One single-task run (stored at ``path``); ``keep``: also store its update beside
        it (``.fltv``), which the merge tuning reads. A stored run is reused without its
        update: the merge tuning asks for the update only when it has a candidate to score."""
        vector = path.with_suffix(".fltv") if keep else None
        res = _cached(path, _unit_key(cfg, task, part), lambda: _isolated_unit(cfg, part, task, vector_path=vector))
        self._ran_on(res[0])
        return res

    def _ran_on(self, result: Mapping) -> None:
        """Count the machine a unit ran on (``setup.machines`` in the table)."""
        machines = self.results["setup"].setdefault("machines", {})
        where = str(result.get("machine", "not recorded (a unit stored before units recorded it)"))
        machines[where] = machines.get(where, 0) + 1

    def _update(self, unit: _Unit) -> bytes:
        """A tuning run's update, read from beside its record; a run whose update file is
        gone (or does not match its record) is trained again and its record rewritten."""
        vector = unit.path.with_suffix(".fltv")
        if vector.is_file():
            payload = vector.read_bytes()
            if _digest(payload) == unit.result.get("update_digest", _digest(payload)):
                return payload
        self._say(f"{unit.path}: its update is missing or altered; training that run again")
        unit.result = _isolated_unit(unit.cfg, unit.part, unit.task, vector_path=vector)
        _store(unit.path, _unit_key(unit.cfg, unit.task, unit.part), unit.result)
        return vector.read_bytes()

    def _tune_merge(self, method, merge, setting, cands, units: list[_Unit], rescore: bool = False) -> dict:
        """Each merge candidate scored on the validation tasks, merging the chosen setting's
        single-task updates. A stored score is reused when it was made from the same updates
        (by digest), so a folder carried without its ``.fltv`` files still resumes."""
        p = self.plan
        val = [u.task for u in units]
        weights = [float(len(t.train)) for t in val]
        # a record from before digests were stored has none: its update is read (once) for it
        loaded: list[bytes] = (
            [self._update(u) for u in units] if any(not u.result.get("update_digest") for u in units) else []
        )

        def digests() -> list[str]:
            return [_digest(u) for u in loaded] if loaded else [u.result["update_digest"] for u in units]

        rows: list[dict] = []
        for cand in cands:
            cfg = p.config(setting | cand | {"method": method, "seed": units[0].cfg.seed, "merge": merge})
            path = self.out / "tune" / method / f"merge-{merge}-{setting_slug(cand)}.json"

            def key(d: list[str], c=cfg) -> dict:
                return {"config": c.identity(), "tasks": [task_fingerprint(t) for t in val], "updates": d}

            t0 = time.perf_counter()
            res = None if rescore else _stored(path, key(digests()))
            reused = res is not None
            if res is None:
                if not loaded:
                    before = [u.result.get("update_digest") for u in units]
                    loaded[:] = [self._update(u) for u in units]
                    if [_digest(u) for u in loaded] != before and rows:
                        # training again gave other updates: the scores already read were
                        # made from the old ones, so every candidate is scored anew
                        self._say(f"tune {method}+{merge}: the retrained updates differ; scoring every candidate anew")
                        return self._tune_merge(method, merge, setting, cands, units, rescore=True)
                setting_of = {"m": {"merge": merge, **cfg.merge_params(merge)}}
                res = {"scores": score_merge(cfg, loaded, weights, val, setting_of)["m"]}
                _store(path, key(digests()), res)
            rows.append({"setting": cand, "val": res["scores"], "mean": _mean(res["scores"].values())})
            took = " (stored)" if reused else f" ({time.perf_counter() - t0:.0f} s)"
            self._say(f"tune {method}+{merge} {_setting_text(cand)}: validation mean {rows[-1]['mean']:.3f}{took}")
        best = self._best(rows, {"method": method, "merge": merge} | setting)
        return {"candidates": rows, "chosen": dict(best["setting"])}

    # ---- 2. single-task references --------------------------------------------------

    def references(self, chosen: Mapping[str, Mapping[str, object]]) -> None:
        p = self.plan
        for seed in p.seeds:
            for method in p.methods:
                cfg = p.config(dict(chosen[method]) | {"method": method, "seed": seed})
                out: dict = {"scores": {}, "passes": {}, "train_seconds": {}}
                folder = self.out / "reference" / f"seed{seed}" / method
                for part, task in zip(p.partitions, p.tasks, strict=True):
                    res, reused = self._single(folder / f"{part}-{slug(task.name)}.json", cfg, part, task, keep=False)
                    out["scores"] |= res["scores"]
                    out["passes"][task.name] = res["passes"]
                    out["train_seconds"][task.name] = res["train_seconds"]
                    self._say(
                        f"single-task {method} seed {seed} {task.name}: test {res['scores'].get(task.name, 0):.3f}"
                        f"{_took(res, reused)}"
                    )
                self.results["references"].setdefault(method, {})[str(seed)] = out

    # ---- 3. federations ---------------------------------------------------------------

    def federations(self, chosen: Mapping[str, Mapping[str, object]], merge_chosen: Mapping) -> bool:
        p = self.plan
        ok = True
        for seed in p.seeds:
            for method, merges in p.grid:
                for merge in merges:
                    folder = self.out / "runs" / f"seed{seed}" / f"{method}-{merge}"
                    sets = (
                        dict(chosen[method])
                        | dict(merge_chosen.get((method, merge), {}))
                        | {
                            "method": method,
                            "merge": merge,
                            "eval-merges": "",
                            "seed": seed,
                            "results-dir": str(folder),
                            "client-state-dir": str(folder / "client-state"),
                            "eval-base": False,  # the base model is scored once, above
                            "eval-local": False,  # the single-task references replace local scores
                        }
                    )
                    label = f"{method}+{merge} seed {seed}"
                    try:
                        rows, wall = self._federation(folder, sets, label)
                    except (RunFailed, FileNotFoundError, ValueError) as e:
                        self._say(f"{label} failed: {e}")
                        rows, wall, ok = None, None, False
                    entry = {"rows": rows, "wall_seconds": wall, "settings": _tuned_part(sets)}
                    if rows is None:
                        entry["error"] = "the run did not complete (see its folder)"
                    self.results["federations"].setdefault(f"{method}:{merge}", {})[str(seed)] = entry
        return ok

    def _federation(self, folder: Path, sets: dict, label: str) -> tuple[list[dict], float]:
        """One federation in ``folder``: reused when it completed with these settings and
        data, resumed from its checkpoint when it stopped part-way; a folder made with other
        settings, other data or more rounds is moved aside (``<folder>.stale-N``), never
        reused or deleted."""
        p = self.plan
        cfg = p.config(sets)
        unit = {"config": _settings(cfg), "tasks": [task_fingerprint(t) for t in p.tasks]}
        done, marker = folder / "launch.json", folder / "unit.json"
        if folder.exists():
            stored = json.loads(marker.read_text()) if marker.is_file() else {}
            if isinstance(stored.get("config"), dict):
                stored["config"] = _completed(stored["config"], unit["config"])
            if stored.get("run_id") and not done.is_file():  # a driver killed hard: stop its run first
                stop_run(stored["run_id"], p.flwr_home)
            rows = read_rows(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
            resumable = {k: v for k, v in unit["config"].items() if k not in RESUME_MAY_CHANGE}
            same = (
                stored.get("tasks") == unit["tasks"]
                and {k: v for k, v in stored.get("config", {}).items() if k not in RESUME_MAY_CHANGE} == resumable
                and all(r["round"] <= cfg.num_server_rounds for r in rows)
            )
            info = json.loads(done.read_text()) if done.is_file() else {}
            if same and stored.get("config") == unit["config"] and info.get("status") == "finished:completed":
                self._say(f"{label}: stored run reused ({folder})")
                self._ran_on(info)
                return rows, info["seconds"]
            if not same or not (folder / "checkpoint").is_dir():
                if rows or not same:
                    aside = _aside(folder)
                    self._say(f"{label}: {folder} was made with other settings, data or rounds; moved to {aside}")
                else:
                    shutil.rmtree(folder)  # stopped before any round completed: nothing in it
            else:
                done.unlink(missing_ok=True)
                self._say(f"{label}: resuming from its checkpoint")
        _write_json(marker, unit)
        self._say(f"{label}: flwr run -> {folder}")
        outcome = launch(
            p.app,
            run_config=p.base | sets,
            federation_config=p.federation_config,
            flwr_home=p.flwr_home,
            on_start=lambda run_id: _write_json(marker, unit | {"run_id": run_id}),
        )
        # the machine of this driver; in simulation the clients run on it too
        info = {"run_id": outcome.run_id, "status": outcome.status, "seconds": outcome.seconds}
        info["machine"] = devices.machine(devices.resolve(cfg.device))
        _write_json(done, info)
        self._ran_on(info)
        return read_rows(folder / "metrics.jsonl"), outcome.seconds


def _settings(cfg: RunConfig) -> dict:
    """A federation's settings as stored: its folders left out, so a comparison folder that
    was moved still recognises its finished runs."""
    return {k: v for k, v in _plain(cfg.identity()).items() if k not in ("results_dir", "client_state_dir")}


def _aside(folder: Path) -> Path:
    n = 1
    while (aside := folder.with_name(f"{folder.name}.stale-{n}")).exists():
        n += 1
    folder.rename(aside)
    return aside


def _tuned_part(sets: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in sets.items() if k not in RESERVED and k not in ("eval-base", "eval-local")}


def _took(res: Mapping, reused: bool) -> str:
    return " (stored)" if reused else f" ({res['train_seconds'] + res['eval_seconds']:.0f} s)"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _scores_text(scores: Mapping[str, float]) -> str:
    return " ".join(f"{t}={v:.3f}" for t, v in scores.items())


def _setting_text(setting: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or "configured values"


def run_compare(plan: ComparePlan, out: Path, *, plan_only: bool = False, estimate: bool = True) -> int:
    """Print the plan, then tune, train the references, run the federations and write the
    table into ``out``. Returns 0 when every federation completed, else 1."""
    out = Path(out)
    probe = probe_speed(plan) if estimate else None
    print(plan.describe(probe), flush=True)
    if plan_only:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    print(f"fl-lota compare: results in {out} (run again with --out {out} to resume)", flush=True)
    t0 = time.perf_counter()
    cmp = Comparison(plan, out, log=lambda s: print(s, flush=True))
    cmp.base_scores()
    tuned = cmp.tune()
    cmp.references(tuned["methods"])
    ok = cmp.federations(tuned["methods"], tuned["merges"])
    cmp.results["setup"]["wall_seconds"] = time.perf_counter() - t0
    if probe:
        cmp.results["setup"]["probe"] = probe
    md = write_comparison(out, cmp.results)
    print(md.read_text(), flush=True)
    print(f"fl-lota compare: table {md}, plot {out / 'compare.png'}, data {out / 'compare.json'}", flush=True)
    if not ok:
        print("fl-lota compare: some federations failed; run again with the same --out to retry them", file=sys.stderr)
    return 0 if ok else 1
