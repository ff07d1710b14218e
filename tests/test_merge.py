"""Each merge method against hand-computed examples: disjoint, overlapping, sign conflicts."""

import math

import pytest
import torch

from fl_lota.merging.merge import MERGE_METHODS, elect_sign, masked_mean, merge, merge_tensors, trim_top_k
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor


def sv(idx, vals, shape=(4,), name="w"):
    return SparseTaskVector({name: SparseTensor(shape, torch.tensor(idx, dtype=torch.int64), torch.tensor(vals))})


def dense_of(tv, name="w"):
    return tv[name].to_dense().tolist()


A = sv([0, 1], [2.0, 4.0])
B = sv([1, 2], [-2.0, 6.0])


def test_registry_holds_the_four_methods():
    assert set(MERGE_METHODS) == {"mask_aware", "ties", "task_arithmetic", "fedavg"}


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("mask_aware", {}, [2.0, 1.0, 6.0, 0.0]),  # coord 1 averaged over its 2 holders only
        ("fedavg", {}, [1.0, 1.0, 3.0, 0.0]),  # everything divided by both clients
        ("task_arithmetic", {"lam": 0.5}, [1.0, 1.0, 3.0, 0.0]),  # 0.5 * sum
        ("ties", {"k": 1.0}, [2.0, 4.0, 6.0, 0.0]),  # sign(4 - 2) = +: only A's 4 agrees
        ("ties", {"k": 0.25}, [0.0, 4.0, 6.0, 0.0]),  # top 1 of 4 per vector: A keeps 4, B keeps 6
        ("ties", {"k": 1.0, "lam": 0.5}, [1.0, 2.0, 3.0, 0.0]),
    ],
)
def test_overlapping_vectors(method, params, expected):
    assert dense_of(merge(method, [A, B], **params)) == pytest.approx(expected)


def test_task_arithmetic_sums_the_vectors_whatever_the_client_weights():
    assert dense_of(merge("task_arithmetic", [A, B], weights=[160, 40], lam=0.5)) == pytest.approx([1.0, 1.0, 3.0, 0.0])


def test_disjoint_vectors_mask_aware_keeps_each_update_fedavg_dilutes():
    a, b = sv([0], [3.0]), sv([2], [5.0])
    assert dense_of(merge("mask_aware", [a, b])) == [3.0, 0.0, 5.0, 0.0]
    assert dense_of(merge("ties", [a, b], k=1.0)) == [3.0, 0.0, 5.0, 0.0]
    assert dense_of(merge("fedavg", [a, b])) == [1.5, 0.0, 2.5, 0.0]
    assert merge("mask_aware", [a, b])["w"].indices.tolist() == [0, 2]  # stays sparse


def test_sign_conflict_resolved_by_summed_magnitude():
    a, b = sv([1], [4.0]), sv([1], [-5.0])
    assert dense_of(merge("ties", [a, b], k=1.0)) == [0.0, -5.0, 0.0, 0.0]
    assert dense_of(merge("ties", [a, b], [2.0, 1.0], k=1.0)) == [0.0, 4.0, 0.0, 0.0]  # 8 - 5 > 0
    assert dense_of(merge("mask_aware", [a, b])) == [0.0, -0.5, 0.0, 0.0]


def test_weighted_mask_aware_divides_by_holders_weights():
    assert dense_of(merge("mask_aware", [A, B], [3.0, 1.0])) == pytest.approx([2.0, 2.5, 6.0, 0.0])
    assert dense_of(merge("fedavg", [A, B], [3.0, 1.0])) == pytest.approx([1.5, 2.5, 1.5, 0.0])


def test_zeros_do_not_vote_in_ties_but_count_in_mask_aware():
    a, b = sv([0], [0.0]), sv([0], [-1.0])
    assert dense_of(merge("ties", [a, b], k=1.0)) == [-1.0, 0.0, 0.0, 0.0]
    assert dense_of(merge("mask_aware", [a, b])) == [-0.5, 0.0, 0.0, 0.0]


def test_dense_and_sparse_tensors_mix():
    d = SparseTaskVector({"w": SparseTensor((4,), None, torch.ones(4))})
    s = sv([3], [3.0])
    assert dense_of(merge("mask_aware", [d, s])) == [1.0, 1.0, 1.0, 2.0]
    assert dense_of(merge("ties", [d, s], k=0.5)) == [1.0, 1.0, 0.0, 3.0]  # d trimmed to 2 entries (first ties)


def test_tensors_held_by_some_vectors_only():
    a = SparseTaskVector({**sv([0], [1.0]), **sv([1], [2.0], shape=(2,), name="v")})
    b = sv([0], [3.0])
    out = merge("mask_aware", [a, b])
    assert list(out) == ["w", "v"]
    assert dense_of(out) == [2.0, 0.0, 0.0, 0.0] and dense_of(out, "v") == [0.0, 2.0]
    assert dense_of(merge("fedavg", [a, b]), "v") == [0.0, 1.0]  # fedavg divides by all clients


def test_ties_global_trim_across_tensors():
    v = SparseTaskVector(
        {
            "x": SparseTensor((2,), None, torch.tensor([1.0, 9.0])),
            "y": SparseTensor((2,), None, torch.tensor([8.0, 2.0])),
        }
    )
    g = merge("ties", [v], k=0.5)  # 2 of 4 overall: 9 and 8
    assert dense_of(g, "x") == [0.0, 9.0] and dense_of(g, "y") == [8.0, 0.0]
    p = merge("ties", [v], k=0.5, trim="per_tensor")  # 1 of 2 in each
    assert dense_of(p, "x") == [0.0, 9.0] and dense_of(p, "y") == [8.0, 0.0]
    q = merge("ties", [v], k=0.25)
    assert dense_of(q, "x") == [0.0, 9.0] and dense_of(q, "y") == [0.0, 0.0]


def test_building_blocks():
    keep = trim_top_k([torch.tensor([0.0, -3.0, 1.0]), torch.tensor([2.0])], 2)
    assert [k.tolist() for k in keep] == [[False, True, False], [True]]
    assert trim_top_k([torch.zeros(3)], 2)[0].tolist() == [False, False, False]  # zeros never kept
    entries = [(torch.tensor([0, 1]), torch.tensor([1.0, -1.0])), (None, torch.tensor([1.0, 3.0, 0.0]))]
    assert elect_sign(entries, [1.0, 1.0], 3).tolist() == [1.0, 1.0, 0.0]
    idx, vals = masked_mean(entries, [1.0, 1.0], 3)
    assert idx.tolist() == [0, 1, 2] and vals.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="divisor"):
        masked_mean(entries, [1.0, 1.0], 3, divisor="all")


def test_bad_calls_are_named():
    with pytest.raises(ValueError, match="unknown merge method 'avg'"):
        merge("avg", [A])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge("ties", [])
    with pytest.raises(ValueError, match="must be positive"):
        merge("fedavg", [A, B], [1.0, 0.0])
    with pytest.raises(ValueError, match="2 vectors"):
        merge("fedavg", [A, B], [1.0])
    with pytest.raises(ValueError, match="shapes disagree"):
        merge("mask_aware", [A, sv([0], [1.0], shape=(5,))])
    with pytest.raises(ValueError, match="ties k"):
        merge("ties", [A], k=0.0)


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merging_onto_g_is_g_plus_the_merge_bit_for_bit(method):
    """merge(..., onto=G) is G.add(merge(...)) to the bit, with a tensor only G holds, one
    only the uploads hold, a dense one and negative zeros (0 + -0.0 is +0.0 in both)."""
    g = torch.Generator().manual_seed(0)

    def vec(names, density):
        out = {}
        for n, shape in names.items():
            numel = math.prod(shape)
            idx = torch.nonzero(torch.rand(numel, generator=g) < density).reshape(-1)
            vals = torch.randn(idx.numel(), generator=g)
            vals[::7] = -0.0
            out[n] = SparseTensor(shape, idx, vals)
        return SparseTaskVector(out)

    G = vec({"only_g": (5, 3), "both": (8, 8)}, 0.4)
    G = SparseTaskVector(dict(G) | {"dense": SparseTensor((6,), None, torch.randn(6, generator=g))})
    ups = [vec({"both": (8, 8), "new": (4, 4), "dense": (6,)}, 0.3) for _ in range(3)]
    params = {"ties": {"k": 0.5}}.get(method, {})
    want = G.add(merge(method, ups, [1.0, 2.0, 3.0], **params))
    got = merge(method, ups, [1.0, 2.0, 3.0], onto=G, **params)
    assert list(got) == list(want)
    for n in want:
        assert got[n].shape == want[n].shape
        assert (got[n].indices is None) == (want[n].indices is None)
        if want[n].indices is not None:
            assert torch.equal(got[n].indices, want[n].indices)
        assert torch.equal(got[n].values.view(torch.int32), want[n].values.view(torch.int32)), n
    # the encoder's way: the same tensors built one at a time, each time it asks, and the
    # same payload as encoding the merge held whole
    tensors = merge_tensors(method, ups, [1.0, 2.0, 3.0], onto=G, **params)
    assert [n for n, _ in tensors()] == list(want) == [n for n, _ in tensors()]
    assert codec.encode_tensors(tensors, values="float32") == codec.encode(want, values="float32")


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_uploads_and_g_held_as_bf16_merge_to_the_same_payload_as_float32(method):
    """The server holds bf16 uploads and G as bfloat16 (decode(native=True)); the merge
    computes in float32 either way, so the new G's payload is the same bytes."""
    g = torch.Generator().manual_seed(1)

    def vec(density):
        idx = torch.nonzero(torch.rand(600, generator=g) < density).reshape(-1)
        return SparseTaskVector({"w": SparseTensor((20, 30), idx, torch.randn(idx.numel(), generator=g))})

    payloads = [codec.encode(vec(0.3)) for _ in range(3)]
    G = codec.encode(vec(0.5))
    params = {"ties": {"k": 0.5}}.get(method, {})
    got = []
    for native in (False, True):
        ups = [codec.decode(p, native=native) for p in payloads]
        onto = codec.decode(G, native=native)
        assert all(t.values.dtype == (torch.bfloat16 if native else torch.float32) for t in onto.values())
        got.append(codec.encode_tensors(merge_tensors(method, ups, [1.0, 2.0, 3.0], onto=onto, **params)))
    assert got[0] == got[1]
