"""The round protocol: every message round-trips through its flat map, and a missing,
misspelled or ill-typed key is an error that names it, never a silent 0."""

from __future__ import annotations

import dataclasses

import pytest

from fl_lota.federated.protocol import (
    EMPTY,
    EvalInstruction,
    EvalReport,
    GlobalRef,
    ProtocolError,
    ReportError,
    TrainInstruction,
    TrainReport,
)

REF = GlobalRef("abc", "def", "values")
TRAIN = TrainReport(
    partition=1,
    num_examples=64,
    load_seconds=0.5,
    train_seconds=12.0,
    codec_seconds=0.25,
    loss_first=2.5,
    loss_last=0.75,
    steps=20,
    fb_passes=30,
    train_examples=160,
    distinct_examples=64,
    stream_start=160,
    stream_end=320,
    trained_params=1000,
    nnz=100,
    numel=1000,
    payload_bytes=321,
    values_only=True,
    index_entropy_bytes=0.0,
    eval_seconds=3.0,
    phase_seconds={"calibrate": 4.0, "sparse_adapt": 8.0},
    start_scores={"math": 0.25},
    local_scores={"math": 0.5},
    test_items={"math": 100},
)
EVAL = EvalReport(
    partition=1,
    num_examples=100,
    eval_seconds=3.0,
    gpu_peak_bytes=2**30,
    scores={"mask_aware": {"math": 0.5}, "ties": {"math": 0.25}},
    test_items={"math": 100},
)


def test_instructions_round_trip_and_name_what_is_wrong():
    todo = TrainInstruction(server_round=3, run_tag="r1", g=REF, eval_local=True, register_mask=True)
    assert TrainInstruction.from_config(todo.to_config()) == todo
    plain = TrainInstruction(server_round=3, run_tag="r1", g=REF)
    assert "register-mask" not in plain.to_config()  # only where asked
    assert TrainInstruction.from_config(plain.to_config()) == plain
    ev = EvalInstruction(2, "ties", GlobalRef(EMPTY, "d"))
    assert EvalInstruction.from_config(ev.to_config()) == ev
    for key in ("server-round", "fl-lota-run", "eval-start", "g-base", "g-digest", "g-mode"):
        raw = dict(plain.to_config())
        del raw[key]
        with pytest.raises(ProtocolError, match=f"'{key}' is missing"):
            TrainInstruction.from_config(raw)
    with pytest.raises(ProtocolError, match="eval-locl"):
        TrainInstruction.from_config(plain.to_config() | {"eval-locl": True})
    with pytest.raises(ProtocolError, match="'server-round': expected int"):
        TrainInstruction.from_config(plain.to_config() | {"server-round": True})
    with pytest.raises(ProtocolError, match="g-mode"):
        GlobalRef("a", "b", "bits")


def test_reports_round_trip_exactly():
    assert TrainReport.from_metrics(TRAIN.to_metrics(), num_clients=2, max_examples=64, max_items=100) == TRAIN
    assert EvalReport.from_metrics(EVAL.to_metrics(), num_clients=2, max_items=100) == EVAL
    m = TRAIN.to_metrics()
    assert m["seconds.calibrate"] == 4.0 and m["n.math"] == 100.0 and m["values-only"] == 1.0
    assert "gpu-peak-bytes" not in m  # absent off a GPU, not 0
    assert EVAL.to_metrics()["score.math@ties"] == 0.25


@pytest.mark.parametrize("field", [f for f in dataclasses.fields(TrainReport) if not f.metadata["optional"]])
def test_a_report_missing_any_required_field_is_refused_by_name(field):
    raw = TRAIN.to_metrics()
    del raw[field.metadata["key"]]
    with pytest.raises(ReportError, match=f"'{field.metadata['key']}' is missing"):
        TrainReport.from_metrics(raw, num_clients=2, max_examples=64)


def test_misspelled_and_malformed_keys_are_refused_by_name():
    with pytest.raises(ReportError, match="unknown field 'payload_bytes'"):
        TrainReport.from_metrics(TRAIN.to_metrics() | {"payload_bytes": 1.0}, num_clients=2, max_examples=64)
    with pytest.raises(ReportError, match=r"score\.math"):
        EvalReport.from_metrics(EVAL.to_metrics() | {"score.math": 0.5}, num_clients=2)  # no merge named
    with pytest.raises(ReportError, match=r"'n\.math': 101 test items"):
        EvalReport.from_metrics(EVAL.to_metrics() | {"n.math": 101.0}, num_clients=2, max_items=100)
    with pytest.raises(ReportError, match="'num-examples': 65"):
        TrainReport.from_metrics(TRAIN.to_metrics() | {"num-examples": 65.0}, num_clients=2, max_examples=64)
