"""Single-task runs: one client's method trained alone from the base, with no merging.

The merging literature divides a merged model's score by the score of *the same method's*
model fine-tuned on that task alone (Yadav et al. 2023, "TIES-Merging"; Panda et al. 2024,
the LoTA paper's merging tables). ``isolated_run`` makes that model by running the federated
round loop with one client and no merge: each round the client trains from ``base + G`` on
its example stream (``LocalNode.train``), its upload is decoded as the server decodes it
(mask registration, values-only rounds, LoRA factors, clipping) and added to its own ``G``.
Budget, data order, optimizer resets between rounds and the wire's value quantization are
those of the federation; only the other clients are missing. (In a federation of one task
per client, the reference of task ``i`` reads exactly client ``i``'s example stream; in a
mixed federation no client holds a whole task, and the reference trains on the task's
whole training split with a stream of its own.)

The same loop on a validation split carved from train (``validation_task``) scores the
hyperparameter candidates of ``fl_lota.compare``; ``score_merge`` scores a one-shot merge of
such single-task updates (how TIES's k and lambda are chosen), never on test data.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fl_lota.compare.store import digest
from fl_lota.federated.aggregator import Aggregator, Upload
from fl_lota.federated.files import write_atomic
from fl_lota.federated.node import LocalNode
from fl_lota.federated.runconfig import RunConfig
from fl_lota.merging.merge import merge
from fl_lota.tasks import Task
from fl_lota.tasks.partition import ClientData
from fl_lota.training import device as devices
from fl_lota.vectors import codec

__all__ = ["IsolatedResult", "isolated_run", "isolated_unit", "score_merge", "score_models", "validation_task"]


@dataclass
class IsolatedResult:
    scores: dict[str, float]  # task -> score on the node's evaluation split(s)
    payload: bytes  # the cumulative update G (FLTV), as a server would hold it
    passes: int  # forward/backward batches, all rounds (LoTA's calibration included)
    examples: int  # training examples consumed, all rounds
    train_seconds: float
    eval_seconds: float
    seen: list[list[int]]  # per round, the indices of the training examples used


def validation_task(task: Task, size: int, seed: int) -> Task:
    """``task`` with ``size`` of its training samples held out as the test split (a
    seeded shuffle; at most a quarter of train) and the rest as train. The real test
    split is not touched: hyperparameters are chosen on this split only."""
    if size < 1:
        raise ValueError(f"validation size must be >= 1, got {size}")
    k = min(size, len(task.train) // 4)
    if k < 1:
        raise ValueError(
            f"task {task.name}: {len(task.train)} training samples are too few to hold out a validation split"
        )
    order = list(range(len(task.train)))
    random.Random(f"validation:{task.name}:{seed}").shuffle(order)
    val = [task.train[i] for i in sorted(order[:k])]
    train = [task.train[i] for i in sorted(order[k:])]
    return Task(task.name, task.metric, train, val, task.extra_metrics, task.max_new_tokens)


def _solo(cfg: RunConfig) -> RunConfig:
    # one upload, weight 1: fedavg returns it unchanged (TIES would trim it)
    return replace(cfg, merge="fedavg", eval_merges="", min_replies=1)


def isolated_run(cfg: RunConfig, partition_id: int, task: Task, *, evaluate: bool = True) -> IsolatedResult:
    """Train ``cfg.method`` on ``task.train`` alone for ``cfg.num_server_rounds`` rounds of
    ``cfg.local_steps`` steps, as client ``partition_id`` would (same example stream), and
    score ``base + G`` on ``task.test``. Raises RuntimeError if its own upload is refused."""
    solo = _solo(cfg)
    node = LocalNode(solo, partition_id, ClientData(partition_id, list(task.train), [task]))
    agg = Aggregator(solo)
    mask: bytes | None = None
    passes = examples = 0
    train_s = 0.0
    seen: list[list[int]] = []
    for rnd in range(1, cfg.num_server_rounds + 1):
        out = node.train(agg.global_payload, mask, server_round=rnd)
        if out.mask_payload is not None:
            mask = out.mask_payload
        result = agg.aggregate([Upload("solo", out.payload, 1.0, partition=partition_id)])
        if result.rejected:
            raise RuntimeError(f"single-task run of {task.name}: its own upload was refused: {result.rejected}")
        passes += out.report.fb_passes
        examples += out.report.train_examples
        train_s += out.report.train_seconds
        seen.append(out.seen)
    scores, eval_s = {}, 0.0
    if evaluate:
        t0 = time.perf_counter()
        scores = score_models(node, {"solo": agg.global_payload})["solo"]
        eval_s = time.perf_counter() - t0
    return IsolatedResult(scores, agg.global_payload, passes, examples, train_s, eval_s, seen)


def score_models(node: LocalNode, payloads: Mapping[str, bytes]) -> dict[str, dict[str, float]]:
    """``{name: {task: score}}`` of ``base + G`` for each payload, on the node's evaluation
    split(s)."""
    scores = node.evaluate(dict(payloads)).scores
    return {name: scores.get(name, {}) for name in payloads}


def score_merge(
    cfg: RunConfig,
    updates: Sequence[bytes],
    weights: Sequence[float],
    tasks: Sequence[Task],
    settings: Mapping[str, Mapping[str, object]],
) -> dict[str, dict[str, float]]:
    """Score one-shot merges of single-task updates on ``tasks``' evaluation splits:
    ``settings`` maps a label to a merge (``{"merge": "ties", "k": 0.2, "lam": 1.0}``).
    Each merged update goes through the wire codec as a global model would."""
    vectors = [codec.decode(u) for u in updates]
    payloads = {}
    for label, s in settings.items():
        params = {k: v for k, v in s.items() if k != "merge"}
        merged = merge(str(s["merge"]), vectors, list(weights), **params)
        payloads[label] = codec.encode(merged, values=cfg.values)
    train = [x for t in tasks for x in t.train[:1]]
    node = LocalNode(cfg, 0, ClientData(0, train, list(tasks)))
    return score_models(node, payloads)


def isolated_unit(cfg: RunConfig, partition: int, task: Task, *, vector_path: Path | None = None) -> dict:
    """``isolated_run`` as the comparison stores it: scores, budget, seconds, the update's
    size and digest (``vector_path``: the update itself beside it) and the machine."""
    res = isolated_run(cfg, partition, task)
    if vector_path is not None:
        write_atomic(vector_path, res.payload, durable=False)  # digest-checked on reuse
    return {
        "scores": res.scores,
        "passes": res.passes,
        "examples": res.examples,
        "train_seconds": res.train_seconds,
        "eval_seconds": res.eval_seconds,
        "update_bytes": len(res.payload),
        "update_digest": digest(res.payload),
        "machine": devices.machine(devices.resolve(cfg.device)),
    }
