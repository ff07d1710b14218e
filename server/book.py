"""RoundBook: the server's record of each round, one JSON row per round in metrics.jsonl.

Bytes are those counted on the Flower messages (``count_bytes()`` of every record in a
message's content): ``uplink_bytes`` (train replies), ``downlink_bytes`` (train
instructions, carrying the global update) and ``eval_downlink_bytes`` (evaluate
instructions, carrying the global update and any further merges to score). Next to them:
``uplink_payload_bytes`` (the FLTV payloads alone), ``dense_fp32_bytes`` (the same updates
sent as dense float32) and ``index_entropy_bytes`` (the masks' entropy bound).

Per client (``clients``, one entry per training reply): the bytes of its reply and of the
training instruction it received, its payload, the forward/backward passes it spent and the
examples it trained on (``examples_seen``: the stream positions it reported and the example
indices they stand for, in order: ``fl_lota.training.data.stream_order`` of its seeded stream).
``eval_clients``: per client, the bytes of the evaluation instruction it received.

Scores: ``scores[merge][task]`` from federated evaluation on the clients' test splits.
``scores[<merge>]`` is the global model of this run; the further merges of ``eval-merges``
(listed in ``remerged``) are NOT federations of their own: each is ``G`` of the previous
round plus that merge of this round's uploads, scored once. ``start_scores``: the base
model (round 1). ``local_scores``: each client's own model after this round's local
training, which started from the global model; it is not the single-task reference that
normalized scores divide by (``fl-lota compare`` trains those apart).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from fl_lota.federated.aggregator import RoundMerge
from fl_lota.federated.files import write_atomic
from fl_lota.federated.protocol import EvalReport, TrainReport
from fl_lota.federated.runconfig import RunConfig
from fl_lota.tasks import task_label
from fl_lota.training.data import client_stream_seed, stream_order
from fl_lota.training.device import precision_name

__all__ = ["RoundBook"]


def _weighted(pairs: list[tuple[float, float]]) -> float:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")


class RoundBook:
    def __init__(self, cfg: RunConfig, results_dir: Path) -> None:
        self.cfg = cfg
        self.dir = Path(results_dir)
        self.path = self.dir / "metrics.jsonl"
        self.rows: list[dict] = []
        self.row: dict = {}

    def tasks_of(self, partition: int) -> set[str]:
        """The tasks partition ``partition`` holds (every task, in a mixed federation)."""
        spec = self.cfg.spec
        if spec.alpha is None:
            return {task_label(spec.tasks[partition])} if 0 <= partition < len(spec.tasks) else set()
        return {task_label(t) for t in spec.tasks}

    def client_name(self, partition: int) -> str:
        spec = self.cfg.spec
        if spec.alpha is None and 0 <= partition < len(spec.tasks):
            return task_label(spec.tasks[partition])
        return f"client-{partition}"

    # ---- the round, as it happens ---------------------------------------------------

    def start_round(self, server_round: int, downlink: dict[int, int]) -> None:
        self.row = {
            "round": server_round,
            "method": self.cfg.method,
            "merge": self.cfg.merge,
            "sampled": len(downlink),
            "downlink_bytes": sum(downlink.values()),
            "downlink_by_node": {str(n): b for n, b in downlink.items()},
            "eval_downlink_bytes": 0,
            "clients": [],
            "failures": {},
            "rejected": {},
        }
        self._downlink = downlink
        self._eval_downlink: dict[int, int] = {}
        self._reports: dict[str, TrainReport] = {}  # node -> its training report this round
        self._evals: list[EvalReport] = []

    def never_accepted(self) -> dict[str, str]:
        """Nodes sent training instructions in some round whose uploads were never accepted
        in any round, with the last reason recorded for them."""
        sent, accepted, why = set(), set(), {}
        for r in self.rows:
            sent |= set(r.get("downlink_by_node", {}))
            failures, refused = r.get("failures", {}), r.get("rejected", {})
            rejected = {n: "; ".join(x for x in (failures.get(n), refused.get(n)) if x) for n in {*failures, *refused}}
            accepted |= {c["node"] for c in r.get("clients", []) if c.get("accepted", c["node"] not in rejected)}
            why |= rejected
        return {n: why.get(n, "no reply") for n in sorted(sent - accepted)}

    def failure(self, node: int, reason: str) -> None:
        self.row["failures"][str(node)] = reason

    def reject(self, node: int, reason: str) -> None:
        """Every reason a node's replies were refused this round (training and evaluation)."""
        had = self.row["rejected"].get(str(node))
        self.row["rejected"][str(node)] = reason if had is None or had == reason else f"{had}; {reason}"

    def upload(self, node: int, message_bytes: int, array_bytes: int, r: TrainReport) -> None:
        self.row["clients"].append(
            {
                "node": str(node),
                "partition": r.partition,
                "client": self.client_name(r.partition),
                "message_bytes": message_bytes,
                "array_bytes": array_bytes,
                "payload_bytes": r.payload_bytes,
                "downlink_bytes": self._downlink.get(node, 0),
                "values_only": r.values_only,
                "nnz": r.nnz,
                "numel": r.numel,
                "index_entropy_bytes": r.index_entropy_bytes,
                "examples": r.num_examples,
                "fb_passes": r.fb_passes,
                "train_examples": r.train_examples,
                "examples_seen": {
                    "stream_start": r.stream_start,
                    "stream_end": r.stream_end,
                    "distinct": r.distinct_examples,
                    "indices": self._stream_indices(r.partition, r.num_examples, r.stream_start, r.stream_end),
                },
                "loss_first": r.loss_first,
                "loss_last": r.loss_last,
                "train_seconds": r.train_seconds,
                "eval_seconds": r.eval_seconds or 0.0,
                "eval_precision": _precision(r.eval_bf16),
                "load_seconds": r.load_seconds,
                "codec_seconds": r.codec_seconds,
                "gpu_peak_bytes": r.gpu_peak_bytes,  # None off a GPU
                "metrics": r.to_metrics(),  # the report as it came
            }
        )
        self._reports[str(node)] = r

    def _stream_indices(self, partition: int, n: int, start: int, end: int) -> list[int]:
        """The indices of the examples a client trained on: its stream positions, read
        through its seeded example order (the client sends positions, not the list)."""
        if n < 1 or partition < 0 or not 0 <= start <= end:
            return []
        return stream_order(n, client_stream_seed(self.cfg.seed, partition), start, end - start)

    def merged(self, result: RoundMerge, *, train_wall: float, downlink_prep: float) -> None:
        cs = self.row["clients"]
        accepted = set(result.accepted)
        good = [c for c in cs if c["node"] in accepted]
        for c in cs:
            c["accepted"] = c["node"] in accepted
        for c in good:  # what the server measured of the upload, in place of what the client said
            m = result.measured.get(c["node"], {})
            c |= {k: m[k] for k in ("payload_bytes", "values_only", "nnz", "numel", "index_entropy_bytes") if k in m}
        self.row |= {
            "replied": len(cs),
            "accepted": len(good),
            "partial": len(good) < self.row["sampled"],
            "global_updated": result.updated,
            "merge_error": result.merge_error,
            "uplink_bytes": sum(c["message_bytes"] for c in cs),
            "uplink_array_bytes": sum(c["array_bytes"] for c in cs),
            "uplink_payload_bytes": sum(c["payload_bytes"] for c in cs),
            "dense_fp32_bytes": 4 * sum(c["numel"] for c in good),
            "index_entropy_bytes": sum(c["index_entropy_bytes"] for c in good),
            "values_only_uploads": sum(c["values_only"] for c in good),
            "global": {
                "nnz": result.global_nnz,
                "numel": result.global_numel,
                "bytes": result.global_bytes,
                "candidate_bytes": result.candidate_bytes,
            },
            "seconds": {
                "train_wall": train_wall,
                "merge": result.merge_seconds,
                "decode": result.decode_seconds,
                "downlink_prep": downlink_prep,  # encoding what the nodes are sent of the new G (Downlink.prepare)
                "client_train": sum(c["train_seconds"] for c in cs),
                "client_eval_in_train": sum(c["eval_seconds"] for c in cs),
                "client_load": sum(c["load_seconds"] for c in cs),
                "client_codec": sum(c["codec_seconds"] for c in cs),
            },
        }
        reports = [self._reports[c["node"]] for c in good]
        self.row["start_scores"] = _task_scores([(r.start_scores, r.test_items) for r in reports])
        self.row["local_scores"] = _task_scores([(r.local_scores, r.test_items) for r in reports])

    def train_summary(self) -> dict[str, float]:
        r = self.row
        return {"uplink-bytes": r["uplink_bytes"], "downlink-bytes": r["downlink_bytes"], "accepted": r["accepted"]}

    def eval_sent(self, downlink: dict[int, int]) -> None:
        self.row["eval_downlink_bytes"] = sum(downlink.values())
        self._eval_downlink = dict(downlink)

    def evaluated(self, node: int, r: EvalReport) -> None:
        self._evals.append(r)
        self.row.setdefault("eval_clients", []).append(
            {
                "node": str(node),
                "partition": r.partition,
                "client": self.client_name(r.partition),
                "downlink_bytes": self._eval_downlink.get(node, 0),
                "eval_seconds": r.eval_seconds,
                "eval_precision": _precision(r.eval_bf16),
                "gpu_peak_bytes": r.gpu_peak_bytes,
            }
        )

    def end_round(self, *, eval_wall: float, round_wall: float, memory_mb: dict | None = None) -> dict:
        """Close the round's row and append it to metrics.jsonl. ``memory_mb``: the server
        process's resident memory at the end of the round and its peak during it (MiB)."""
        row = self.row
        if memory_mb is not None:
            row["server_memory_mb"] = memory_mb
        row.setdefault("uplink_bytes", 0)
        scores: dict[str, dict[str, float]] = {}
        for merge in self.cfg.merges:
            s = _task_scores([(r.scores.get(merge, {}), r.test_items) for r in self._evals])
            if s:
                scores[merge] = s
        row["scores"] = scores
        row["mean_score"] = {m: sum(s.values()) / len(s) for m, s in scores.items()}
        row["remerged"] = [m for m in scores if m != self.cfg.merge]
        # with client sampling only clients that have trained are scored: a mean over some
        # of the clients is not the federation's mean, and is marked so
        scored = sorted({r.partition for r in self._evals})
        row["scored_partitions"] = scored
        row["eval_partial"] = bool(scores) and len(scored) < self.cfg.spec.num_clients
        row.setdefault("eval_clients", [])
        row.setdefault("seconds", {})
        row["seconds"] |= {
            "eval_wall": eval_wall,
            "round_wall": round_wall,
            "client_eval": sum(r.eval_seconds for r in self._evals),
        }
        prev = self.rows[-1] if self.rows else {}
        for key in ("uplink_bytes", "downlink_bytes", "eval_downlink_bytes"):
            row[f"cumulative_{key}"] = prev.get(f"cumulative_{key}", 0) + row.get(key, 0)
        self.rows.append(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:  # one complete line per round, flushed to disk
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return row

    def rewrite(self) -> None:
        """metrics.jsonl from ``rows`` (after a resume), replaced atomically."""
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    # ---- printing -----------------------------------------------------------------

    def client_lines(self, phase: str) -> list[str]:
        """One line per client of this round for ``phase`` (``train``: its phases' seconds,
        loss and upload, or that the upload was refused; ``evaluate``: seconds and the
        scores of the run's merge). Figures a client sent that are absent print as ``?``;
        nothing here raises on what a client reported."""
        r = self.row.get("round")
        out = []
        if phase == "train":
            for c in sorted(self.row.get("clients", []), key=lambda c: c.get("partition", -1)):
                line = f"round {r} {c.get('client')}: train {_num(c.get('train_seconds'), 1)} s"
                report = self._reports.get(c.get("node"))
                phases = ", ".join(f"{k} {_num(v, 1)} s" for k, v in (report.phase_seconds if report else {}).items())
                line += f" ({phases})" if phases else ""
                if c.get("loss_first") is not None or c.get("loss_last") is not None:
                    line += f", loss {_num(c.get('loss_first'))} -> {_num(c.get('loss_last'))}"
                if c.get("accepted", True):
                    kind = "values-only" if c.get("values_only") else "indices + values"
                    line += f", upload {_num(c.get('payload_bytes', 0) / 1e6, 2)} MB ({kind})"
                else:
                    line += ", upload refused (reason above)"
                out.append(line + _gpu(c))
        else:
            for report, c in zip(self._evals, self.row.get("eval_clients", []), strict=True):
                scores = " ".join(f"{t}={_num(v)}" for t, v in report.scores.get(self.cfg.merge, {}).items())
                how = f" ({c['eval_precision']})" if c.get("eval_precision") else ""
                out.append(
                    f"round {r} {c.get('client')}: evaluate {_num(c.get('eval_seconds'), 1)} s{how}, {scores}" + _gpu(c)
                )
        return out

    @staticmethod
    def round_line(row: dict) -> str:
        mb = 1e6
        parts = [
            f"round {row['round']}: {row.get('accepted', 0)}/{row['sampled']} uploads",
            f"uplink {row['uplink_bytes'] / mb:.2f} MB"
            + (f" (dense fp32 {row['dense_fp32_bytes'] / mb:.1f} MB)" if row.get("dense_fp32_bytes") else ""),
            f"downlink {row['downlink_bytes'] / mb:.2f} MB + eval {row['eval_downlink_bytes'] / mb:.2f} MB",
        ]
        for m, s in row.get("scores", {}).items():
            tasks = " ".join(f"{t}={v:.3f}" for t, v in s.items())
            label = f"re-merge {m}" if m in row.get("remerged", ()) else m
            parts.append(f"[{label}] {tasks}")
        if row.get("rejected") or row.get("failures"):
            parts.append(f"rejected {len(row['rejected'])}, failed {len(row['failures'])}")
        peak = row.get("server_memory_mb", {}).get("peak")
        if peak is not None:
            parts.append(f"server peak {peak:.0f} MiB")
        return " | ".join(parts)


def _task_scores(items: list[tuple[dict[str, float], dict[str, int]]]) -> dict[str, float]:
    """Per task, the mean of the clients' scores weighted by their test items (a score
    without its item count weighs 1)."""
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for scores, items_of in items:
        for task, v in scores.items():
            pairs[task].append((v, items_of.get(task, 1.0)))
    return {t: _weighted(p) for t, p in sorted(pairs.items())}


def _gpu(c: dict) -> str:
    peak = c.get("gpu_peak_bytes")
    return "" if peak is None else f", GPU peak {peak / 2**30:.2f} GiB"


def _num(v: object, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) and not isinstance(v, bool) else "?"


def _precision(bf16: bool | None) -> str | None:
    """How a client generated when it scored; None when it did not say."""
    return None if bf16 is None else precision_name(bf16)
