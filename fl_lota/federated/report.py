"""One run's results as people read them: markdown tables and PNG plots from metrics.jsonl.

``write_run_report``: summary.md (a row per round: bytes and scores), scores.png (per-task
score of the global model per round), bytes.png (cumulative bytes per round) and
score_vs_bytes.png (per-task score against its client's cumulative bytes, both directions;
the numbers in score_vs_bytes.json). The
comparison over runs (``fl-lota compare``) is ``fl_lota.compare.table``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

__all__ = ["client_bytes", "read_rows", "score_vs_bytes", "write_run_report"]

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


def client_bytes(rows: Sequence[dict]) -> list[dict[int, dict]]:
    """Per round, each client's (by partition) cumulative bytes up to and including it,
    both directions: ``{partition: {"client", "uplink", "downlink", "eval_downlink",
    "total"}}`` (uplink: its reply messages; downlink: its training instructions;
    eval_downlink: its evaluation ones)."""
    acc: dict[int, dict] = {}
    out = []
    for r in rows:
        for key, field in (("clients", None), ("eval_clients", "eval_downlink")):
            for c in r.get(key, []):
                a = acc.setdefault(
                    c.get("partition", -1), {"client": c.get("client"), "uplink": 0, "downlink": 0, "eval_downlink": 0}
                )
                if field is None:
                    a["uplink"] += c.get("message_bytes", 0)
                    a["downlink"] += c.get("downlink_bytes", 0)
                else:
                    a[field] += c.get("downlink_bytes", 0)
        out.append({p: v | {"total": v["uplink"] + v["downlink"] + v["eval_downlink"]} for p, v in acc.items()})
    return out


def score_vs_bytes(rows: Sequence[dict]) -> dict:
    """Each task's score of the global model (the run's merge) against the cumulative bytes
    (both directions) of the client that holds it, one point per evaluated round; round 0 is
    the base model at 0 bytes. A task held by several clients (or mixed over clients) is set
    against their mean (``bytes_of`` says which). What ``score_vs_bytes.png`` draws."""
    if not rows:
        return {"merge": None, "tasks": {}}
    merge = rows[-1].get("merge")
    start = next((r["start_scores"] for r in rows if r.get("start_scores")), {})
    tasks: dict[str, list[dict]] = {t: [{"round": 0, "bytes": 0, "score": v}] for t, v in start.items()}
    keys = ("uplink", "downlink", "eval_downlink", "total")
    for r, by_client in zip(rows, client_bytes(rows), strict=True):
        for t, v in r.get("scores", {}).get(merge, {}).items():
            holders = [c for c in by_client.values() if c["client"] == t] or list(by_client.values())
            of = t if len(holders) == 1 and holders[0]["client"] == t else f"mean over {len(holders)} clients"
            b = {k: sum(c[k] for c in holders) / len(holders) for k in keys} if holders else {}
            tasks.setdefault(t, []).append(
                {"round": r["round"], "bytes": b.get("total"), "bytes_of": of, "score": v} | b
            )
    return {"merge": merge, "method": rows[-1].get("method"), "tasks": tasks}


def _mb(b: float) -> str:
    return f"{b / MB:.2f}"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def run_table(rows: Sequence[dict]) -> str:
    """Markdown: a row per round; bytes in MB (all clients together; the per-client figures
    are in metrics.jsonl); scores of the global model."""
    tasks = sorted({t for r in rows for s in r.get("scores", {}).values() for t in s})
    head = ["round", "uploads", "uplink MB", "dense fp32 MB", "ratio", "index bound MB", "downlink MB", "eval down MB"]
    head += [*tasks, "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = next((r["start_scores"] for r in rows if r.get("start_scores")), {})
    if start:
        cells = ["0 (base model)", "", "", "", "", "", "", ""] + [_fmt(start.get(t)) for t in tasks]
        cells += [_fmt(sum(start.values()) / len(start))]
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
        mean = _fmt(r.get("mean_score", {}).get(merge))
        if r.get("eval_partial"):
            mean += f" (partial: {len(r.get('scored_partitions', []))} clients scored)"
        cells += [mean]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merges_table(row: dict) -> str:
    """Markdown: the global model and each re-merge scored in one round, per task, with the
    clients' own models after local training beside them."""
    scores = row.get("scores", {})
    tasks = sorted({t for s in scores.values() for t in s})
    lines = ["| model | " + " | ".join(tasks) + " | mean |", "|" + "---|" * (len(tasks) + 2)]
    remerged = set(row.get("remerged", ()))
    for m, s in scores.items():
        label = f"re-merge: {m} of this round's uploads (scored only)" if m in remerged else f"global model ({m})"
        cells = [_fmt(s.get(t)) for t in tasks] + [_fmt(row["mean_score"].get(m))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    local = row.get("local_scores", {})
    if local:
        mean = sum(local.values()) / len(local)
        lines.append(
            "| each client's own model after local training (from the global model) | "
            + " | ".join(_fmt(local.get(t)) for t in tasks)
            + f" | {_fmt(mean)} |"
        )
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
        "Bytes are counted on the Flower messages of each round, all clients together (metrics.jsonl "
        "has them per client). `ratio`: dense fp32 size of the same updates / uplink bytes. `index bound`: "
        "the masks' entropy bound. Scores: federated evaluation of the global model on each client's test "
        "split (absolute; a normalized score needs single-task references: `fl-lota compare`).",
        "",
        run_table(rows),
        "",
    ]
    last_eval = next((r for r in reversed(rows) if r.get("scores")), None)
    if last_eval is not None and (len(last_eval.get("scores", {})) > 1 or last_eval.get("local_scores")):
        text += [f"## Models scored in round {last_eval['round']}", "", merges_table(last_eval), ""]
    if wall_seconds is not None:
        train = sum(r.get("seconds", {}).get("client_train", 0.0) for r in rows)
        text += [f"Wall time {wall_seconds:.0f} s; client training {train:.0f} s (summed over clients).", ""]
    text += _gpu_lines(rows)
    (out / "summary.md").write_text("\n".join(text))
    _plot_run(out, rows)


def _gpu_lines(rows: Sequence[dict]) -> list[str]:
    """Peak GPU memory per client process (torch's allocator, this client's tensors only),
    the most over the rounds, for training and evaluation; nothing for a CPU run."""
    peaks: dict[str, dict[str, int]] = {}
    for r in rows:
        for phase, key in (("training", "clients"), ("evaluation", "eval_clients")):
            for c in r.get(key, []):
                if c.get("gpu_peak_bytes") is not None:
                    d = peaks.setdefault(f"{c['client']} (p{c.get('partition', '?')})", {})
                    d[phase] = max(d.get(phase, 0), c["gpu_peak_bytes"])
    if not peaks:
        return []
    out = ["Peak GPU memory per client (torch allocator, most over the rounds):", ""]
    for client, d in sorted(peaks.items()):
        out.append(f"- {client}: " + ", ".join(f"{phase} {b / 2**30:.2f} GiB" for phase, b in sorted(d.items())))
    return [*out, ""]


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

    curves = score_vs_bytes(rows)
    (out / "score_vs_bytes.json").write_text(json.dumps(curves, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for t, pts in sorted(curves["tasks"].items()):
        pts = [p for p in pts if p["bytes"] is not None]
        ax.plot([p["bytes"] / MB for p in pts], [p["score"] for p in pts], marker="o", label=t)
    ax.set(
        xlabel="MB sent and received by the task's client (cumulative, both directions)",
        ylabel="score",
        title=f"score against bytes ({rows[-1].get('method')} + {merge})",
        ylim=(0, 1.02),
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_vs_bytes.png", dpi=120)
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
