"""LotaFedAvg against hostile and broken replies (mock replies, as in test_strategy): each
bad reply is refused for its round, named and counted, and nothing crashes; a node cannot
take another node's partition or mask."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from test_federated import sparse_tv
from test_strategy import Err, Reply, eval_metrics, make, train_reply

from fl_lota.vectors import codec
from wire import PAYLOAD, fltv_array

# ---- hostile replies: each is refused for its round, named and counted; nothing crashes


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("num-examples", 0.0, "num-examples"),
        ("num-examples", -5.0, "num-examples"),
        ("num-examples", 1e38, "num-examples"),  # would own the merge
        ("num-examples", float("nan"), "num-examples"),
        ("partition-id", float("nan"), "partition-id"),
        ("partition-id", 1e30, "partition-id"),
        ("partition-id", 1.5, "partition-id"),
        ("partition-id", -1.0, "partition-id"),
        ("nnz", float("inf"), "nnz"),
        ("payload-bytes", -1.0, "payload-bytes"),
        ("train-seconds", -3.0, "train-seconds"),
        ("local-score.math", 7.0, "local-score.math"),
        ("n.math", 1e12, "n.math"),
        ("sneaky", 1.0, "unknown field 'sneaky'"),
    ],
)
def test_a_reply_with_a_bad_field_is_refused_by_name_and_the_round_goes_on(tmp_path, field, value, needle):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1})
    good = train_reply(11, codec.encode(sparse_tv(1)), 0)
    bad = train_reply(12, codec.encode(sparse_tv(2)), 1, **{field: value})
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert arrays is not None and book.row["accepted"] == 1
    assert needle in book.row["rejected"]["12"] and "client 12" in book.row["rejected"]["12"]


HOSTILE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0.0, -0.0, 1e38, -1e38, 2.0**53, 1e-300]),
)
KEYS = [
    "num-examples", "partition-id", "payload-bytes", "nnz", "numel", "values-only", "loss-first", "train-seconds",
    "fb-passes", "local-score.math", "n.math", "seconds.train",
]  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), HOSTILE, max_size=6))
def test_hostile_metric_values_never_crash_the_server(tmp_path, edits):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1})
    replies = [train_reply(11, codec.encode(sparse_tv(1)), 0), train_reply(12, codec.encode(sparse_tv(2)), 1, **edits)]
    strategy.aggregate_train(1, replies)  # never raises
    assert book.row["accepted"] + len(book.row["rejected"]) == 2
    assert "11" not in book.row["rejected"]
    evals = [
        Reply(12, RecordDict({"metrics": MetricRecord(eval_metrics(1.0, **{"n.sql": 4.0}) | {
            k.replace("local-score", "score") + ("@mask_aware" if k.startswith("local-score") else ""): v
            for k, v in edits.items() if k in ("partition-id", "n.math", "local-score.math")
        })}))
    ]  # fmt: skip
    strategy.aggregate_evaluate(1, evals)  # never raises
    g = strategy.aggregator.global_tv
    assert all(torch.isfinite(t.values).all() for t in g.values())


def test_a_node_cannot_take_another_nodes_partition_or_mask(tmp_path):
    strategy, book = make(tmp_path)
    agg = strategy.aggregator
    victim_tv, attack_tv = sparse_tv(1), sparse_tv(7)
    strategy._online = {"11", "12", "66"}
    book.start_round(1, {11: 1, 12: 1, 66: 1})
    strategy.aggregate_train(
        1,
        [
            train_reply(11, codec.encode(victim_tv), 0),
            train_reply(12, codec.encode(sparse_tv(2)), 1),
            train_reply(66, codec.encode(attack_tv), 0),  # claims the victim's partition
        ],
    )
    assert "belongs to node 11" in book.row["rejected"]["66"]
    assert agg.owners[0] == "11" and set(agg.masks) == {"11", "12"}
    book.start_round(2, {11: 1, 66: 1})
    strategy.aggregate_train(
        2,
        [
            train_reply(11, codec.encode(victim_tv, values_only=True), 0, rnd=2),  # still decodes against its own mask
            train_reply(66, codec.encode(attack_tv, values_only=True), 2, rnd=2),  # no mask of its own
            train_reply(12, codec.encode(sparse_tv(2), values_only=True), 0, rnd=2),  # a node changing its partition
        ],
    )
    assert book.row["accepted"] == 1 and "11" not in book.row["rejected"]
    assert "no mask registered" in book.row["rejected"]["66"]
    assert "it is partition 1" in book.row["rejected"]["12"]
    # after a restart every node id is new: the first node to report partition 0 with the
    # victim's mask takes it over (a resumed run goes on with values-only uploads)
    strategy._online = {"21", "22"}
    book.start_round(3, {21: 1, 22: 1})
    strategy.aggregate_train(3, [train_reply(21, codec.encode(victim_tv, values_only=True), 0, rnd=3)])
    assert book.row["accepted"] == 1 and agg.owners[0] == "21" and "11" not in agg.masks


def test_an_eval_reply_claiming_another_partition_is_refused(tmp_path):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1})
    strategy.aggregate_train(
        1, [train_reply(11, codec.encode(sparse_tv(1)), 0), train_reply(12, codec.encode(sparse_tv(2)), 1)]
    )
    lie = Reply(
        12, RecordDict({"metrics": MetricRecord(eval_metrics(0.0, **{"score.math@mask_aware": 1.0, "n.math": 4.0}))})
    )
    nan = Reply(11, RecordDict({"metrics": MetricRecord(eval_metrics(float("nan"), **{"score.math@mask_aware": 0.5}))}))
    strategy.aggregate_evaluate(1, [lie, nan])
    row = book.rows[-1]
    assert "it is partition 1" in row["rejected"]["12"] and "partition-id" in row["rejected"]["11"]
    assert row["scores"] == {}


def test_a_merge_that_fails_leaves_the_global_model_and_the_run_going(tmp_path, monkeypatch):
    from fl_lota.federated import aggregator as fedserver

    strategy, book = make(tmp_path)
    before = strategy.aggregator.global_payload

    def broken(*a, **k):  # fails as the encoder asks for the first tensor of G + merge
        def tensors():
            raise FloatingPointError("overflow in the weighted sum")
            yield

        return tensors

    monkeypatch.setattr(fedserver, "merge_tensors", broken)
    book.start_round(1, {11: 1})
    strategy.aggregate_train(1, [train_reply(11, codec.encode(sparse_tv(1)), 0)])
    assert strategy.aggregator.global_payload == before
    assert not book.row["global_updated"] and "overflow" in book.row["merge_error"]


def test_stream_positions_must_be_this_rounds(tmp_path):
    strategy, book = make(tmp_path)  # 20 steps x batch 8 per round by default
    book.start_round(2, {11: 1, 12: 1, 13: 1})
    ok = {"stream-start": 160.0, "stream-end": 320.0}
    replies = [
        train_reply(11, codec.encode(sparse_tv(1)), 0, **ok),
        train_reply(12, codec.encode(sparse_tv(2)), 1, **{"stream-start": 160.0, "stream-end": 5e6}),
        train_reply(13, codec.encode(sparse_tv(3)), 2, **{"stream-start": 0.0, "stream-end": 160.0}),
    ]
    strategy.aggregate_train(2, replies)
    assert book.row["accepted"] == 1
    assert "'stream-end'" in book.row["rejected"]["12"] and "'stream-start'" in book.row["rejected"]["13"]
    (c,) = book.row["clients"]
    assert c["examples_seen"]["stream_start"] == 160 and len(c["examples_seen"]["indices"]) == 160


def test_an_upload_that_does_not_fit_the_model_is_refused_by_name(tmp_path):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1})
    alien = sparse_tv(2, shapes={"a": (8, 16), "lm_head.evil": (32,)})
    strategy.aggregate_train(
        1, [train_reply(11, codec.encode(sparse_tv(1)), 0), train_reply(12, codec.encode(alien), 1)]
    )
    assert book.row["accepted"] == 1 and "'lm_head.evil' is not one the receiver accepts" in book.row["rejected"]["12"]


def test_records_of_the_wrong_kind_are_refused_not_crashing(tmp_path):

    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1, 13: 1})
    good = train_reply(11, codec.encode(sparse_tv(1)), 0)
    as_metrics = train_reply(12, codec.encode(sparse_tv(2)), 1)
    as_metrics.content["arrays"] = MetricRecord({"fltv": 1.0})
    no_metrics = Reply(13, RecordDict({"arrays": ArrayRecord({PAYLOAD: fltv_array(codec.encode(sparse_tv(3)))})}))
    no_metrics.content["config"] = ConfigRecord({"x": 1})
    strategy.aggregate_train(1, [good, as_metrics, no_metrics])
    assert book.row["accepted"] == 1
    assert "not an ArrayRecord" in book.row["rejected"]["12"]
    assert "no 'metrics' record" in book.row["rejected"]["13"]


def _eval(node: int, partition: int, **scores) -> Reply:
    return Reply(node, RecordDict({"metrics": MetricRecord(eval_metrics(float(partition), **scores))}))


def test_evaluations_count_only_from_a_partitions_owner_for_its_own_tasks(tmp_path):
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1, 13: 1})
    strategy.aggregate_train(
        1,
        [
            train_reply(11, codec.encode(sparse_tv(1)), 0),
            train_reply(12, codec.encode(sparse_tv(2)), 1),
            train_reply(13, b"garbage" * 20, 2),  # refused: it owns nothing
        ],
    )
    strategy.aggregate_evaluate(
        1,
        [
            _eval(11, 0, **{"score.math@mask_aware": 0.2, "n.math": 4.0}),
            _eval(13, 0, **{"score.math@mask_aware": 1.0, "n.math": 4.0}),  # not the owner of 0
            _eval(13, 2, **{"score.classify@mask_aware": 1.0}),  # its upload was refused: owns nothing
            _eval(11, 0, **{"score.math@mask_aware": 1.0, "n.math": 4.0}),  # a second score for 0
            _eval(12, 1, **{"score.sql@mask_aware": 0.4, "score.invented@mask_aware": 1.0}),  # not its task
        ],
    )
    row = book.rows[-1]
    assert row["scores"] == {"mask_aware": {"math": 0.2}}
    assert "belongs to node 11" in row["rejected"]["13"] and "no accepted upload" in row["rejected"]["13"]
    assert "already scored" in row["rejected"]["11"]
    assert "'invented' is not a task of partition 1" in row["rejected"]["12"]
    strategy.aggregate_evaluate(2, [_eval(12, 1, **{"score.sql@fedavg": 0.4})])
    assert "not a merge this run scores" in book.rows[-1]["rejected"]["12"]


def test_an_owner_keeps_or_gets_back_its_partition(tmp_path):
    strategy, book = make(tmp_path)
    agg = strategy.aggregator
    victim_tv = sparse_tv(1)
    strategy._online = {"11", "12", "99"}
    book.start_round(1, {11: 1, 12: 1})
    strategy.aggregate_train(
        1, [train_reply(11, codec.encode(victim_tv), 0), train_reply(12, codec.encode(sparse_tv(2)), 1)]
    )
    # node 11 was online in this server's lifetime: offline now, its partition is not up for grabs
    strategy._online = {"12", "99"}
    book.start_round(2, {12: 1, 99: 1})
    strategy.aggregate_train(2, [train_reply(99, codec.encode(sparse_tv(7)), 0, rnd=2)])
    assert "only an upload encoded against that node's registered mask" in book.row["rejected"]["99"]
    assert agg.owners[0] == "11"
    # after a server restart node 11 has not been seen yet, and node 99 is first to claim partition 0
    again, book2 = make(tmp_path / "again")
    again.restore(strategy.checkpoint(2))
    agg2 = again.aggregator
    again._online = {"12", "99"}
    book2.start_round(3, {12: 1, 99: 1})
    again.aggregate_train(3, [train_reply(99, codec.encode(sparse_tv(7)), 0, rnd=3)])
    assert agg2.owners[0] == "99"
    # node 11 comes back: its partition is its own again. Its values-only upload finds 99's mask,
    # so it is asked for a full upload (register-mask), which takes the partition back
    again._online = {"11", "12", "99"}
    book2.start_round(4, {11: 1})
    again.aggregate_train(4, [train_reply(11, codec.encode(victim_tv, values_only=True), 0, rnd=4)])
    assert "fingerprint" in book2.row["rejected"]["11"] and agg2.needs_mask("11")
    book2.start_round(5, {11: 1, 99: 1})
    again.aggregate_train(
        5, [train_reply(11, codec.encode(victim_tv), 0, rnd=5), train_reply(99, codec.encode(sparse_tv(7)), 0, rnd=5)]
    )
    assert agg2.owners[0] == "11" and not agg2.needs_mask("11") and "99" not in agg2.masks
    assert "belongs to node 11" in book2.row["rejected"]["99"]
    # a whole new federation (a restarted simulation: every id new) takes the partitions over
    fresh, book3 = make(tmp_path / "fresh")
    fresh.restore(strategy.checkpoint(2))
    fresh._online = {"31", "32"}
    book3.start_round(3, {31: 1, 32: 1})
    fresh.aggregate_train(
        3,
        [
            train_reply(31, codec.encode(sparse_tv(5)), 0, rnd=3),
            train_reply(32, codec.encode(sparse_tv(2), values_only=True), 1, rnd=3),
        ],
    )
    assert book3.row["accepted"] == 2 and fresh.aggregator.owners == {0: "31", 1: "32"}


def test_a_reply_without_its_payload_and_a_failed_client_are_named(tmp_path, monkeypatch):
    import server.strategy as strategy_module

    lines: list[str] = []
    monkeypatch.setattr(strategy_module, "log", lambda level, fmt, *args: lines.append(fmt % args))
    strategy, book = make(tmp_path)
    book.start_round(1, {11: 1, 12: 1, 13: 1})
    good = train_reply(11, codec.encode(sparse_tv(1)), 0)
    empty = train_reply(12, codec.encode(sparse_tv(2)), 1)
    empty.content["arrays"] = ArrayRecord()
    strategy.aggregate_train(1, [good, empty, Reply(13, error=Err("out of memory on node 13"))])
    assert book.row["accepted"] == 1 and "carry no 'fltv' payload" in book.row["rejected"]["12"]
    assert "round 1: client 13 failed: out of memory on node 13" in lines  # on the console, not only in the books
