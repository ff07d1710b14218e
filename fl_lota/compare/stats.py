"""The comparison's numbers, before they become tables: per federation its final scores,
bytes per client and round (both directions, as counted on the Flower messages), budget
and seconds; per grid cell the mean +- sample standard deviation over seeds of each, and
``normalized`` = merged score / the same method's single-task score (same seed and budget,
no merging), per task, averaged over tasks, then over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence

from fl_lota.federated.report import client_bytes

__all__ = [
    "federation_stats",
    "final_scores",
    "grid_edges",
    "mean_std",
    "normalized",
    "score_bytes_curves",
    "summarize",
]


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n); std is nan for fewer than two values."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return statistics.fmean(vals), sd, len(vals)


def grid_edges(rows: Sequence[Mapping], chosen: Mapping[str, object]) -> dict[str, str]:
    """The chosen values that sit at an end of the values tried, as ``key -> "smallest"``
    or ``"largest"``: a value past that end might score higher, so the table says so.
    Only a numeric key with three or more values tried can say it (of two, the chosen one
    is always at an end), and not when a candidate tied with the chosen one holds that
    key inside the grid (the tie, not the grid, put the choice at the end)."""
    best = [r for r in rows if r["setting"] == chosen]
    top = best[0]["mean"] if best else None
    out = {}
    for key, value in chosen.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        tried = sorted({v for r in rows if isinstance(v := r["setting"].get(key), int | float)})
        if len(tried) < 3 or value not in (tried[0], tried[-1]):
            continue
        if any(r["mean"] == top and r["setting"].get(key) not in (tried[0], tried[-1]) for r in rows):
            continue
        out[key] = "smallest" if value == tried[0] else "largest"
    return out


def final_scores(rows: Sequence[dict], rounds: int, tasks: Sequence[str]) -> tuple[dict[str, float], str | None]:
    """The run's own merge's per-task scores after its last round, or ({}, why not) when
    the run did not reach round ``rounds`` or a task's score is missing (a client that
    failed to evaluate): such a seed is left out of the means, never averaged in part."""
    if not rows or rows[-1].get("round") != rounds:
        return {}, f"ended after round {rows[-1].get('round') if rows else 0} of {rounds}"
    scores = rows[-1].get("scores", {}).get(rows[-1].get("merge"), {})
    missing = [t for t in tasks if t not in scores]
    if missing:
        return {}, f"no score for {', '.join(missing)} in round {rounds}"
    return scores, None


def normalized(merged: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Per task merged / reference, and their ``mean``; a task whose reference is 0 is left
    out (and named by the table)."""
    out = {t: v / reference[t] for t, v in merged.items() if reference.get(t, 0) > 0}
    if out:
        out["mean"] = sum(out.values()) / len(out)
    return out


def federation_stats(rows: Sequence[dict]) -> dict:
    """Per client and round: uplink (reply message), downlink (training instruction) and eval
    downlink (evaluation instruction) bytes; forward/backward passes and training seconds."""
    per_round = []
    for r in rows:
        per_round.append(
            {
                "round": r["round"],
                "clients": [
                    {
                        "client": c["client"],
                        "uplink": c["message_bytes"],
                        "downlink": c["downlink_bytes"],
                        "fb_passes": c.get("fb_passes", 0),
                        "train_seconds": c.get("train_seconds", 0.0),
                    }
                    for c in sorted(r.get("clients", []), key=lambda c: c["partition"])
                ],
                "eval": {c["client"]: c["downlink_bytes"] for c in r.get("eval_clients", [])},
            }
        )
    return {"rounds": per_round}


def _per_client(stats: dict, key: str, rounds: Iterable[int]) -> list[float]:
    want = set(rounds)
    return [c[key] for r in stats["rounds"] if r["round"] in want for c in r["clients"]]


def _client_totals(stats: dict, key: str) -> list[float]:
    """Per client, ``key`` summed over the run's rounds."""
    totals: dict[str, float] = {}
    for r in stats["rounds"]:
        for c in r["clients"]:
            totals[c["client"]] = totals.get(c["client"], 0) + c[key]
    return list(totals.values())


def _eval_down(stats: dict) -> list[float]:
    return [b for r in stats["rounds"] for b in r["eval"].values()]


def summarize(results: Mapping) -> dict:
    """The figures the tables show, per (method, merge): lists over seeds."""
    setup = results["setup"]
    rounds, tasks = setup["rounds"], setup["tasks"]
    refs = results.get("references", {})
    out = {}
    for run, by_seed in results.get("federations", {}).items():
        method, merge = run.split(":")
        e: dict = {"method": method, "merge": merge, "seeds": [], "scores": {}, "normalized": {}, "failed": []}
        e["why"] = {}
        ups1, ups2, downs2, evals, passes, secs = [], [], [], [], [], []
        for seed, fed in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
            scores, why = final_scores(fed.get("rows") or [], rounds, tasks)
            if why is not None:
                e["failed"].append(seed)
                e["why"][seed] = fed.get("error") or why
                continue
            e["seeds"].append(seed)
            e["settings"] = fed.get("settings", {})
            for t, v in scores.items():
                e["scores"].setdefault(t, []).append(v)
            e["scores"].setdefault("mean", []).append(sum(scores[t] for t in tasks) / len(tasks))
            ref = refs.get(method, {}).get(seed, {}).get("scores", {})
            for t, v in normalized(scores, ref).items():
                e["normalized"].setdefault(t, []).append(v)
            st = federation_stats(fed["rows"])
            ups1 += _per_client(st, "uplink", [1])
            ups2 += _per_client(st, "uplink", range(2, rounds + 1))
            downs2 += _per_client(st, "downlink", range(2, rounds + 1))
            evals += _eval_down(st)
            passes += _client_totals(st, "fb_passes")
            secs += _client_totals(st, "train_seconds")
        e |= {"uplink_r1": ups1, "uplink_later": ups2, "downlink_later": downs2, "eval_downlink": evals}
        e |= {"passes": passes, "train_seconds": secs}
        out[run] = e
    return out


def score_bytes_curves(results: Mapping) -> dict:
    """Per (method, merge): at each evaluated round, the task-average score of the global
    model (the run's merge; mean ± std over seeds) against the bytes one client sent and
    received up to then (both directions, evaluation included; the mean over clients, and
    its min and max). Round 0 is the base model at 0 bytes. Seeds that lack a task's score
    in a round are left out of that round's point."""
    setup = results["setup"]
    tasks = setup["tasks"]
    base = results.get("base", {})
    out: dict[str, dict] = {}
    for run, by_seed in results.get("federations", {}).items():
        per_round: dict[int, dict[str, list[float]]] = {}
        for fed in by_seed.values():
            rows = fed.get("rows") or []
            for r, by_client in zip(rows, client_bytes(rows), strict=True):
                scores = r.get("scores", {}).get(r.get("merge"), {})
                if not by_client or any(t not in scores for t in tasks):
                    continue
                totals = [c["total"] for c in by_client.values()]
                p = per_round.setdefault(r["round"], {"score": [], "bytes": [], "min": [], "max": []})
                p["score"].append(sum(scores[t] for t in tasks) / len(tasks))
                p["bytes"].append(sum(totals) / len(totals))
                p["min"].append(min(totals))
                p["max"].append(max(totals))
        points = []
        if base and all(t in base for t in tasks):
            b = sum(base[t] for t in tasks) / len(tasks)
            points.append({"round": 0, "bytes_per_client": 0, "min": 0, "max": 0, "score": b, "score_sd": 0.0, "n": 1})
        for rnd, p in sorted(per_round.items()):
            m, sd, n = mean_std(p["score"])
            points.append(
                {
                    "round": rnd,
                    "bytes_per_client": sum(p["bytes"]) / len(p["bytes"]),
                    "min": min(p["min"]),
                    "max": max(p["max"]),
                    "score": m,
                    "score_sd": 0.0 if math.isnan(sd) else sd,
                    "n": n,
                }
            )
        out[run] = {"points": points}
    return out
