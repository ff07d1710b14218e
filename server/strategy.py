"""LotaFedAvg: Flower's FedAvg with fl-lota's merge in place of weighted array averaging.

Flower samples the nodes (FedAvg's ``configure_train`` / ``configure_evaluate``); the rest
differs: each message gets its own content built from the round protocol
(``fl_lota.federated.protocol``, in Flower records by ``wire``) with the global update as the change
since the version its node holds (``fl_lota.federated.downlink``: the whole update to a node that
holds none); replies are parsed and checked one by one and their FLTV payloads decoded and
merged by ``fl_lota.federated.aggregator.Aggregator``; each round's bytes, as counted on the actual
messages (``count_bytes()``), and scores go to a ``RoundBook`` that writes
``metrics.jsonl``. The rounds run in Flower's own loop (``Strategy.start``): the arrays
``aggregate_train`` returns (the whole G) flow to the next ``configure_*`` as Flower passes
them, each round ends with a checkpoint, and a resumed run counts Flower's rounds on from
where it stopped.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fl_lota.federated import memory
from fl_lota.federated.aggregator import Aggregator, Upload
from fl_lota.federated.checkpoint import Checkpoint, save_checkpoint
from fl_lota.federated.downlink_server import Downlink
from fl_lota.federated.protocol import (
    EvalInstruction,
    EvalReport,
    GlobalRef,
    ReportError,
    TrainInstruction,
    TrainReport,
)
from fl_lota.federated.runconfig import RESUME_MAY_CHANGE, RunConfig
from wire import ARRAYS, CONFIG, content_bytes, metrics_of, payload_record, primary, record

from . import updates
from .book import RoundBook

__all__ = ["LotaFedAvg"]


def _split(replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
    """(replies with content, replies carrying an error); every content is checked later,
    reply by reply, so that one bad reply is refused alone (the round's line counts both)."""
    replies = list(replies)
    return [m for m in replies if not m.has_error()], [m for m in replies if m.has_error()]


def _why(e: Exception) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


class LotaFedAvg(FedAvg):
    def __init__(
        self,
        cfg: RunConfig,
        book: RoundBook,
        *,
        num_clients: int,
        shapes: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        # each round trains fraction-train of the clients (Flower samples them; at least
        # min-train-nodes, at least one); every client must be connected before a round starts
        n_train = cfg.min_train_nodes or 1
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=1.0,
            min_train_nodes=min(n_train, num_clients),
            min_evaluate_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.cfg = cfg
        self.book = book
        self.num_clients = num_clients
        self.aggregator = Aggregator(cfg, shapes)
        self.downlink = Downlink(cfg.values)  # what each node holds of G, and the change it needs
        self.run_tag = uuid.uuid4().hex  # names this run's client state (kept across resumes)
        self._t: dict[str, float] = {}
        self._peak_reset = False  # whether this round's peak memory started afresh (Linux)
        self._offset = 0  # rounds done before Flower's round 1 (a resumed run)
        self._checkpoint_dir: Path | None = None

    # ---- the rounds, with a checkpoint after each ---------------------------------------

    def run(self, grid: Grid, *, first_round: int = 1, checkpoint_dir: Path | None = None) -> None:
        """Rounds ``first_round .. num-server-rounds`` through Flower's own loop
        (``Strategy.start``); each round ends with the server state checkpointed atomically
        (``aggregate_evaluate``). Flower counts a resumed run's rounds from 1: the methods
        below add the rounds done before (``_offset``)."""
        self._offset, self._checkpoint_dir = first_round - 1, checkpoint_dir
        remaining = self.cfg.num_server_rounds - self._offset
        if remaining < 1:
            return
        if self._offset:
            log(INFO, "resuming after round %d: Flower's round 1 is round %d", self._offset, first_round)
        # G goes to each node as its own change (_to_nodes); the arrays Flower carries from
        # round to round are the whole G as aggregate_train returns it
        self.start(grid, payload_record(self.aggregator.global_payload), remaining, timeout=self.cfg.round_timeout)

    def checkpoint(self, server_round: int) -> Checkpoint:
        return Checkpoint(
            round=server_round,
            global_tv=self.aggregator.global_tv,
            masks=dict(self.aggregator.masks),
            rows=self.book.rows,
            config=self.cfg.resumable(),
            rng=random.getstate(),
            extra={"run_tag": self.run_tag, "owners": {str(p): n for p, n in self.aggregator.owners.items()}},
        )

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt`` (its config must match this run's, but for the round count)."""
        mine = self.cfg.resumable()
        theirs = {k: v for k, v in RunConfig.completed(ckpt.config).items() if k not in RESUME_MAY_CHANGE}
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"cannot resume: the run config differs from the checkpoint's in {diff}")
        owners = ckpt.extra.get("owners")
        if owners is None:  # a checkpoint from before node binding: masks keyed "p<partition>"
            owners = {int(k[1:]): k for k in ckpt.masks if k[:1] == "p" and k[1:].isdigit()}
        self.aggregator.restore(ckpt.global_tv, ckpt.masks, {int(p): n for p, n in owners.items()})
        # the nodes of a resumed run hold nothing this server knows of: each is sent all of G
        self.downlink = Downlink(self.cfg.values)
        self.downlink.publish(self.aggregator.global_tv, self.aggregator.global_payload)
        self.book.rows = list(ckpt.rows)
        random.setstate(ckpt.rng)
        self.run_tag = ckpt.extra.get("run_tag", self.run_tag)

    def _to_nodes(
        self,
        messages: list[Message],
        instruction: Callable[[str, GlobalRef], TrainInstruction | EvalInstruction],
        candidates: Mapping[str, bytes] | None = None,
    ) -> list[Message]:
        """Each message its own content (FedAvg gives all of them one RecordDict): G as the
        change from the version its node holds, the further merges' G (``candidates``,
        whole) and ``instruction(node, what the payload builds)`` as its config."""
        candidates = candidates or {}
        for m in messages:
            node = str(m.metadata.dst_node_id)
            sent = self.downlink.for_node(node)
            config = ConfigRecord(instruction(node, sent.ref).to_config())
            m.content = RecordDict({ARRAYS: payload_record(sent.payload, **candidates), CONFIG: config})
        return messages

    def is_eval_round(self, server_round: int) -> bool:
        return server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_server_rounds

    # ---- training ----------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self._offset
        self._t = {"round-start": time.perf_counter()}
        self._peak_reset = memory.reset_peak()  # the round's own peak (Linux; elsewhere none is recorded)
        self._online = {str(n) for n in grid.get_node_ids()}  # partitions of nodes that left may be taken over
        # Flower samples the nodes; what each is sent is built per node (_to_nodes)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        messages = self._to_nodes(
            messages,
            lambda node, g: TrainInstruction(
                server_round=server_round,
                run_tag=self.run_tag,
                g=g,
                eval_start=server_round == 1 and self.cfg.eval_base,
                eval_local=self.is_eval_round(server_round) and self.cfg.eval_local,
                register_mask=self.aggregator.needs_mask(node),  # the server holds no mask for it
            ),
        )
        self.book.start_round(server_round, {m.metadata.dst_node_id: content_bytes(m.content) for m in messages})
        self._t["train-sent"] = time.perf_counter()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self._offset
        t_recv = time.perf_counter()
        valid, errors = _split(replies)
        self._track(valid, errors)
        for msg in errors:
            log(WARNING, "round %d: client %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
            self.book.failure(msg.metadata.src_node_id, msg.error.reason)
        uploads = []
        for msg in valid:
            node = msg.metadata.src_node_id
            try:  # one guarded path per reply: whatever is wrong with it, only it is refused
                arrays = record(msg, ARRAYS, ArrayRecord)
                payload = primary(arrays)
                report = TrainReport.from_metrics(
                    metrics_of(msg),
                    num_clients=self.num_clients,
                    max_examples=self.cfg.max_client_examples,
                    max_items=self.cfg.n_test,
                )
                self._check_stream(server_round, report)
                self._check_tasks(report.partition, report.start_scores, report.local_scores, report.test_items)
                self.book.upload(node, content_bytes(msg.content), arrays.count_bytes(), report)
            except Exception as e:  # untrusted input: whatever breaks, only this reply is refused
                reason = f"client {node}: malformed reply: {_why(e)}"
                log(WARNING, "round %d: rejected reply: %s", server_round, reason)
                self.book.reject(node, reason)
                continue
            uploads.append(Upload(str(node), payload, report.weight, report, partition=report.partition))
        result = self.aggregator.aggregate(uploads, online=getattr(self, "_online", None))
        self.downlink.publish(self.aggregator.global_tv, self.aggregator.global_payload, self.aggregator.step)
        downlink_prep = self.downlink.prepare()
        try:  # each accepted upload to disk (fl-lota export reads them); the round goes on if this fails
            updates.spill(self.book.dir, self.aggregator, self.book)
        except OSError as e:
            log(WARNING, "round %d: the clients' updates were not written to %s: %s", server_round, self.book.dir, e)
        if result.merge_error:
            log(
                WARNING,
                "round %d: the merge failed (%s); the global model is unchanged",
                server_round,
                result.merge_error,
            )
        for client, reason in result.rejected.items():
            log(WARNING, "round %d: rejected upload: %s", server_round, reason)
            self.book.reject(int(client), reason)
        self.book.merged(result, train_wall=t_recv - self._t.get("train-sent", t_recv), downlink_prep=downlink_prep)
        self._log_clients("train")
        if result.too_few:
            log(
                WARNING,
                "round %d: %d usable upload(s), fewer than min-replies=%d; the global model is unchanged",
                server_round,
                len(result.accepted),
                self.cfg.min_replies,
            )
            return None, None
        return payload_record(self.aggregator.global_payload), MetricRecord(self.book.train_summary())

    def _track(self, valid: list[Message], errors: list[Message]) -> None:
        """A reply means its node rebuilt the G it was sent (the ClientApp fails otherwise);
        after a failure what the node holds is unknown, and it is sent the whole G next."""
        for msg in valid:
            self.downlink.confirm(str(msg.metadata.src_node_id))
        for msg in errors:
            self.downlink.forget(str(msg.metadata.src_node_id))

    def _check_stream(self, server_round: int, report: TrainReport) -> None:
        """The stream positions a client reports are where this round begins, and at most a
        round's examples long (they are expanded into the example list it trained on)."""
        start, end = report.stream_start, report.stream_end
        expected = self.cfg.stream_start(server_round)
        if start != expected:
            raise ReportError(f"field 'stream-start': {start!r}, but round {server_round} begins at {expected}")
        if not 0 <= end - start <= self.cfg.examples_per_round:
            raise ReportError(
                f"field 'stream-end': {end!r}, but a round trains on {self.cfg.examples_per_round} examples "
                f"from {expected}"
            )

    def _check_tasks(self, partition: int, *by_task: dict[str, object], merges: dict[str, dict] | None = None) -> None:
        """Per-task fields name only the tasks of the client's partition, and scores only
        the merges this run scores."""
        tasks = self.book.tasks_of(partition)
        for merge, scores in (merges or {}).items():
            if merge not in self.cfg.merges:
                raise ReportError(f"scores for {merge!r}, which is not a merge this run scores")
            by_task += (scores,)
        for fields in by_task:
            for name in fields:
                if name not in tasks:
                    raise ReportError(f"task {name!r} is not a task of partition {partition}")

    # ---- evaluation --------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self._offset
        self._t["eval-start"] = time.perf_counter()
        if not self.is_eval_round(server_round):
            return []
        # only nodes with an accepted upload are asked: their partition is bound to them, so
        # their scores can be checked (with client sampling, a node that has not trained yet
        # owns no partition, and its report would be refused)
        owners = set(self.aggregator.owners.values())
        messages = [
            m
            for m in super().configure_evaluate(server_round, arrays, config, grid)
            if str(m.metadata.dst_node_id) in owners
        ]
        # G goes to each node as its own change; the further merges' G whole, to be scored once
        further = {n: p for n, p in self.aggregator.candidates.items() if n != self.cfg.merge}
        messages = self._to_nodes(messages, lambda node, g: EvalInstruction(server_round, self.cfg.merge, g), further)
        self.book.eval_sent({m.metadata.dst_node_id: content_bytes(m.content) for m in messages})
        return messages

    def _log_clients(self, phase: str) -> None:
        """The per-client lines of this round; a line that cannot be written is skipped
        (what a client reported never stops the round)."""
        try:
            lines = self.book.client_lines(phase)
        except Exception as e:  # the lines are for people; the record is metrics.jsonl
            lines = [f"round {self.book.row.get('round')}: per-client lines not written ({type(e).__name__}: {e})"]
        for line in lines:
            log(INFO, "%s", line)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self._offset
        valid, errors = _split(replies)
        self._track(valid, errors)
        for msg in errors:
            node, why = msg.metadata.src_node_id, msg.error.reason
            log(WARNING, "round %d: client %s failed to evaluate: %s", server_round, node, why)
            self.book.failure(node, f"evaluate: {why}")
        scored: set[int] = set()
        for msg in valid:
            node = msg.metadata.src_node_id
            try:
                report = EvalReport.from_metrics(
                    metrics_of(msg), num_clients=self.num_clients, max_items=self.cfg.n_test
                )
                mine = self.aggregator.partition_of(str(node))
                if mine is not None and mine != report.partition:
                    raise ReportError(f"reports partition {report.partition}, but it is partition {mine}")
                owner = self.aggregator.owners.get(report.partition)
                if owner != str(node):
                    raise ReportError(
                        f"reports partition {report.partition}, which "
                        + (f"belongs to node {owner}" if owner else "no accepted upload of this node registered")
                    )
                if report.partition in scored:
                    raise ReportError(f"partition {report.partition} was already scored this round")
                self._check_tasks(report.partition, report.test_items, merges=report.scores)
            except Exception as e:  # untrusted input: whatever breaks, only this reply is refused
                reason = f"client {node}: malformed evaluate reply: {_why(e)}"
                log(WARNING, "round %d: rejected evaluation: %s", server_round, reason)
                self.book.reject(node, reason)
                continue
            scored.add(report.partition)
            self.book.evaluated(node, report)
        self._log_clients("evaluate")
        now = time.perf_counter()
        row = self.book.end_round(
            eval_wall=now - self._t.get("eval-start", now),
            round_wall=now - self._t.get("round-start", now),
            memory_mb={
                "rss": memory.rss_mb(),
                "peak": memory.peak_mb() if self._peak_reset else None,
            },
        )
        log(INFO, "%s", self.book.round_line(row))
        if self._checkpoint_dir is not None:  # the round is over: what a resume starts from
            save_checkpoint(self._checkpoint_dir, self.checkpoint(server_round))
        means = {f"score-mean@{m}": v for m, v in row["mean_score"].items()}
        return MetricRecord(means) if means else None
