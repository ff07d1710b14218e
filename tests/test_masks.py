import pytest
import torch

from fl_lota.training.masks import (
    DEFAULT_SCOPE,
    MASK_SELECTORS,
    density,
    extract_mask,
    magnitude_mask,
    overlap,
    random_mask,
    scope_names,
    top_k_flat,
)
from fl_lota.training.models import load_model


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "l.0.mlp.up.weight": torch.randn(40, 30, generator=g),
        "l.0.self_attn.q.weight": torch.randn(20, 20, generator=g) * 3,  # larger: wins more globally
        "l.1.mlp.down.weight": torch.randn(30, 40, generator=g),
    }


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_global_mask_keeps_exactly_k_largest(sparsity):
    d = _delta()
    m = magnitude_mask(d, sparsity)
    total = sum(x.numel() for x in d.values())
    k = round((1 - sparsity) * total)
    assert sum(int(x.sum()) for x in m.values()) == k
    if 0 < k < total:
        kept = torch.cat([d[n].abs()[m[n]] for n in d])
        dropped = torch.cat([d[n].abs()[~m[n]] for n in d])
        assert kept.min() >= dropped.max()


def test_global_mask_is_not_uniform_across_tensors():
    d = _delta()
    m = magnitude_mask(d, 0.9)
    assert m["l.0.self_attn.q.weight"].float().mean() > 0.3  # the large-magnitude tensor wins
    assert m["l.0.mlp.up.weight"].float().mean() < 0.1


def test_per_tensor_mask_keeps_the_fraction_in_every_tensor():
    d = _delta()
    m = magnitude_mask(d, 0.9, mode="per_tensor")
    for n, x in d.items():
        assert int(m[n].sum()) == round(0.1 * x.numel())
        assert d[n].abs()[m[n]].min() >= d[n].abs()[~m[n]].max()


def test_exact_k_despite_ties():
    scores = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    keep = top_k_flat(scores, 2)
    assert keep.tolist() == [False, True, True, False, False, False]
    m = magnitude_mask({"w": torch.zeros(10, 10)}, 0.9)  # all ties: still exactly 10
    assert int(m["w"].sum()) == 10


def test_lotto_exclusion_gives_disjoint_masks():
    d1, d2 = _delta(1), _delta(1)  # same delta: without exclusion the masks would coincide
    a = magnitude_mask(d1, 0.9)
    b = magnitude_mask(d2, 0.9, exclude=[a])
    assert overlap(a, b)["intersection"] == 0
    assert density(b) == pytest.approx(density(a))
    c = magnitude_mask(d2, 0.9, exclude=[a, b], mode="per_tensor")
    assert overlap(a, c)["intersection"] == 0 and overlap(b, c)["intersection"] == 0


def test_exclusion_caps_at_what_is_left():
    d = {"w": torch.randn(10, 10)}
    a = magnitude_mask(d, 0.2)  # 80 taken
    b = magnitude_mask(d, 0.5, exclude=[a])  # asks 50, only 20 remain
    assert int(b["w"].sum()) == 20 and not (a["w"] & b["w"]).any()


def test_overlap_reports_shared_entries():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([False, True, True, False])}
    o = overlap(a, b)
    assert o == {"intersection": 1.0, "jaccard": pytest.approx(1 / 3), "frac_of_a": 0.5, "frac_of_b": 0.5}


def test_random_mask_is_seeded_and_exact():
    shapes = {n: x.shape for n, x in _delta().items()}
    a, b = random_mask(shapes, 0.9, seed=3), random_mask(shapes, 0.9, seed=3)
    c = random_mask(shapes, 0.9, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
    assert sum(int(x.sum()) for x in a.values()) == round(0.1 * sum(x.numel() for x in _delta().values()))


def test_selector_registry():
    assert set(MASK_SELECTORS) == {"magnitude", "random"}
    d = _delta()
    rnd = extract_mask(d, 0.75, selector="random", seed=7)
    assert density(rnd) == pytest.approx(0.25, abs=1e-3)
    # the selector is what chooses: the random one is the seeded draw, not the top-|delta| entries
    want = random_mask({n: x.shape for n, x in d.items()}, 0.75, seed=7)
    assert all(torch.equal(rnd[n], want[n]) for n in d)
    top = extract_mask(d, 0.75, selector="magnitude")
    assert not all(torch.equal(rnd[n], top[n]) for n in d)
    kept = torch.cat([d[n][top[n]].abs() for n in d])
    dropped = torch.cat([d[n][~top[n]].abs() for n in d])
    assert kept.min() >= dropped.max()
    with pytest.raises(ValueError, match="unknown mask selector 'topk'"):
        extract_mask(d, 0.9, selector="topk")


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="sparsity must lie"):
        magnitude_mask(_delta(), 1.5)
    with pytest.raises(ValueError, match="mask mode"):
        magnitude_mask(_delta(), 0.5, mode="layer")
    with pytest.raises(ValueError, match="NaN"):
        magnitude_mask({"w": torch.tensor([1.0, float("nan")])}, 0.5)


def test_default_scope_is_attention_and_mlp_matrices():
    model = load_model("tiny")
    names = scope_names(((n, p.shape) for n, p in model.named_parameters()), DEFAULT_SCOPE)
    assert len(names) == 2 * 7
    assert all(("self_attn" in n or "mlp" in n) and n.endswith(".weight") for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    everything = scope_names(((n, p.shape) for n, p in model.named_parameters()), "all", matrices_only=False)
    assert len(everything) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="no parameter matches"):
        scope_names(((n, p.shape) for n, p in model.named_parameters()), [r"nonexistent"])
