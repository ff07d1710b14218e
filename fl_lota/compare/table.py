"""The comparison as people read it: compare.md, compare.json, compare.png, and
compare_score_vs_bytes.png (with its numbers in compare_score_vs_bytes.json).

Input: what ``fl_lota.compare.Comparison`` gathered (``results``), summarized by
``fl_lota.compare.stats``. Every score is a mean +- sample standard deviation over seeds.
Absolute scores come first; ``normalized`` is, per seed and task, the merged model's score
/ the same method's single-task model's score (same seed, same budget, no merging),
averaged over tasks, then over seeds. Bytes are those counted on the Flower messages, per
client and round, in both directions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fl_lota.compare.stats import federation_stats, grid_edges, mean_std, score_bytes_curves, summarize

__all__ = ["edge_notes", "setting_text", "tables", "tuned_line", "write_comparison"]

MB = 1e6


def _ms(values: Iterable[float], digits: int = 3, expected: int | None = None) -> str:
    """``mean ± std``; ``(n=k)`` added when fewer values than ``expected`` went in."""
    m, sd, n = mean_std(values)
    if n == 0:
        return "-"
    text = f"{m:.{digits}f}" if n == 1 or math.isnan(sd) else f"{m:.{digits}f} ± {sd:.{digits}f}"
    return text + (f" (n={n})" if expected is not None and n < expected else "")


def _mb_cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    lo, hi = min(values) / MB, max(values) / MB
    mean = sum(values) / len(values) / MB
    return f"{mean:.2f}" if hi - lo < 0.005 else f"{mean:.2f} ({lo:.2f}-{hi:.2f})"


def setting_text(setting: Mapping[str, object], empty: str = "configured") -> str:
    """``k=v, ...`` of a tuned setting; ``empty`` when nothing was tuned."""
    return ", ".join(f"{k}={v}" for k, v in setting.items()) or empty


def edge_notes(method: str, entry: Mapping) -> list[str]:
    """``method``'s tuned values (its own and its merges') that are the smallest or largest
    of those tried, e.g. ``fft lr=2.5e-05 (the smallest tried)``."""
    parts = [(method, entry)] + [(f"{method}+{m}", e) for m, e in entry.get("merges", {}).items()]
    return [
        f"{who} {key}={e['chosen'][key]} (the {end} tried)"
        for who, e in parts
        for key, end in grid_edges(e.get("candidates", []), e.get("chosen", {})).items()
    ]


def tuned_line(method: str, entry: Mapping) -> str:
    """What the tuning chose for ``method`` (its ``results["tuning"]`` entry) and for its
    merges, for the log, with the choices at the edge of their grids."""
    text = f"tuned {method}: {setting_text(entry.get('chosen', {}), 'configured values')}"
    for merge, e in entry.get("merges", {}).items():
        text += f"; {method}+{merge}: {setting_text(e.get('chosen', {}))}"
    edges = "; ".join(edge_notes(method, entry))
    return text + (f" (at the edge of a grid: {edges})" if edges else "")


def tables(results: Mapping) -> str:
    setup = results["setup"]
    tasks = setup["tasks"]
    seeds = setup["seeds"]
    base = results.get("base", {})
    refs = results.get("references", {})
    tuning = results.get("tuning", {})
    summary = summarize(results)
    n_seeds = len(seeds)
    lines = [
        "# fl-lota: fine-tuning method x merge method",
        "",
        f"Model `{setup['model']}`, federation `{setup['federation']}` ({setup['clients']} clients), "
        f"{setup['rounds']} rounds, seeds {seeds} (mean ± sample std over {n_seeds} seeds; seeds vary the data "
        "order and mask/LoRA initialisation). Test items per task: "
        + ", ".join(f"{t} {setup['n_test'][t]}" for t in tasks)
        + ".",
        "",
        f"**Budget**: every method trains {setup['local_steps']} optimizer steps x batch {setup['batch_size']} = "
        f"{setup['examples_per_round']} examples (one forward and backward pass each) per client and round; LoTA's "
        f"{setup['calibration_steps']} calibration steps are part of its first round's "
        f"{setup['local_steps']}. Single-task references get the same {setup['rounds']} x {setup['local_steps']} "
        + (
            "steps on each task's whole training split (this federation mixes tasks over clients, so no client "
            "holds a task alone). "
            if setup.get("mixed")
            else "steps on the same example stream as the task's client. "
        )
        + "`fb passes` counts the batches each model went through forward and backward (calibration included); "
        "`train s` the seconds.",
        "",
    ]
    machines = setup.get("machines") or {}
    if machines:
        lines += [
            "**Machines** (units and federations that ran on each; bf16 numerics differ between CPUs with and "
            "without bf16 instructions, and between CPU and GPU"
            + (", so this table mixes them" if len(machines) > 1 else "")
            + "): "
            + "; ".join(f"{m}: {n}" for m, n in sorted(machines.items()))
            + ".",
            "",
        ]
    if setup.get("tuned"):
        lines += [
            f"**Tuning** (seed {seeds[0]}): each method's values were chosen by the task-average score on a "
            f"validation split of {setup['val_size']} examples held out of each task's training split (never the "
            "test split); TIES's k and lambda by the validation score of a one-shot merge of the tuned single-task "
            "models. Chosen values are in the tables; every candidate is listed at the end.",
            "",
        ]
        edges = [n for method, entry in tuning.items() for n in edge_notes(method, entry)]
        if edges:
            lines += [
                f"**Chosen at the edge of the grid** (a value past it might score higher): {'; '.join(edges)}.",
                "",
            ]
    else:
        lines += ["**No tuning**: every method ran at the configured values.", ""]

    # single-task references
    lines += [
        "## Single-task models (each task trained alone from the base, same budget, no merging)",
        "",
        "| method | values | " + " | ".join(tasks) + " | mean | fb passes (whole run) | train s (whole run) |",
        "|" + "---|" * (len(tasks) + 5),
    ]
    if base:
        cells = [base.get(t) for t in tasks]
        mean = sum(base.values()) / len(base)
        lines.append(
            "| base model | - | " + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + f" | {mean:.3f} | | |"
        )
    for method, by_seed in refs.items():
        per_task = {t: [by_seed[s]["scores"].get(t) for s in by_seed] for t in tasks}
        means = [sum(by_seed[s]["scores"].values()) / max(len(by_seed[s]["scores"]), 1) for s in by_seed]
        passes = [p for s in by_seed for p in by_seed[s]["passes"].values()]
        secs = [x for s in by_seed for x in by_seed[s]["train_seconds"].values()]
        chosen = tuning.get(method, {}).get("chosen", {})
        lines.append(
            f"| {method} | {setting_text(chosen)} | "
            + " | ".join(_ms(per_task[t], expected=n_seeds) for t in tasks)
            + f" | {_ms(means, expected=n_seeds)} | {_ms(passes, 0)} | {_ms(secs, 0)} |"
        )
    ceiling = [
        t for t in tasks if refs and all(min(by[s]["scores"].get(t, 0) for s in by) >= 1.0 for by in refs.values())
    ]
    if ceiling:
        lines += ["", f"**At the ceiling** (every method's single-task model scores 1.000): {', '.join(ceiling)}."]

    # merged models
    lines += [
        "",
        "## Merged models (each method x merge is its own federation, that merge in every round)",
        "",
        "Absolute scores of the global model after the last round on each client's test split; `normalized` = "
        "merged / the same method's single-task model, per seed and task, averaged over tasks. Bytes are MB per "
        "client (mean; range over clients and seeds in brackets when they differ): uplink = the client's reply, "
        "downlink = the training instruction (carrying G), eval = the evaluation instruction.",
        "",
        "| method | merge | values | "
        + " | ".join(tasks)
        + " | mean | normalized | fb passes / client (whole run) | train s / client (whole run) "
        "| uplink r1 | uplink r2+ | downlink r2+ | eval downlink / eval round |",
        "|" + "---|" * (len(tasks) + 11),
    ]
    for e in summary.values():
        if not e["seeds"]:
            lines.append(f"| {e['method']} | {e['merge']} | failed in every seed |" + " |" * (len(tasks) + 8))
            continue
        settings = {k: v for k, v in e.get("settings", {}).items() if k in _tuned_keys(tuning, e["method"], e["merge"])}
        cells = [e["method"], e["merge"], setting_text(settings)]
        cells += [_ms(e["scores"].get(t, []), expected=n_seeds) for t in tasks]
        cells += [_ms(e["scores"]["mean"], expected=n_seeds), _ms(e["normalized"].get("mean", []), expected=n_seeds)]
        cells += [_ms(e["passes"], 0), _ms(e["train_seconds"], 0)]
        cells += [_mb_cell(e["uplink_r1"]), _mb_cell(e["uplink_later"]), _mb_cell(e["downlink_later"])]
        cells += [_mb_cell(e["eval_downlink"])]
        row = "| " + " | ".join(cells) + " |"
        if e["failed"]:
            row += " left out: " + "; ".join(f"seed {s} ({e['why'][s]})" for s in e["failed"])
        lines.append(row)

    # normalized per task
    lines += [
        "",
        "## Normalized per task (merged / same method's single-task model)",
        "",
        "| method | merge | " + " | ".join(tasks) + " | mean |",
        "|" + "---|" * (len(tasks) + 3),
    ]
    for e in summary.values():
        if e["seeds"]:
            cells = [_ms(e["normalized"].get(t, []), expected=n_seeds) for t in tasks]
            cells += [_ms(e["normalized"].get("mean", []), expected=n_seeds)]
            lines.append(f"| {e['method']} | {e['merge']} | " + " | ".join(cells) + " |")
    zero = sorted({t for by in refs.values() for s in by for t, v in by[s]["scores"].items() if v <= 0})
    if zero:
        lines += ["", f"Left out of `normalized` where a single-task model scored 0: {', '.join(zero)}."]

    lines += _bytes_table(results)
    lines += _tuning_tables(tuning)
    wall = setup.get("wall_seconds")
    if wall is not None:
        lines += ["", f"Wall time of this comparison: {wall / 3600:.2f} h (units reused from earlier runs count 0)."]
    return "\n".join(lines) + "\n"


def _tuned_keys(tuning: Mapping, method: str, merge: str) -> set[str]:
    t = tuning.get(method, {})
    keys = set(t.get("chosen", {}))
    keys |= set(t.get("merges", {}).get(merge, {}).get("chosen", {}))
    return keys


def _bytes_table(results: Mapping) -> list[str]:
    seeds = results["setup"]["seeds"]
    first = str(seeds[0])
    lines = [
        "",
        f"## Bytes on the wire per client and round (seed {first}; MB, as counted on the Flower messages)",
        "",
        "| method | merge | round | client | uplink | downlink (train) | downlink (eval) |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, by_seed in results.get("federations", {}).items():
        fed = by_seed.get(first, {})
        if not fed.get("rows"):
            continue
        method, merge = run.split(":")
        for r in federation_stats(fed["rows"])["rounds"]:
            for c in r["clients"]:
                ev = r["eval"].get(c["client"])
                lines.append(
                    f"| {method} | {merge} | {r['round']} | {c['client']} | {c['uplink'] / MB:.2f} | "
                    f"{c['downlink'] / MB:.2f} | {'-' if ev is None else f'{ev / MB:.2f}'} |"
                )
    return lines


def _tuning_tables(tuning: Mapping) -> list[str]:
    if not tuning:
        return []
    lines = ["", "## Tuning candidates (validation scores; the chosen one in bold)", ""]
    for method, t in tuning.items():
        rows = t.get("candidates", [])
        if not rows:
            continue
        tasks = sorted({k for r in rows for k in r["val"]})
        lines += [f"| {method} | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 2)]
        for r in rows:
            name = setting_text(r["setting"])
            name = f"**{name}**" if r["setting"] == t.get("chosen") else name
            lines.append(
                f"| {name} | " + " | ".join(f"{r['val'].get(k, 0):.3f}" for k in tasks) + f" | {r['mean']:.3f} |"
            )
        lines.append("")
        for merge, m in t.get("merges", {}).items():
            lines += [f"| {method} + {merge} | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 2)]
            for r in m["candidates"]:
                name = _candidate(r, m.get("chosen"))
                lines.append(
                    f"| {name} | " + " | ".join(f"{r['val'].get(k, 0):.3f}" for k in tasks) + f" | {r['mean']:.3f} |"
                )
            lines.append("")
    return lines


def _candidate(row: Mapping, chosen: Mapping | None) -> str:
    name = setting_text(row["setting"])
    name = f"**{name}**" if row["setting"] == chosen else name
    return name + (" (tied)" if row.get("tied") else "")


def write_comparison(out: str | Path, results: Mapping) -> Path:
    """compare.md, compare.json and compare.png in ``out``; returns the markdown's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    (out / "compare.json").write_text(json.dumps({"results": results, "summary": summary}, indent=1) + "\n")
    md = out / "compare.md"
    md.write_text(tables(results))
    _plot(out, results, summary)
    _plot_curves(out, score_bytes_curves(results))
    return md


def _plot_curves(out: Path, curves: Mapping) -> None:
    """compare_score_vs_bytes.png and .json: one curve per method x merge."""
    (out / "compare_score_vs_bytes.json").write_text(json.dumps(curves, indent=1) + "\n")
    if not any(len(c["points"]) > 1 for c in curves.values()):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, c in curves.items():
        pts = c["points"]
        x = [p["bytes_per_client"] / MB for p in pts]
        y = [p["score"] for p in pts]
        ax.errorbar(x, y, yerr=[p["score_sd"] for p in pts], marker="o", capsize=3, label=run.replace(":", " + "))
    ax.set(
        xlabel="MB per client, cumulative (uplink + downlink, evaluation included; mean over clients)",
        ylabel="task-average score (mean ± std over seeds)",
        title="merged score against bytes",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare_score_vs_bytes.png", dpi=120)
    plt.close(fig)


def _plot(out: Path, results: Mapping, summary: Mapping) -> None:
    ok = [e for e in summary.values() if e["seeds"]]
    if not ok:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = results.get("references", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, means, sds, colors = [], [], [], []
    for method, by_seed in refs.items():
        m, sd, _ = mean_std(sum(v["scores"].values()) / max(len(v["scores"]), 1) for v in by_seed.values())
        labels.append(f"{method}\nsingle-task")
        means.append(m)
        sds.append(0 if math.isnan(sd) else sd)
        colors.append("tab:gray")
    for e in ok:
        m, sd, _ = mean_std(e["scores"]["mean"])
        labels.append(f"{e['method']}\n{e['merge']}")
        means.append(m)
        sds.append(0 if math.isnan(sd) else sd)
        colors.append("tab:blue")
    a1.bar(range(len(labels)), means, yerr=sds, color=colors, capsize=3)
    a1.set_xticks(range(len(labels)), labels, fontsize=8)
    base = results.get("base", {})
    if base:
        a1.axhline(sum(base.values()) / len(base), color="tab:red", linestyle="--", label="base model")
        a1.legend()
    a1.set(ylabel="task-average score (mean ± std over seeds)", title="absolute scores", ylim=(0, 1.05))
    x = range(len(ok))
    up1 = [sum(e["uplink_r1"]) / max(len(e["uplink_r1"]), 1) / MB for e in ok]
    up2 = [sum(e["uplink_later"]) / max(len(e["uplink_later"]), 1) / MB for e in ok]
    down2 = [sum(e["downlink_later"]) / max(len(e["downlink_later"]), 1) / MB for e in ok]
    a2.bar([i - 0.27 for i in x], up1, width=0.27, label="uplink round 1")
    a2.bar(list(x), up2, width=0.27, label="uplink round 2+")
    a2.bar([i + 0.27 for i in x], down2, width=0.27, label="downlink round 2+ (train)")
    a2.set_xticks(list(x), [f"{e['method']}\n{e['merge']}" for e in ok], fontsize=8)
    a2.set(ylabel="MB per client and round", title="communication", yscale="log")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)
