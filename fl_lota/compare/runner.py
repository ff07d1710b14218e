"""Running a ComparePlan: the base model, tuning, single-task references, federations.

Each finished unit is a JSON file (with the settings that made it) in the output folder;
running again with the same folder reuses it. A federation stopped part-way resumes from its
server checkpoint, with its clients' masks kept under its folder (``client-state-dir``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fl_lota.compare.isolated import isolated_unit, score_merge, score_models
from fl_lota.compare.plan import RESERVED, ComparePlan, probe_speed, setting_slug, slug
from fl_lota.compare.store import (
    aside,
    cached,
    completed,
    digest,
    settings,
    store,
    stored,
    task_fingerprint,
    unit_key,
    write_json,
)
from fl_lota.compare.table import setting_text, tuned_line, write_comparison
from fl_lota.federated.launch import RunFailed, launch, stop_run
from fl_lota.federated.report import read_rows
from fl_lota.federated.runconfig import RESUME_MAY_CHANGE, RunConfig
from fl_lota.tasks import Task
from fl_lota.training import device as devices
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["Comparison", "run_compare"]


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
        from fl_lota.federated.node import LocalNode
        from fl_lota.tasks.partition import ClientData

        p = self.plan

        def compute() -> dict:
            node = LocalNode(p.cfg, 0, ClientData(0, list(p.tasks[0].train), list(p.tasks)))
            scores = score_models(node, {"base": codec.encode(SparseTaskVector())})["base"]
            return {"scores": scores, "machine": devices.machine(node.device)}

        # the evaluation settings are part of the key: bf16 generation and the batch change scores
        key = {
            "model": p.cfg.model,
            "tasks": [task_fingerprint(t) for t in p.tasks],
            "eval_precision": p.cfg.identity()["eval_precision"],
            "eval_batch_size": p.cfg.eval_batch_size,
        }
        res, reused = cached(self.out / "base.json", key, compute)
        self._ran_on(res)
        self._say(
            f"base model {'(stored) ' if reused else ''}{' '.join(f'{t}={v:.3f}' for t, v in res['scores'].items())}"
        )
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
                        f"tune {method} {setting_text(cand, 'configured values')} {task.name}: validation "
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
            self._say(tuned_line(method, entry))
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
        res = cached(path, unit_key(cfg, task, part), lambda: isolated_unit(cfg, part, task, vector_path=vector))
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
            if digest(payload) == unit.result.get("update_digest", digest(payload)):
                return payload
        self._say(f"{unit.path}: its update is missing or altered; training that run again")
        unit.result = isolated_unit(unit.cfg, unit.part, unit.task, vector_path=vector)
        store(unit.path, unit_key(unit.cfg, unit.task, unit.part), unit.result)
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
            return [digest(u) for u in loaded] if loaded else [u.result["update_digest"] for u in units]

        rows: list[dict] = []
        for cand in cands:
            cfg = p.config(setting | cand | {"method": method, "seed": units[0].cfg.seed, "merge": merge})
            path = self.out / "tune" / method / f"merge-{merge}-{setting_slug(cand)}.json"

            def key(d: list[str], c=cfg) -> dict:
                return {"config": c.identity(), "tasks": [task_fingerprint(t) for t in val], "updates": d}

            t0 = time.perf_counter()
            res = None if rescore else stored(path, key(digests()))
            reused = res is not None
            if res is None:
                if not loaded:
                    before = [u.result.get("update_digest") for u in units]
                    loaded[:] = [self._update(u) for u in units]
                    if [digest(u) for u in loaded] != before and rows:
                        # training again gave other updates: the scores already read were
                        # made from the old ones, so every candidate is scored anew
                        self._say(f"tune {method}+{merge}: the retrained updates differ; scoring every candidate anew")
                        return self._tune_merge(method, merge, setting, cands, units, rescore=True)
                setting_of = {"m": {"merge": merge, **cfg.merge_params(merge)}}
                res = {"scores": score_merge(cfg, loaded, weights, val, setting_of)["m"]}
                store(path, key(digests()), res)
            rows.append({"setting": cand, "val": res["scores"], "mean": _mean(res["scores"].values())})
            took = " (stored)" if reused else f" ({time.perf_counter() - t0:.0f} s)"
            label = setting_text(cand, "configured values")
            self._say(f"tune {method}+{merge} {label}: validation mean {rows[-1]['mean']:.3f}{took}")
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
        unit = {"config": settings(cfg), "tasks": [task_fingerprint(t) for t in p.tasks]}
        done, marker = folder / "launch.json", folder / "unit.json"
        if folder.exists():
            before = json.loads(marker.read_text()) if marker.is_file() else {}
            if isinstance(before.get("config"), dict):
                before["config"] = completed(before["config"], unit["config"])
            if before.get("run_id") and not done.is_file():  # a driver killed hard: stop its run first
                stop_run(before["run_id"], p.flwr_home)
            rows = read_rows(folder / "metrics.jsonl") if (folder / "metrics.jsonl").is_file() else []
            resumable = {k: v for k, v in unit["config"].items() if k not in RESUME_MAY_CHANGE}
            same = (
                before.get("tasks") == unit["tasks"]
                and {k: v for k, v in before.get("config", {}).items() if k not in RESUME_MAY_CHANGE} == resumable
                and all(r["round"] <= cfg.num_server_rounds for r in rows)
            )
            info = json.loads(done.read_text()) if done.is_file() else {}
            if same and before.get("config") == unit["config"] and info.get("status") == "finished:completed":
                self._say(f"{label}: stored run reused ({folder})")
                self._ran_on(info)
                return rows, info["seconds"]
            if not same or not (folder / "checkpoint").is_dir():
                if rows or not same:
                    moved = aside(folder)
                    self._say(f"{label}: {folder} was made with other settings, data or rounds; moved to {moved}")
                else:
                    shutil.rmtree(folder)  # stopped before any round completed: nothing in it
            else:
                done.unlink(missing_ok=True)
                self._say(f"{label}: resuming from its checkpoint")
        write_json(marker, unit)
        self._say(f"{label}: flwr run -> {folder}")
        outcome = launch(
            p.app,
            run_config=p.base | sets,
            federation_config=p.federation_config,
            flwr_home=p.flwr_home,
            on_start=lambda run_id: write_json(marker, unit | {"run_id": run_id}),
        )
        # the machine of this driver; in simulation the clients run on it too
        info = {"run_id": outcome.run_id, "status": outcome.status, "seconds": outcome.seconds}
        info["machine"] = devices.machine(devices.resolve(cfg.device))
        write_json(done, info)
        self._ran_on(info)
        return read_rows(folder / "metrics.jsonl"), outcome.seconds


def _tuned_part(sets: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in sets.items() if k not in RESERVED and k not in ("eval-base", "eval-local")}


def _took(res: Mapping, reused: bool) -> str:
    return " (stored)" if reused else f" ({res['train_seconds'] + res['eval_seconds']:.0f} s)"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


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
