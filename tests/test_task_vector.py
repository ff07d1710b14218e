import pytest
import torch

from fl_lota.training.masks import magnitude_mask
from fl_lota.vectors.task_vector import PackedTensor, SparseTaskVector, SparseTensor


def _delta():
    g = torch.Generator().manual_seed(0)
    return {"a.mlp.up.weight": torch.randn(6, 5, generator=g), "b.attn.q.weight": torch.randn(4, 4, generator=g)}


def test_from_dense_keeps_only_masked_entries_and_round_trips():
    d = _delta()
    m = magnitude_mask(d, 0.7)
    tv = SparseTaskVector.from_dense(d, m)
    assert tv.nnz == sum(int(x.sum()) for x in m.values())
    for n, t in tv.items():
        assert torch.equal(t.to_dense(), torch.where(m[n], d[n], torch.zeros_like(d[n])))
        assert torch.equal(t.mask(), m[n])
        assert (t.indices[1:] > t.indices[:-1]).all()


def test_dense_tensor_has_no_indices():
    d = _delta()
    tv = SparseTaskVector.from_dense(d)
    assert all(t.is_dense for t in tv.values())
    assert tv.density == 1.0
    assert torch.equal(tv.to_dense()["a.mlp.up.weight"], d["a.mlp.up.weight"])


def test_apply_to_adds_scaled_delta_in_place():
    d = _delta()
    m = magnitude_mask(d, 0.5)
    tv = SparseTaskVector.from_dense(d, m)
    target = {n: torch.ones_like(x) for n, x in d.items()}
    tv.apply_to(target, scale=0.5)
    for n in d:
        assert torch.allclose(target[n], 1 + 0.5 * torch.where(m[n], d[n], torch.zeros_like(d[n])))


def test_apply_to_rejects_unknown_tensor_and_shape():
    tv = SparseTaskVector({"x": SparseTensor((2, 2), None, torch.ones(4))})
    with pytest.raises(ValueError, match="'x' not found"):
        tv.apply_to({"y": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shape"):
        tv.apply_to({"x": torch.zeros(3)})


def test_invalid_construction_is_rejected():
    with pytest.raises(ValueError, match="indices but"):
        SparseTensor((4,), torch.tensor([0, 1]), torch.ones(3))
    with pytest.raises(ValueError, match="dense values"):
        SparseTensor((4,), None, torch.ones(3))
    with pytest.raises(ValueError, match="lacks"):
        SparseTaskVector.from_dense({"a": torch.zeros(2)}, {"b": torch.ones(2, dtype=torch.bool)})


def test_save_load_round_trip(tmp_path):
    d = _delta()
    tv = SparseTaskVector.from_dense(d, magnitude_mask(d, 0.8))
    tv = SparseTaskVector({**tv, "c.dense": SparseTensor((3,), None, torch.arange(3.0))})
    path = tmp_path / "tv.safetensors"
    tv.save(path)
    back = SparseTaskVector.load(path)
    assert list(back) == list(tv)
    for n, t in tv.items():
        assert back[n].shape == t.shape
        assert torch.equal(back[n].values, t.values)
        assert (back[n].indices is None) == (t.indices is None)
        if t.indices is not None:
            assert torch.equal(back[n].indices, t.indices)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        SparseTaskVector.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an fl_lota task vector"):
        SparseTaskVector.load(tmp_path / "other.safetensors")


def test_indices_are_held_as_int32_where_the_tensor_allows_and_files_keep_int64(tmp_path):
    from safetensors.torch import load_file

    from fl_lota.vectors.task_vector import index_dtype

    t = SparseTensor((4, 5), torch.tensor([1, 7, 19], dtype=torch.int64), torch.tensor([1.0, 2.0, 3.0]))
    assert t.indices.dtype == torch.int32 and t.indices.tolist() == [1, 7, 19]
    assert t.flat_indices().dtype == torch.int32
    assert SparseTensor((4, 5), None, torch.zeros(20)).flat_indices().dtype == torch.int32
    # a tensor with more than 2^31 entries needs int64 positions (an empty one costs nothing)
    huge = SparseTensor((2**31 + 1,), torch.zeros(0, dtype=torch.int32), torch.zeros(0))
    assert huge.indices.dtype == torch.int64 and index_dtype(2**31) == torch.int32
    # narrowing is exact only in range: a position past the tensor is an error, not a wrap
    with pytest.raises(ValueError, match="outside"):
        SparseTensor((4, 5), torch.tensor([1, 2**32 + 3]), torch.ones(2))
    with pytest.raises(ValueError, match="int32 or int64"):
        SparseTensor((4,), torch.tensor([0, 1], dtype=torch.int16), torch.ones(2))
    tv = SparseTaskVector({"w": t, "b": SparseTensor((2,), None, torch.ones(2, dtype=torch.bfloat16))})
    tv.save(tmp_path / "tv.safetensors")
    raw = load_file(str(tmp_path / "tv.safetensors"))
    assert raw["w::indices"].dtype == torch.int64 and raw["w::values"].dtype == torch.float32
    assert raw["b::values"].dtype == torch.float32  # the format's value type, whatever is held
    back = SparseTaskVector.load(tmp_path / "tv.safetensors")
    assert back["w"].indices.dtype == torch.int32 and torch.equal(back["w"].indices, t.indices)


def _bf16_sparse(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    numel = int(torch.tensor(shape).prod())
    idx = torch.nonzero(torch.rand(numel, generator=g) < density).reshape(-1)
    return SparseTensor(shape, idx, torch.randn(idx.numel(), generator=g).to(torch.bfloat16))


def test_a_packed_tensor_reads_as_the_same_positions_and_values():
    tv = SparseTaskVector({"dense_enough": _bf16_sparse((60, 50), 0.6, 0), "sparse": _bf16_sparse((500,), 0.05, 1)})
    held_zero = SparseTensor((40,), torch.arange(2, 38), torch.zeros(36))  # held entries whose value is 0
    tv = SparseTaskVector({**tv, "zeros": held_zero})
    p = tv.packed()
    assert isinstance(p.stored("dense_enough"), PackedTensor) and isinstance(p.stored("zeros"), PackedTensor)
    assert isinstance(p.stored("sparse"), SparseTensor)  # positions and values are smaller there
    assert p.nnz == tv.nnz and p.numel == tv.numel and list(p) == list(tv)
    for name in tv:
        a, b = tv[name], p[name]
        assert b.indices.dtype == a.indices.dtype and torch.equal(b.indices, a.indices)
        assert b.values.dtype == a.values.dtype and torch.equal(b.values, a.values)
    assert p["zeros"].nnz == 36  # a held zero stays held
    assert isinstance(SparseTaskVector(p).stored("dense_enough"), PackedTensor)  # copying keeps the form
    again = p.packed()  # packing a vector that holds packed tensors keeps them as they are
    assert again.stored("dense_enough") is p.stored("dense_enough") and isinstance(again.stored("sparse"), SparseTensor)
    for x, y in ((p, tv), (tv, p), (p, p)):  # packed operands add bit for bit as unpacked ones
        got, want = x.add(y, scale=0.3), tv.add(tv, scale=0.3)
        assert all(
            torch.equal(got[n].values, want[n].values) and torch.equal(got[n].indices, want[n].indices) for n in tv
        )
    sup = p.support()  # a layout: the same positions, one shared zero for values, still packed
    assert isinstance(sup.stored("dense_enough"), PackedTensor)
    assert torch.equal(sup["dense_enough"].indices, tv["dense_enough"].indices)
    assert sup["dense_enough"].values.stride(0) == 0 and not sup["dense_enough"].values.any()
    repacked = PackedTensor.pack(tv.support()["sparse"])  # packing a support keeps its values shared
    assert repacked.dense.stride(0) == 0 and torch.equal(repacked.unpack().indices, tv["sparse"].indices)


def test_packing_is_chosen_only_where_it_is_smaller():
    numel = 1000
    # bf16 values and int32 positions: packed 125 + 2000 bytes against 6 per entry
    assert not PackedTensor.smaller(numel, 354, 2) and PackedTensor.smaller(numel, 355, 2)
    assert not PackedTensor.smaller(numel, numel, 2)  # a whole tensor goes dense
    whole = SparseTaskVector({"w": SparseTensor((4,), torch.arange(4), torch.ones(4))})
    assert isinstance(whole.packed().stored("w"), SparseTensor)


def test_unpacking_in_pieces_and_membership_that_reads_nothing(monkeypatch):
    import fl_lota.vectors.task_vector as tvmod

    t = _bf16_sparse((7, 29), 0.5, 3)  # 203 entries: pieces of 16 bits end mid-byte of the tensor
    monkeypatch.setattr(tvmod, "_PIECE", 16)
    back = PackedTensor.pack(t).unpack()
    assert torch.equal(back.indices, t.indices) and torch.equal(back.values, t.values)
    calls = []
    monkeypatch.setattr(PackedTensor, "unpack", lambda self: calls.append(1))
    p = SparseTaskVector({"w": t}).packed()
    assert "w" in p and "x" not in p and p.nnz == t.nnz and not calls
