"""The federated round without Flower: LocalNode (client) and Aggregator (server)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codec import resign

from fl_lota.federated.aggregator import MAX_UPDATE_ABS, Aggregator, Upload
from fl_lota.federated.node import LocalNode, load_base
from fl_lota.federated.runconfig import RunConfig, RunConfigError
from fl_lota.merging.merge import merge
from fl_lota.training.data import stream_order
from fl_lota.vectors import codec, lowrank
from fl_lota.vectors.task_vector import PackedTensor, SparseTaskVector, SparseTensor

TINY = dict(
    model="tiny",
    federation="math,classify",
    calibration_steps=1,
    local_steps=3,
    batch_size=4,
    max_len=64,
    n_train=16,
    n_test=4,
    bf16=False,
    device="cpu",
)


def sparse_tv(seed: int, density: float = 0.1, shapes=None) -> SparseTaskVector:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a": (8, 16), "b": (32,)}
    out = {}
    for name, shape in shapes.items():
        n = int(torch.tensor(shape).prod())
        idx = torch.randperm(n, generator=g)[: max(1, int(density * n))].sort().values
        out[name] = SparseTensor(shape, idx, torch.randn(idx.numel(), generator=g))
    return SparseTaskVector(out)


def test_add_is_the_sum_on_the_union_of_supports():
    a, b = sparse_tv(0), sparse_tv(1)
    s = a.add(b, scale=0.5)
    for name in a:
        want = a[name].to_dense() + 0.5 * b[name].to_dense()
        assert torch.allclose(s[name].to_dense(), want)
        assert s[name].nnz == int((a[name].mask() | b[name].mask()).sum())
    full = SparseTaskVector({"a": SparseTensor((2,), None, torch.ones(2))})
    assert full.add(SparseTaskVector({"a": SparseTensor((2,), torch.tensor([1]), torch.ones(1))}))["a"].is_dense
    with pytest.raises(ValueError, match="shapes"):
        full.add(SparseTaskVector({"a": SparseTensor((3,), None, torch.ones(3))}))


def test_aggregator_registers_masks_and_decodes_values_only_uploads():
    cfg = RunConfig(values="float32", merge="mask_aware", eval_merges="ties,fedavg")
    agg = Aggregator(cfg)
    t1, t2 = sparse_tv(0), sparse_tv(1)
    r1 = agg.aggregate(
        [Upload("1", codec.encode(t1, values="float32"), 10), Upload("2", codec.encode(t2, values="float32"), 30)]
    )
    assert r1.accepted == ["1", "2"] and not r1.rejected
    want = merge("mask_aware", [t1, t2], [10, 30])
    for n in want:
        assert torch.allclose(agg.global_tv[n].to_dense(), want[n].to_dense())
    assert set(agg.candidates) == {"mask_aware", "ties", "fedavg"}
    assert agg.global_payload == agg.candidates["mask_aware"]
    # a registered mask keeps the upload's entries, not its values (one shared zero)
    for c, t in (("1", t1), ("2", t2)):
        for n, m in agg.masks[c].items():
            assert torch.equal(m.indices, t[n].indices) and m.values.stride() == (0,) and not m.values.any()
    # round 2: values only, decoded against the registered masks
    v1 = t1.with_values({n: t.values * 2 for n, t in t1.items()})
    g1 = agg.global_tv
    r2 = agg.aggregate([Upload("1", codec.encode(v1, values="float32", values_only=True), 10)])
    assert r2.accepted == ["1"]
    for n in t1:
        assert torch.allclose(agg.global_tv[n].to_dense(), g1[n].to_dense() + v1[n].to_dense())


def test_global_update_is_what_clients_decode():
    agg = Aggregator(RunConfig(values="bf16"))
    agg.aggregate([Upload("1", codec.encode(sparse_tv(0)), 1), Upload("2", codec.encode(sparse_tv(1)), 1)])
    received = codec.decode(agg.global_payload)
    for n in received:
        assert torch.equal(received[n].values, agg.global_tv[n].values.float())
        assert torch.equal(received[n].flat_indices(), agg.global_tv[n].flat_indices())
    # held compactly: G's bf16 values as bfloat16 (exact), positions and masks as int32
    for t in [*agg.global_tv.values(), *(m for mask in agg.masks.values() for m in mask.values())]:
        assert t.indices is None or t.indices.dtype == torch.int32
    assert all(t.values.dtype == torch.bfloat16 for t in agg.global_tv.values())


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: codec.encode(sparse_tv(0), values_only=True), "no mask registered"),
        (lambda: b"FLTV" + bytes(60), "version"),
        (lambda: codec.encode(sparse_tv(0))[:-1] + b"\x00", "checksum"),
        (lambda: b"not a payload at all, sorry" * 3, "magic"),
        (lambda: bytes(10), "truncated"),
    ],
)
def test_bad_uploads_are_rejected_by_name_and_the_round_goes_on(make, reason):
    agg = Aggregator(RunConfig())
    good = sparse_tv(3)
    r = agg.aggregate([Upload("7", make(), 1), Upload("8", codec.encode(good), 1)])
    assert r.accepted == ["8"]
    assert "client 7" in r.rejected["7"] and reason in r.rejected["7"].lower()


def test_oversized_uploads_are_refused_before_decoding():
    agg = Aggregator(RunConfig(max_upload_mb=0.0001))  # 100 bytes
    r = agg.aggregate([Upload("1", codec.encode(sparse_tv(0, density=0.9)), 1)])
    assert not r.accepted and "1" in r.rejected
    assert agg.global_tv.nnz == 0  # nothing merged, global unchanged


def test_lota_client_uploads_full_then_values_only_and_the_server_follows():
    cfg = RunConfig(**TINY)
    node = LocalNode(cfg, 0)
    assert [t.name for t in node.data.tasks] == ["math"]
    agg = Aggregator(cfg)
    first = node.train(agg.global_payload, eval_start=True, eval_local=True)
    assert not first.values_only and first.mask_payload == first.payload
    assert "start-score.math" in first.metrics and "local-score.math" in first.metrics
    assert first.metrics["nnz"] == pytest.approx(0.1 * first.metrics["numel"], rel=0.01)
    r = agg.aggregate([Upload("n0", first.payload, first.metrics["num-examples"])])
    assert r.accepted == ["n0"]
    second = node.train(agg.global_payload, first.mask_payload)
    assert second.values_only and second.mask_payload is None
    assert len(second.payload) < len(first.payload)
    g1 = agg.global_tv
    r = agg.aggregate([Upload("n0", second.payload, second.metrics["num-examples"])])
    assert r.accepted == ["n0"]
    # the support never leaves the registered mask
    mask = codec.decode(first.mask_payload).masks()
    for n, t in agg.global_tv.items():
        assert not (t.mask() & ~mask[n]).any()
    assert any(not torch.equal(agg.global_tv[n].values, g1[n].values) for n in g1)


def test_each_round_continues_through_the_local_data():
    cfg = RunConfig(**TINY, method="fft", merge="fedavg")
    node = LocalNode(cfg, 0)
    empty = codec.encode(SparseTaskVector())
    r1, r2 = node.train(empty, server_round=1), node.train(empty, server_round=2)
    per_round = cfg.local_steps * cfg.batch_size  # 12 of the 16 examples
    assert (r1.metrics["stream-start"], r2.metrics["stream-start"]) == (0, per_round)
    assert r1.seen == stream_order(16, node.stream_seed, 0, per_round)
    assert r2.seen == stream_order(16, node.stream_seed, per_round, per_round)
    assert set(r1.seen) | set(r2.seen) == set(range(16))  # round 2 reaches the examples round 1 left
    assert r1.seen != r2.seen[: len(r1.seen)]
    # the same round again (a resumed run) reads the same examples; another client, another order
    assert node.train(empty, server_round=2).seen == r2.seen
    assert LocalNode(cfg, 1).train(empty, server_round=1).seen != r1.seen
    assert r1.metrics["fb-passes"] == cfg.local_steps and r1.metrics["train-examples"] == per_round


def test_lota_spends_the_same_passes_as_fft_with_calibration_counted():
    cfg = RunConfig(**TINY)
    node = LocalNode(cfg, 0)
    first = node.train(codec.encode(SparseTaskVector()), server_round=1)
    assert first.metrics["fb-passes"] == cfg.local_steps  # 1 calibration + 2 sparse
    assert first.metrics["steps"] == cfg.local_steps - cfg.calibration_steps
    later = node.train(codec.encode(SparseTaskVector()), first.mask_payload, server_round=2)
    assert later.metrics["fb-passes"] == cfg.local_steps == later.metrics["steps"]


def test_iterative_calibration_in_a_federated_client_reaches_high_sparsity_within_the_budget():
    """iterative-sparsity='0.99' after sparsity 0.9: the first upload holds 1% of the scope,
    in the same forward/backward passes as any round (the library test checks that the 99%
    mask lies inside the 90% one); later rounds upload values only against that 1% mask."""
    cfg = RunConfig(**TINY | {"local_steps": 5, "calibration_steps": 1}, iterative_sparsity="0.99")
    node = LocalNode(cfg, 0)
    first = node.train(codec.encode(SparseTaskVector()), server_round=1)
    assert first.metrics["nnz"] == pytest.approx(0.01 * first.metrics["numel"], rel=0.05)
    assert first.metrics["fb-passes"] == cfg.local_steps  # 1 calibration + 2 at 90% + 2 at 99%
    assert first.metrics["seconds.iterate_0.99"] > 0
    second = node.train(codec.encode(SparseTaskVector()), first.mask_payload, server_round=2)
    assert second.values_only and second.metrics["nnz"] == first.metrics["nnz"]
    with pytest.raises(RunConfigError, match=r"iterative-sparsity.*must exceed"):
        RunConfig(**TINY, iterative_sparsity="0.8")
    with pytest.raises(RunConfigError, match=r"iterative-sparsity.*not a comma-separated list"):
        RunConfig(**TINY, iterative_sparsity="0.99,x")
    with pytest.raises(RunConfigError, match="3 sparse phases need"):
        RunConfig(**TINY, iterative_sparsity="0.95,0.99")  # 3 steps, 1 calibration: 2 left
    with pytest.raises(RunConfigError, match=r"LoTA setting; method 'fft'"):
        RunConfig(**TINY, method="fft", lotto=True)
    # one spelling per setting: equal settings share an identity (compare reuses its units)
    same = RunConfig.from_run_config({"iterative-sparsity": 0.99}), RunConfig(iterative_sparsity=" 0.99 ,")
    assert same[0].identity() == same[1].identity() == RunConfig(iterative_sparsity="0.99").identity()


def test_lotto_client_draws_its_mask_outside_the_global_updates_entries():
    """With lotto on, a client making its mask leaves G's entries (an earlier client's mask)
    frozen: its mask is disjoint from them; without lotto the two masks overlap."""
    first = LocalNode(RunConfig(**TINY), 1).train(codec.encode(SparseTaskVector()))
    g_payload = first.payload  # G = the earlier client's update: its support is that mask
    earlier = codec.decode(g_payload).masks()
    masks = {}
    for lotto in (True, False):
        out = LocalNode(RunConfig(**TINY, lotto=lotto), 0).train(g_payload)
        masks[lotto] = codec.decode(out.mask_payload).masks()
        assert out.metrics["nnz"] == pytest.approx(0.1 * out.metrics["numel"], rel=0.01)
    shared = {lotto: sum(int((m[n] & earlier[n]).sum()) for n in m if n in earlier) for lotto, m in masks.items()}
    assert shared[True] == 0 and shared[False] > 0


def test_client_starts_from_base_plus_global():
    cfg = RunConfig(**TINY)
    node = LocalNode(cfg, 1)
    g = sparse_tv(0, shapes={"model.layers.0.mlp.up_proj.weight": (128, 64)})
    model, _, _ = node._model_at(codec.encode(g, values="float32"))
    _, _, base = load_base(cfg.model, "cpu")
    name = "model.layers.0.mlp.up_proj.weight"
    got = dict(model.named_parameters())[name].detach()
    assert torch.allclose(got, base[name] + g[name].to_dense())
    model, _, _ = node._model_at(codec.encode(SparseTaskVector()))  # and back to base exactly
    assert torch.equal(dict(model.named_parameters())[name].detach(), base[name])


def test_fft_uploads_dense_every_round():
    cfg = RunConfig(**TINY, method="fft", merge="fedavg")
    out = LocalNode(cfg, 1).train(codec.encode(SparseTaskVector()))
    assert not out.values_only and out.mask_payload is None
    tv = codec.decode(out.payload)
    assert all(t.is_dense for t in tv.values()) and tv.nnz == out.metrics["numel"]


def test_lora_uploads_its_factors_and_the_server_merges_their_products():
    cfg = RunConfig(**TINY, method="lora", merge="fedavg", lora_rank=2, values="float32")
    node = LocalNode(cfg, 1)
    model, _, _ = node._model_at(codec.encode(SparseTaskVector()))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = node.train(codec.encode(SparseTaskVector()))
    sent = codec.decode(out.payload)
    assert lowrank.is_lowrank(sent) and out.metrics["nnz"] == sent.nnz < out.metrics["numel"]
    agg = Aggregator(cfg)
    agg.aggregate([Upload("1", out.payload, 1.0)])
    model, _, _ = load_base(cfg.model, "cpu")  # still holds the tuned weights
    for name, t in agg.global_tv.items():
        tuned = dict(model.named_parameters())[name].detach()
        assert torch.allclose(before[name] + t.to_dense(), tuned, atol=1e-5), name


def test_lowrank_expand_checks_its_factors():
    b, a = torch.randn(6, 2), torch.randn(2, 5)
    tv = lowrank.pack({"w": (b, a)})
    assert torch.allclose(lowrank.expand(tv)["w"].to_dense(), b @ a)
    broken = SparseTaskVector({"w::lora_B": tv["w::lora_B"]})
    with pytest.raises(ValueError, match="unpaired"):
        lowrank.expand(broken)
    bad = SparseTaskVector({"w::lora_B": tv["w::lora_B"], "w::lora_A": SparseTensor((3, 5), None, torch.zeros(15))})
    with pytest.raises(ValueError, match="do not multiply"):
        lowrank.expand(bad)
    agg = Aggregator(RunConfig())
    r = agg.aggregate([Upload("9", codec.encode(bad), 1.0)])
    assert "client 9" in r.rejected["9"] and "do not multiply" in r.rejected["9"]


def test_evaluate_scores_each_candidate(monkeypatch):
    """Each candidate is scored as base + its own G: a stand-in metric reads one weight of
    the model it is given, and three candidates set that weight apart."""
    from fl_lota.federated import node as fedclient

    cfg = RunConfig(**TINY)
    node = LocalNode(cfg, 1)
    model, _, base = fedclient.load_base(cfg.model, node.device)
    name = next(n for n, p in model.named_parameters() if p.ndim == 2)
    w0 = float(base[name].flatten()[3])
    monkeypatch.setattr(fedclient, "evaluate", lambda m, *a, **k: {"score": float(m.get_parameter(name).flatten()[3])})
    shape = tuple(base[name].shape)

    def moved(by: float) -> bytes:
        delta = torch.zeros(shape).flatten().index_fill(0, torch.tensor([3]), by).view(shape)
        return codec.encode(SparseTaskVector.from_dense({name: delta}, {name: delta != 0}), values="float32")

    report = node.evaluate({"mask_aware": moved(0.25), "ties": moved(0.5), "fedavg": codec.encode(SparseTaskVector())})
    got = {merge: scores["classify"] for merge, scores in report.scores.items()}
    assert got == pytest.approx({"mask_aware": w0 + 0.25, "ties": w0 + 0.5, "fedavg": w0})
    assert report.test_items == {"classify": len(node.data.tasks[0].test)} and report.partition == 1


def test_partition_outside_the_federation_is_an_error():
    with pytest.raises(ValueError, match="partition id 2"):
        LocalNode(RunConfig(**TINY), 2)


# ---- validation against the model, clipping, minimum replies ----------------------------

SHAPES = {"a": (8, 16), "b": (32,)}


def test_uploads_must_match_the_models_parameters():
    agg = Aggregator(RunConfig(), shapes=SHAPES)
    wrong_name = sparse_tv(0, shapes={"a": (8, 16), "lm_head.evil": (32,)})
    wrong_shape = sparse_tv(0, shapes={"a": (16, 8)})
    r = agg.aggregate(
        [
            Upload("1", codec.encode(wrong_name), 1),
            Upload("2", codec.encode(wrong_shape), 1),
            Upload("3", codec.encode(sparse_tv(0)), 1),
        ]
    )
    assert r.accepted == ["3"]
    # refused from the tensor table, before any stream is decompressed
    assert "tensor 'lm_head.evil' is not one the receiver accepts" in r.rejected["1"]
    assert "has shape (16, 8), expected (8, 16)" in r.rejected["2"]


def test_values_only_upload_against_another_mask_is_rejected():
    agg = Aggregator(RunConfig(), shapes=SHAPES)
    agg.aggregate([Upload("1", codec.encode(sparse_tv(0)), 1)])
    other = sparse_tv(5)  # same names and shapes, different mask
    r = agg.aggregate([Upload("1", codec.encode(other, values_only=True), 1)])
    assert not r.accepted and "different mask" in r.rejected["1"]


def test_clip_norm_bounds_one_clients_influence():
    big = sparse_tv(0).with_values({n: t.values * 1000 for n, t in sparse_tv(0).items()})
    agg = Aggregator(RunConfig(clip_norm=1.0, values="float32", merge="task_arithmetic"))
    agg.aggregate([Upload("1", codec.encode(big, values="float32"), 1)])
    norm = sum(float(t.values.pow(2).sum()) for t in agg.global_tv.values()) ** 0.5
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_too_few_replies_leave_the_global_model_unchanged():
    agg = Aggregator(RunConfig(min_replies=2))
    before = agg.global_payload
    r = agg.aggregate([Upload("1", codec.encode(sparse_tv(0)), 1), Upload("2", b"junk", 1)])
    assert r.accepted == ["1"] and agg.global_payload == before


_GOOD = codec.encode(sparse_tv(0, shapes=SHAPES))
_GOOD_VO = codec.encode(sparse_tv(0, shapes=SHAPES), values_only=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    st.binary(max_size=64),
    st.booleans(),
)
def test_mutated_uploads_only_ever_produce_named_rejections(edits, tail, values_only):
    """Every mutant is re-signed (length and checksum recomputed), so it reaches the checks
    behind the checksum: the tensor table against the model, the streams, the indices and
    the values. Each one is either refused with a named reason or a well-formed update."""
    good = _GOOD_VO if values_only else _GOOD
    payload = bytearray(good)
    for pos, byte in edits:
        payload[pos % len(payload)] = byte
    agg = Aggregator(RunConfig(), shapes=SHAPES)
    agg.aggregate([Upload("0", _GOOD, 1)])  # registers a mask for values-only mutants
    mutant = resign(bytes(payload) + tail)
    r = agg.aggregate([Upload("0", mutant, 1)])
    if r.rejected:
        assert r.rejected["0"].startswith("client 0: ")
    else:  # a mutation that survives every check is still a well-formed update of the model
        assert all(agg.global_tv[n].shape == SHAPES[n] for n in agg.global_tv)
        assert all(torch.isfinite(t.values).all() for t in agg.global_tv.values())
        assert all(float(t.values.abs().max()) <= 2 * MAX_UPDATE_ABS for t in agg.global_tv.values() if t.nnz)


def test_the_server_holds_g_packed_where_the_clients_masks_make_it_dense():
    """Eight clients at 20% each: G's union is dense enough that a bit per entry and dense
    values take less than positions and values; it reads as the update the clients decode."""
    shapes = {"a": (64, 64), "b": (512,)}
    agg = Aggregator(RunConfig(values="bf16", merge="mask_aware"))
    ups = [Upload(str(i), codec.encode(sparse_tv(i, 0.2, shapes)), 1.0) for i in range(8)]
    r = agg.aggregate(ups)
    assert len(r.accepted) == 8 and r.global_nnz > 0.7 * r.global_numel
    assert all(isinstance(agg.global_tv.stored(n), PackedTensor) for n in shapes)
    clients_see = codec.decode(agg.global_payload)
    for n in shapes:
        assert torch.equal(agg.global_tv[n].indices, clients_see[n].indices)
        assert torch.equal(agg.global_tv[n].values.float(), clients_see[n].values)
    # the next round merges onto the packed G as it would onto the sparse one
    nxt = [Upload(str(i), codec.encode(sparse_tv(10 + i, 0.2, shapes)), 1.0) for i in range(2)]
    want = merge("mask_aware", [codec.decode(u.payload) for u in nxt], [1.0, 1.0], onto=clients_see)
    agg.aggregate(nxt)
    for n in shapes:
        assert torch.equal(agg.global_tv[n].values.float(), want[n].values.to(torch.bfloat16).float())


def test_a_rounding_downlink_makes_g_the_held_g_plus_the_rounded_change_and_restores_it_exactly():
    """downlink-values=int4: each round's G is the one before plus the merge's change rounded
    to int4 codes (what the clients rebuild from the step), close to the exact merge but not
    equal to it; a checkpoint of it restores bit for bit."""
    from fl_lota.federated.downlink import added, digest

    exact, lossy = Aggregator(RunConfig(values="bf16")), Aggregator(RunConfig(values="bf16", downlink_values="int4"))
    masks = [sparse_tv(0, 0.3), sparse_tv(1, 0.3)]
    for rnd in range(2):
        ups = [m.with_values({n: torch.randn(t.nnz) * (rnd + 1) for n, t in m.items()}) for m in masks]
        held = lossy.global_tv
        for agg in (exact, lossy):
            agg.aggregate([Upload(str(i), codec.encode(u), 1) for i, u in enumerate(ups)])
        step = lossy.step
        assert step.base == digest(held)  # round 1: the empty G the training messages brought
        assert codec.peek(step.payload).value_dtype == "int4"
        assert digest(added(held, step.payload, step.mode)) == digest(lossy.global_tv)
        # the exact merge onto the rounded G before, against the rounded G: within half a code step
        merged = merge("mask_aware", [codec.decode(codec.encode(u)) for u in ups], [1, 1])
        want = held.add(merged)
        for n in want:
            err = (lossy.global_tv[n].values.float() - want[n].values.float()).abs().max()
            assert 0 < err <= merged[n].values.abs().max() / 7 / 2 * (1 + 1e-5) + 1e-6
        assert exact.step is None
    assert not torch.equal(lossy.global_tv["a"].values.float(), exact.global_tv["a"].values.float())
    restored = Aggregator(RunConfig(values="bf16", downlink_values="int4"))
    restored.restore(codec.decode(codec.encode(lossy.global_tv, values="float32")), lossy.masks, {})
    assert digest(restored.global_tv) == digest(lossy.global_tv)
