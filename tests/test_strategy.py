"""LotaFedAvg with mock replies (the Flower way to test a strategy): decoding, merging,
rejection of bad uploads, and the round's books."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, MetricRecord, RecordDict
from test_federated import sparse_tv

from clients.wire import PAYLOAD, content_bytes, fltv_array, payloads
from fl_lota import codec
from fl_lota.runconfig import RunConfig
from server.book import RoundBook
from server.strategy import LotaFedAvg


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


def train_reply(node: int, payload: bytes, partition: int, **metrics) -> Reply:
    m = {"num-examples": 16.0, "partition-id": float(partition), "payload-bytes": float(len(payload))} | metrics
    return Reply(node, RecordDict({"arrays": ArrayRecord({PAYLOAD: fltv_array(payload)}), "metrics": MetricRecord(m)}))


def make(tmp_path, **kw):
    cfg = RunConfig(federation="math,sql,classify", eval_merges="ties", **kw)
    book = RoundBook(cfg, tmp_path)
    return LotaFedAvg(cfg, book, num_clients=3), book


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
                        {"score.math@mask_aware": 0.25, "score.math@ties": 0.5, "n.math": 4.0, "partition-id": 0.0}
                    )
                }
            ),
        ),
        Reply(
            12,
            RecordDict(
                {
                    "metrics": MetricRecord(
                        {"score.sql@mask_aware": 0.4, "score.sql@ties": 0.2, "n.sql": 4.0, "partition-id": 1.0}
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
    assert r["cumulative_uplink_bytes"] == r["uplink_bytes"]
    assert out["score-mean@mask_aware"] == pytest.approx(0.325)
