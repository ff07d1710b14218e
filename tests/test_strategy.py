"""LotaFedAvg with mock replies (the Flower way to test a strategy): decoding, merging,
rejection of bad uploads, and the round's books."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from test_federated import sparse_tv

from fl_lota.federated.protocol import TrainReport
from fl_lota.federated.runconfig import RunConfig
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector
from server.book import RoundBook
from server.strategy import LotaFedAvg
from wire import PAYLOAD, content_bytes, fltv_array, payloads


@dataclass
class Meta:
    src_node_id: int


@dataclass
class Err:
    reason: str


@dataclass
class Reply:
    node: int
    content: RecordDict | None = None
    error: Err | None = None
    metadata: Meta = field(init=False)

    def __post_init__(self):
        self.metadata = Meta(self.node)

    def has_error(self) -> bool:
        return self.error is not None


def table_nnz(payload: bytes) -> int:
    """The values a payload holds, read from its tensor table (what an honest client
    reports); 0 for a payload that is not one."""
    try:
        return _table_nnz(payload)
    except (IndexError, ValueError):
        return 0


def _table_nnz(payload: bytes) -> int:
    import struct

    pos = codec.HEADER.size
    (n,) = struct.unpack_from("<I", payload, pos)
    pos, total = pos + 4, 0
    for _ in range(n):
        (name_len,) = struct.unpack_from("<H", payload, pos)
        pos += 2 + name_len
        ndim = payload[pos]
        pos += 1 + 8 * ndim
        _, nnz, _ = struct.unpack_from("<BQf", payload, pos)
        pos += struct.calcsize("<BQf")
        total += nnz
    return total


def train_reply(node: int, payload: bytes, partition: int, rnd: int = 1, **metrics) -> Reply:
    """A well-formed training reply of round ``rnd`` (what an honest client reports of
    ``payload``, 20 steps x batch 8 from where the round begins), with ``metrics`` changed."""
    per_round = RunConfig().examples_per_round
    honest = TrainReport(
        partition=partition,
        num_examples=16,
        load_seconds=0.5,
        train_seconds=2.0,
        codec_seconds=0.25,
        loss_first=1.5,
        loss_last=0.75,
        steps=20,
        fb_passes=20,
        train_examples=per_round,
        distinct_examples=16,
        stream_start=(rnd - 1) * per_round,
        stream_end=rnd * per_round,
        trained_params=100,
        nnz=table_nnz(payload),
        numel=100,
        payload_bytes=len(payload),
        values_only=payload[5:6] == b"\x01",  # the header's mode byte
        index_entropy_bytes=0.0,
    )
    m = honest.to_metrics() | metrics
    return Reply(node, RecordDict({"arrays": ArrayRecord({PAYLOAD: fltv_array(payload)}), "metrics": MetricRecord(m)}))


def eval_metrics(partition: float, **scores) -> dict[str, float]:
    """A well-formed evaluation report of ``partition`` holding ``scores``."""
    return {"partition-id": partition, "num-examples": 4.0, "eval-seconds": 1.0} | scores


MODEL = {"a": (8, 16), "b": (32,)}  # the parameters the mock clients train (sparse_tv's)


def make(tmp_path, **kw):
    """A strategy that checks uploads against the model's shapes, as the ServerApp's does."""
    cfg = RunConfig(federation="math,sql,classify", eval_merges="ties", **kw)
    book = RoundBook(cfg, tmp_path)
    return LotaFedAvg(cfg, book, num_clients=3, shapes=MODEL), book


def test_wire_arrays_carry_the_payload_bytes_exactly():
    p = codec.encode(sparse_tv(0))
    rec = ArrayRecord({PAYLOAD: fltv_array(p), f"{PAYLOAD}@ties": fltv_array(p[:50])})
    assert payloads(rec) == {"": p, "ties": p[:50]}
    assert rec.count_bytes() == len(p) + 50 + len(PAYLOAD) * 2 + len("@ties")
    assert content_bytes(RecordDict({"arrays": rec})) == rec.count_bytes()


def test_aggregate_train_merges_counts_bytes_and_rejects_bad_uploads(tmp_path):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 100, 12: 100, 13: 100})
    good = [codec.encode(sparse_tv(1)), codec.encode(sparse_tv(2))]
    replies = [
        train_reply(11, good[0], 0),
        train_reply(12, good[1], 1),
        train_reply(13, b"garbage" * 20, 2),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and payloads(arrays)[""] == strategy.aggregator.global_payload
    row = book.row
    assert row["accepted"] == 2 and row["partial"] is True
    assert "13" in row["rejected"] and "magic" in row["rejected"]["13"]
    assert row["uplink_payload_bytes"] == sum(len(p) for p in good) + len(b"garbage" * 20)
    assert row["uplink_array_bytes"] == row["uplink_payload_bytes"] + 3 * len(PAYLOAD)
    assert row["uplink_bytes"] > row["uplink_array_bytes"]  # metrics travel too
    assert metrics["uplink-bytes"] == row["uplink_bytes"]


def test_failed_replies_are_recorded_and_no_upload_keeps_the_global(tmp_path):
    strategy, book = make(tmp_path)
    before = strategy.aggregator.global_payload
    book.start_round(1, {11: 1, 12: 1})
    arrays, _ = strategy.aggregate_train(1, [Reply(11, error=Err("client crashed"))])
    assert arrays is None and strategy.aggregator.global_payload == before
    assert book.row["failures"] == {"11": "client crashed"}


def test_aggregate_evaluate_writes_one_row_per_round(tmp_path):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1})
    strategy.aggregate_train(
        1,
        [
            train_reply(11, codec.encode(sparse_tv(1)), 0, **{"local-score.math": 0.5, "n.math": 4.0}),
            train_reply(12, codec.encode(sparse_tv(2)), 1, **{"local-score.sql": 0.8, "n.sql": 4.0}),
        ],
    )
    evals = [
        Reply(
            11,
            RecordDict(
                {
                    "metrics": MetricRecord(
                        eval_metrics(0.0, **{"score.math@mask_aware": 0.25, "score.math@ties": 0.5, "n.math": 4.0})
                    )
                }
            ),
        ),
        Reply(
            12,
            RecordDict(
                {
                    "metrics": MetricRecord(
                        eval_metrics(
                            1.0, **{"score.sql@mask_aware": 0.4, "score.sql@ties": 0.2, "n.sql": 4.0, "eval-bf16": 1.0}
                        )
                    )
                }
            ),
        ),
    ]
    book.eval_sent({11: 1000, 12: 1200})
    out = strategy.aggregate_evaluate(1, evals)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    r = rows[0]
    assert r["scores"] == {"mask_aware": {"math": 0.25, "sql": 0.4}, "ties": {"math": 0.5, "sql": 0.2}}
    # the re-merge is labelled as such; local scores are kept apart and nothing divides by them
    assert r["remerged"] == ["ties"] and "normalized" not in r
    assert r["local_scores"] == {"math": 0.5, "sql": 0.8}
    # the evaluation downlink per client, not averaged
    assert [(c["client"], c["downlink_bytes"]) for c in r["eval_clients"]] == [("math", 1000), ("sql", 1200)]
    assert r["eval_downlink_bytes"] == 2200
    # the server's memory: what it holds at the end; no peak, since no round was started
    # here (configure_train starts the round's peak afresh: a lifetime peak is not a round's)
    mem = r["server_memory_mb"]
    assert mem["peak"] is None
    if sys.platform.startswith("linux"):
        assert mem["rss"] > 0
    # how each client generated, as it said (the first did not say)
    assert [c["eval_precision"] for c in r["eval_clients"]] == [None, "bf16-model"]
    assert r["cumulative_uplink_bytes"] == r["uplink_bytes"]
    assert out["score-mean@mask_aware"] == pytest.approx(0.325)


def test_the_register_mask_request_reaches_only_that_node(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    # FedAvg gives every message the same RecordDict: writing into one writes into all
    shared = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord({"server-round": 2})})

    def messages(self, server_round, arrays, config, grid):
        return [SimpleNamespace(content=shared, metadata=SimpleNamespace(dst_node_id=n)) for n in (11, 12, 13)]

    monkeypatch.setattr(FedAvg, "configure_train", messages)
    strategy, _ = make(tmp_path)
    strategy.aggregator.resend_mask.add("12")
    grid = SimpleNamespace(get_node_ids=lambda: [11, 12, 13])
    msgs = strategy.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
    flags = {m.metadata.dst_node_id: bool(m.content["config"].get("register-mask", False)) for m in msgs}
    assert flags == {11: False, 12: True, 13: False}


def test_the_books_hold_what_the_server_measured(tmp_path):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1, 13: 1})
    payloads_ = [codec.encode(sparse_tv(i)) for i in (1, 2, 3)]
    strategy.aggregate_train(
        1,
        [
            train_reply(11, payloads_[0], 0, **{"index-entropy-bytes": 1e15, "numel": 7.0}),
            train_reply(12, payloads_[1], 1, **{"payload-bytes": 1.0}),
            train_reply(13, payloads_[2], 2, **{"nnz": 1.0}),
        ],
    )
    row = book.row
    assert row["accepted"] == 1
    assert "reports payload-bytes 1" in row["rejected"]["12"] and "reports nnz 1" in row["rejected"]["13"]
    (c,) = [c for c in row["clients"] if c["node"] == "11"]
    tv = sparse_tv(1)
    assert c["numel"] == tv.numel and c["nnz"] == tv.nnz and c["payload_bytes"] == len(payloads_[0])
    assert 0 < c["index_entropy_bytes"] < 1e6 and row["index_entropy_bytes"] == c["index_entropy_bytes"]


def test_the_log_has_one_line_per_client_and_phase(tmp_path, monkeypatch):
    import server.strategy as strategy_module

    lines: list[str] = []
    monkeypatch.setattr(strategy_module, "log", lambda level, fmt, *args: lines.append(fmt % args))
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1, 13: 1})
    phases = {"seconds.calibrate": 35.25, "seconds.extract": 0.5, "seconds.sparse_adapt": 36.0, "train-seconds": 71.75}
    loss = {"loss-first": 2.25, "loss-last": 0.5}
    strategy.aggregate_train(
        1,
        [
            train_reply(12, codec.encode(sparse_tv(2)), 1, **{"seconds.train": 12.0, "train-seconds": 12.0}),
            train_reply(11, codec.encode(sparse_tv(1)), 0, **phases, **loss, **{"gpu-peak-bytes": 3 * 2.0**30}),
            train_reply(13, b"garbage" * 20, 2, **{"loss-first": 1.0, "train-seconds": 3.0}),  # refused
        ],
    )
    size = len(codec.encode(sparse_tv(1))) / 1e6
    assert lines.pop(0).startswith("round 1: rejected upload: client 13")  # the warning, then the lines
    assert lines == [
        f"round 1 math: train 71.8 s (calibrate 35.2 s, extract 0.5 s, sparse_adapt 36.0 s), loss 2.250 -> 0.500, "
        f"upload {size:.2f} MB (indices + values), GPU peak 3.00 GiB",
        f"round 1 sql: train 12.0 s (train 12.0 s), loss 1.500 -> 0.750, upload "
        f"{len(codec.encode(sparse_tv(2))) / 1e6:.2f} MB (indices + values)",
        "round 1 classify: train 3.0 s, loss 1.000 -> 0.750, upload refused (reason above)",
    ]
    lines.clear()
    m = eval_metrics(0.0, **{"score.math@mask_aware": 0.25, "score.math@ties": 0.5, "n.math": 4.0})
    book.eval_sent({11: 1})
    strategy.aggregate_evaluate(1, [Reply(11, RecordDict({"metrics": MetricRecord(m | {"eval-seconds": 40.0})}))])
    assert lines[0] == "round 1 math: evaluate 40.0 s, math=0.250"
    assert lines[1].startswith("round 1: 2/3 uploads")  # the round's summary line follows


def test_the_results_folder_keeps_every_scored_merge_and_each_clients_last_update(tmp_path):
    from server import updates

    strategy, book = make(tmp_path)
    agg = strategy.aggregator
    t1, t2 = sparse_tv(1), sparse_tv(2)
    book.start_round(1, {11: 1, 12: 1})
    strategy.aggregate_train(1, [train_reply(11, codec.encode(t1), 0), train_reply(12, codec.encode(t2), 1)])
    # round 2: sql uploads values only, math is absent; the server holds no upload in memory after
    book.start_round(2, {12: 1})
    v2 = t2.with_values({n: t.values * 3 for n, t in t2.items()})
    strategy.aggregate_train(2, [train_reply(12, codec.encode(v2, values_only=True), 1, rnd=2)])
    assert set(agg.last) == {"12"}  # this round's only
    (tmp_path / "global_update@fedavg.safetensors").write_bytes(b"from an earlier run of this folder")
    assert updates.finish(tmp_path, agg, strategy.cfg) == []
    assert SparseTaskVector.load(tmp_path / "global_update.safetensors").nnz == agg.global_tv.nnz
    ties = SparseTaskVector.load(tmp_path / "global_update@ties.safetensors")
    want = codec.decode(agg.candidates["ties"])
    assert all(torch.equal(ties.get(n).values, want.get(n).values) for n in want)
    assert not (tmp_path / "global_update@fedavg.safetensors").exists()  # a stale re-merge is not kept
    folder = tmp_path / "client_updates"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "p0-math.safetensors",
        "p1-sql.safetensors",
    ]
    sql = SparseTaskVector.load(folder / "p1-sql.safetensors")  # round 2's values on round 1's mask
    want = codec.decode(codec.encode(v2))
    assert all(torch.equal(sql.get(n).indices, want.get(n).indices) for n in want)
    assert all(torch.equal(sql.get(n).values, want.get(n).values) for n in want)
    math_ = SparseTaskVector.load(folder / "p0-math.safetensors")  # its last accepted: round 1's
    assert all(torch.equal(math_.get(n).values, codec.decode(codec.encode(t1)).get(n).values) for n in t1)


def test_fraction_train_samples_that_share_and_evaluation_asks_only_bound_nodes(tmp_path, monkeypatch):
    """fraction-train=0.25 of 8 connected clients trains 2 per round (different ones across
    rounds: Flower's sampling); evaluation goes to the nodes whose upload was
    accepted, since an unbound node's report would be refused."""
    import random
    from types import SimpleNamespace

    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp process has set
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = RunConfig(federation="math,sql;clients=8;alpha=1.0", fraction_train=0.25)
    strategy = LotaFedAvg(cfg, RoundBook(cfg, tmp_path), num_clients=8)
    nodes = list(range(101, 109))
    grid = SimpleNamespace(get_node_ids=lambda: nodes)
    random.seed(0)  # Flower samples with the global random (a checkpoint saves its state)
    sampled = []
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        sampled.append({m.metadata.dst_node_id for m in msgs})
    assert all(len(s) == 2 for s in sampled)
    assert len(set().union(*sampled)) > 2  # not the same two every round
    strategy.aggregator.owners = {0: "103", 5: "107"}
    asked = {m.metadata.dst_node_id for m in strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)}
    assert asked == {103, 107}
    full = LotaFedAvg(
        RunConfig(federation="math,sql;clients=8;alpha=1.0"), RoundBook(cfg, tmp_path / "b"), num_clients=8
    )
    assert len(list(full.configure_train(1, ArrayRecord(), ConfigRecord(), grid))) == 8  # the default: all
