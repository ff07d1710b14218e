"""Results as people read them: markdown tables and PNG plots from metrics.jsonl rows.

``write_run_report``: one run's summary.md (a row per round: bytes and scores), scores.png
(per-task score of the merged model per round) and bytes.png (cumulative bytes per round).
``comparison_rows`` / ``write_comparison``: one table and one plot over several runs
(fine-tuning method x merge method), used by ``fl-lota compare``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["comparison_rows", "read_rows", "write_comparison", "write_run_report"]

MB = 1e6


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl. A missing file or a line that is not JSON is an error
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON row ({e.msg})") from None
    return rows


def _mb(b: float) -> str:
    return f"{b / MB:.2f}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def run_table(rows: Sequence[dict]) -> str:
    """Markdown: a row per round; bytes in MB; scores of the global model's merge."""
    tasks = sorted({t for r in rows for s in r.get("scores", {}).values() for t in s})
    head = ["round", "uploads", "uplink MB", "dense fp32 MB", "ratio", "index bound MB", "downlink MB", "eval down MB"]
    head += [*tasks, "mean", "normalized"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = next((r["start_scores"] for r in rows if r.get("start_scores")), {})
    if start:
        cells = ["0 (start)", "", "", "", "", "", "", ""] + [_fmt(start.get(t)) for t in tasks]
        cells += [_fmt(sum(start.values()) / len(start)), ""]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        merge = r.get("merge")
        s = r.get("scores", {}).get(merge, {})
        up, dense = r.get("uplink_bytes", 0), r.get("dense_fp32_bytes", 0)
        cells = [
            str(r["round"]),
            f"{r.get('accepted', 0)}/{r.get('sampled', 0)}"
            + (f" ({r['values_only_uploads']} values-only)" if r.get("values_only_uploads") else ""),
            _mb(up),
            _mb(dense),
            f"{dense / up:.1f}x" if up else "-",
            _mb(r.get("index_entropy_bytes", 0)),
            _mb(r.get("downlink_bytes", 0)),
            _mb(r.get("eval_downlink_bytes", 0)),
        ]
        cells += [_fmt(s.get(t)) for t in tasks]
        cells += [_fmt(r.get("mean_score", {}).get(merge)), _fmt(r.get("normalized", {}).get(merge, {}).get("mean"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merges_table(row: dict) -> str:
    """Markdown: each scored merge of one round, per task."""
    scores = row.get("scores", {})
    tasks = sorted({t for s in scores.values() for t in s})
    lines = ["| merge | " + " | ".join(tasks) + " | mean | normalized |", "|" + "---|" * (len(tasks) + 3)]
    local = row.get("local_scores", {})
    if local:
        lines.append("| local (single-task) | " + " | ".join(_fmt(local.get(t)) for t in tasks) + " | | |")
    for m, s in scores.items():
        norm = row.get("normalized", {}).get(m, {}).get("mean")
        cells = [_fmt(s.get(t)) for t in tasks] + [_fmt(row["mean_score"].get(m)), _fmt(norm)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_run_report(out: str | Path, rows: Sequence[dict], *, wall_seconds: float | None = None) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not rows:
        (out / "summary.md").write_text("# fl-lota run\n\nNo round completed.\n")
        return
    r0 = rows[-1]
    text = [
        f"# fl-lota run: {r0.get('method')} + {r0.get('merge')}",
        "",
        "Bytes are counted on the Flower messages of each round (all clients together). "
        "`ratio`: dense fp32 size of the same updates / uplink bytes. `index bound`: the masks' "
        "entropy bound. Scores: federated evaluation of the merged model on each client's test split; "
        "`normalized`: merged score / the client's own fine-tuned score, averaged over tasks.",
        "",
        run_table(rows),
        "",
    ]
    last_eval = next((r for r in reversed(rows) if r.get("scores")), None)
    if last_eval is not None:
        text += [f"## Merges scored on round {last_eval['round']}'s uploads", "", merges_table(last_eval), ""]
    if wall_seconds is not None:
        train = sum(r.get("seconds", {}).get("client_train", 0.0) for r in rows)
        text += [f"Wall time {wall_seconds:.0f} s; client training {train:.0f} s (summed over clients).", ""]
    (out / "summary.md").write_text("\n".join(text))
    _plot_run(out, rows)


def _plot_run(out: Path, rows: Sequence[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merge = rows[-1].get("merge")
    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = sorted({t for r in rows for t in r.get("scores", {}).get(merge, {})})
    start = next((r["start_scores"] for r in rows if r.get("start_scores")), {})
    for t in tasks:
        pts = [(0, start[t])] if t in start else []
        pts += [(r["round"], r["scores"][merge][t]) for r in rows if t in r.get("scores", {}).get(merge, {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set(xlabel="round", ylabel="score", title=f"per-task score ({rows[-1].get('method')} + {merge})", ylim=(0, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [r["round"] for r in rows]
    for key, label in (
        ("cumulative_uplink_bytes", "uplink"),
        ("cumulative_downlink_bytes", "downlink (train)"),
        ("cumulative_eval_downlink_bytes", "downlink (eval)"),
    ):
        ax.plot(rounds, [r.get(key, 0) / MB for r in rows], marker="o", label=label)
    dense = [sum(x.get("dense_fp32_bytes", 0) for x in rows[: i + 1]) / MB for i in range(len(rows))]
    ax.plot(rounds, dense, linestyle="--", label="uplink if dense fp32")
    ax.set(xlabel="round", ylabel="MB (cumulative)", title="communication")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)


# ---- comparing runs ----------------------------------------------------------------


def comparison_rows(runs: Sequence[tuple[str, Sequence[dict]]]) -> list[dict]:
    """One entry per (fine-tuning method, merge) from each run's rows (``runs``: label and
    rows). Scores from the last evaluated round; normalized against a common reference:
    per task, the best single-task (local) score of any run, so methods are compared on
    the same scale. Bytes: round 1 and the mean of later rounds."""
    ref: dict[str, float] = {}
    for _, rows in runs:
        for r in rows:
            for t, v in r.get("local_scores", {}).items():
                ref[t] = max(ref.get(t, 0.0), v)
    out = []
    for label, rows in runs:
        if not rows:
            out.append({"run": label, "error": "no completed round"})
            continue
        last = next((r for r in reversed(rows) if r.get("scores")), rows[-1])
        later = rows[1:]
        for merge, scores in last.get("scores", {}).items():
            norm = {t: v / ref[t] for t, v in scores.items() if ref.get(t, 0) > 0}
            out.append(
                {
                    "run": label,
                    "method": last.get("method"),
                    "merge": merge,
                    "round": last["round"],
                    "scores": scores,
                    "mean_score": sum(scores.values()) / max(len(scores), 1),
                    "normalized": sum(norm.values()) / len(norm) if norm else None,
                    "uplink_round1": rows[0].get("uplink_bytes", 0),
                    "uplink_later": sum(r.get("uplink_bytes", 0) for r in later) / len(later) if later else None,
                    "downlink_per_round": sum(r.get("downlink_bytes", 0) for r in rows) / len(rows),
                    "start_scores": next((r["start_scores"] for r in rows if r.get("start_scores")), {}),
                    "reference": ref,
                }
            )
    return out


def comparison_table(entries: Sequence[dict]) -> str:
    ok = [e for e in entries if "error" not in e]
    tasks = sorted({t for e in ok for t in e["scores"]})
    head = ["method", "merge", *tasks, "mean", "normalized", "uplink MB r1", "uplink MB later", "downlink MB/round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if ok:
        start = ok[0]["start_scores"]
        if start:
            cells = ["base model", "-", *[_fmt(start.get(t)) for t in tasks], _fmt(sum(start.values()) / len(start))]
            lines.append("| " + " | ".join([*cells, "", "", "", ""]) + " |")
        ref = ok[0]["reference"]
        if ref:
            cells = ["best single-task", "-", *[_fmt(ref.get(t)) for t in tasks], "", "1.000", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    for e in entries:
        if "error" in e:
            lines.append(f"| {e['run']} | failed: {e['error']} |" + " |" * (len(head) - 2))
            continue
        cells = [e["method"], e["merge"], *[_fmt(e["scores"].get(t)) for t in tasks], _fmt(e["mean_score"])]
        cells += [_fmt(e["normalized"]), _mb(e["uplink_round1"])]
        cells += ["-" if e["uplink_later"] is None else _mb(e["uplink_later"]), _mb(e["downlink_per_round"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(out: str | Path, entries: Sequence[dict]) -> Path:
    """compare.md, compare.json and compare.png in ``out``; returns the markdown path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(list(entries), indent=1) + "\n")
    md = out / "compare.md"
    md.write_text(
        "# fl-lota: fine-tuning method x merge method\n\n"
        "Scores of the merged model (last evaluated round); `normalized`: per task, merged score / "
        "best single-task score of any run in this comparison, averaged over tasks.\n\n"
        + comparison_table(entries)
        + "\n"
    )
    ok = [e for e in entries if "error" not in e]
    if ok:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{e['method']}\n{e['merge']}" for e in ok]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.bar(labels, [e["normalized"] or 0.0 for e in ok], color="tab:blue")
        a1.set(ylabel="task-average normalized score", title="merged model quality", ylim=(0, 1.05))
        x = range(len(ok))
        a2.bar([i - 0.2 for i in x], [e["uplink_round1"] / MB for e in ok], width=0.4, label="uplink round 1")
        a2.bar([i + 0.2 for i in x], [(e["uplink_later"] or 0) / MB for e in ok], width=0.4, label="uplink later")
        a2.set_xticks(list(x), labels)
        a2.set(ylabel="MB per round (all clients)", title="communication", yscale="log")
        a2.legend()
        fig.tight_layout()
        fig.savefig(out / "compare.png", dpi=120)
        plt.close(fig)
    return md
