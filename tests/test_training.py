"""LoTA, FFT and LoRA on a tiny random Llama and a toy task."""

import pathlib
import re

import pytest
import torch

from conftest import PAD, constant_task, mean_loss, reverse_task
from fl_lota import FINETUNE_METHODS, TrainConfig, finetune
from fl_lota.training.data import batch_iterator, collate, stream_order
from fl_lota.training.lota import calibrate, scope_params
from fl_lota.training.masks import density, overlap, random_mask
from fl_lota.training.models import ModelNotFoundError, load_model
from fl_lota.training.optim import MaskedAdamW, MaskedRMSprop, clip_per_tensor_

CFG = TrainConfig(steps=30, lr=2e-3, batch_size=16, max_grad_norm=1.0, seed=0)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_registry_holds_the_three_methods():
    assert set(FINETUNE_METHODS) == {"lota", "fft", "lora"}


@pytest.mark.parametrize("method", ["lota", "fft", "lora"])
def test_each_method_lowers_the_loss(method, tiny, toy):
    before = mean_loss(tiny, toy)
    res = finetune(method, tiny, toy, CFG, pad_id=PAD)
    after = mean_loss(tiny, toy)
    assert after < before - 0.3, (before, after)
    assert res.trained_params > 0 and len(res.losses) >= CFG.steps


def test_lota_mask_at_requested_sparsity_and_frozen_entries_bit_identical(tiny, toy):
    with torch.no_grad():  # some frozen weights hold -0.0: a masked multiply would flip them
        for p in scope_params(tiny).values():
            p.view(-1)[::7] = -0.0
    base = snapshot(tiny)
    cfg = TrainConfig(steps=10, lr=2e-3, batch_size=16, optimizer="adamw", weight_decay=0.1)
    res = finetune("lota", tiny, toy, cfg, pad_id=PAD, sparsity=0.9)
    scope = scope_params(tiny)
    assert density(res.mask) == pytest.approx(0.1, abs=1e-4)
    assert res.trained_params == round(0.1 * sum(p.numel() for p in scope.values()))
    moved = 0
    for n, p in tiny.named_parameters():
        same_bits = p.detach().view(torch.int32) == base[n].view(torch.int32)
        if n in res.mask:
            assert same_bits[~res.mask[n]].all(), n
            moved += int((~same_bits[res.mask[n]]).sum())
        else:
            assert same_bits.all(), n  # outside the scope: embeddings, norms, head
    assert moved > 0.5 * res.trained_params
    # the returned task vector is exactly the change
    for n, t in res.delta.items():
        assert torch.allclose(t.to_dense(), tiny.get_parameter(n).detach() - base[n], atol=1e-7)


def test_per_tensor_mode(tiny, toy):
    res = finetune("lota", tiny, toy, TrainConfig(steps=2, lr=1e-3), pad_id=PAD, sparsity=0.8, mask_mode="per_tensor")
    for m in res.mask.values():
        assert int(m.sum()) == round(0.2 * m.numel())


def test_runs_are_reproducible_for_a_seed(toy):
    def run(seed):
        m = load_model("tiny", seed=0)
        return finetune("lota", m, toy, TrainConfig(steps=5, lr=2e-3, seed=seed), pad_id=PAD).delta

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n].values, b[n].values) and torch.equal(a[n].indices, b[n].indices) for n in a)
    assert not all(torch.equal(a[n].values, c[n].values) for n in a)


def test_lota_at_sparsity_zero_is_full_fine_tuning(toy):
    cfg = TrainConfig(steps=4, lr=2e-3)
    m1, m2 = load_model("tiny"), load_model("tiny")
    lota = finetune("lota", m1, toy, cfg, pad_id=PAD, sparsity=0.0, calibration_steps=3)
    # the sparse phase reads on after calibration's 3 batches: FFT over those same batches
    fft = finetune("fft", m2, toy, cfg, pad_id=PAD, start=3 * cfg.batch_size)
    assert lota.seen[3 * cfg.batch_size :] == fft.seen
    for n in fft.delta:
        assert torch.equal(lota.delta[n].to_dense(), fft.delta[n].to_dense()), n


def test_every_phase_reads_on_through_the_stream_and_counts_against_the_budget(toy):
    cfg = TrainConfig(steps=5, lr=1e-3, batch_size=8)
    res = finetune("lota", load_model("tiny"), toy, cfg, pad_id=PAD, calibration_steps=3, start=40)
    assert res.passes == 3 + 5  # calibration's forward/backward passes count
    assert (res.stream_start, res.stream_end) == (40, 40 + 8 * 8)
    assert res.seen == stream_order(len(toy), cfg.seed, 40, 64)  # no batch replayed between phases
    # a later round continues where this one stopped; 64 examples are one epoch, then a new order
    nxt = finetune("fft", load_model("tiny"), toy, cfg, pad_id=PAD, start=res.stream_end)
    assert nxt.seen == stream_order(len(toy), cfg.seed, 104, 40)
    assert sorted(stream_order(len(toy), cfg.seed, 0, 64)) == list(range(64))  # an epoch sees every example once
    assert stream_order(len(toy), cfg.seed, 64, 64) != stream_order(len(toy), cfg.seed, 0, 64)


def test_calibrate_restores_the_base_exactly(tiny, toy):
    base = snapshot(tiny)
    params = scope_params(tiny)
    batches = batch_iterator(toy, 8, pad_id=PAD)
    delta, stats = calibrate(tiny, batches, CFG, params, steps=1)
    assert len(stats.losses) == 1
    assert any(bool(d.abs().sum() > 0) for d in delta.values())
    assert all(torch.equal(p, base[n]) for n, p in tiny.named_parameters())


def test_lotto_masks_are_disjoint_and_task_a_survives(tiny):
    task_a, task_b = reverse_task(64, seed=1), constant_task(64, token=7, seed=2)
    cfg = TrainConfig(steps=15, lr=2e-3, batch_size=16)
    a = finetune("lota", tiny, task_a, cfg, pad_id=PAD, sparsity=0.9)
    after_a = snapshot(tiny)
    b = finetune("lota", tiny, task_b, cfg, pad_id=PAD, sparsity=0.9, exclude=[a.mask])
    assert overlap(a.mask, b.mask)["intersection"] == 0
    assert density(b.mask) == pytest.approx(0.1, abs=1e-4)
    for n, m in a.mask.items():  # B never touched A's entries
        assert torch.equal(tiny.get_parameter(n).detach()[m], after_a[n][m])


def test_iterative_calibration_reaches_high_sparsity(tiny, toy):
    res = finetune("lota", tiny, toy, TrainConfig(steps=5, lr=2e-3), pad_id=PAD, sparsity=0.9, iterative=(0.99,))
    first, final = res.masks_history
    assert density(first) == pytest.approx(0.1, abs=1e-4)
    assert density(final) == pytest.approx(0.01, abs=1e-4)
    assert all(not (final[n] & ~first[n]).any() for n in final)  # drawn from the 90% model's vector
    assert "iterate_0.99" in res.phases


def test_random_mask_baseline(tiny, toy):
    base = snapshot(tiny)
    res = finetune("lota", tiny, toy, TrainConfig(steps=2, lr=1e-3), pad_id=PAD, selector="random", seed=5)
    assert density(res.mask) == pytest.approx(0.1, abs=1e-4)
    # the mask is the seeded random draw over the trained scope, not the calibration's top entries
    want = random_mask({n: m.shape for n, m in res.mask.items()}, 0.9, seed=5)
    assert all(torch.equal(res.mask[n], want[n]) for n in res.mask)
    tiny.load_state_dict(base)
    top = finetune("lota", tiny, toy, TrainConfig(steps=2, lr=1e-3), pad_id=PAD, seed=5).mask
    assert not all(torch.equal(res.mask[n], top[n]) for n in res.mask)


def test_lora_delta_is_the_merged_change(tiny, toy):
    base = snapshot(tiny)
    res = finetune("lora", tiny, toy, TrainConfig(steps=5, lr=5e-3), pad_id=PAD, rank=4, alpha=8)
    assert set(n for n, _ in tiny.named_parameters()) == set(base)  # adapters merged away
    assert len(res.delta) == 14  # q,k,v,o,gate,up,down in 2 layers
    assert res.trained_params == sum(4 * (p.shape[0] + p.shape[1]) for n, p in base.items() if n in res.delta)
    for n, t in res.delta.items():
        assert torch.allclose(tiny.get_parameter(n).detach(), base[n] + t.to_dense(), atol=1e-6)
    assert torch.equal(tiny.get_parameter("model.embed_tokens.weight"), base["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    ("ours", "stock"),
    [
        (lambda p: MaskedRMSprop(p, lr=1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-8)),
        (
            lambda p: MaskedAdamW(p, lr=1e-2, weight_decay=0.1),
            lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, eps=1e-8),
        ),
    ],
)
def test_unmasked_optimizers_match_torch(ours, stock):
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(4)]
    p1, p2 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    o1, o2 = ours([p1]), stock([p2])
    for g in grads:
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.allclose(p1, p2, atol=1e-6)


@pytest.mark.parametrize(
    ("ours", "stock"),
    [
        (
            lambda p, **k: MaskedRMSprop(p, lr=1e-2, weight_decay=0.05, **k),
            lambda p: torch.optim.RMSprop(p, lr=1e-2, alpha=0.99, eps=1e-8),
        ),
        (
            lambda p, **k: MaskedAdamW(p, lr=1e-2, weight_decay=0.1, **k),
            lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, eps=1e-8),
        ),
    ],
)
@pytest.mark.parametrize("density", [0.1, 0.9])  # 0.9: LoTTO's calibration, stepped densely
def test_masked_step_is_stock_on_the_trainable_entries_and_leaves_the_rest_bit_identical(ours, stock, density):
    """The masked optimizer steps a parameter's trainable entries as the stock optimizer
    steps them as a tensor of their own (clipped by their own norm, decayed, with a
    parameter that misses a step keeping its own count); frozen entries keep their bits
    even where their gradient is NaN or huge and their weight is -0.0; its state holds only
    the trainable entries."""
    torch.manual_seed(0)
    w = torch.randn(40, 30)
    w.view(-1)[::5] = -0.0
    m = torch.rand(40, 30) < density
    other = torch.randn(7)
    p, q = torch.nn.Parameter(w.clone()), torch.nn.Parameter(other.clone())
    ref, ref_q = torch.nn.Parameter(w[m].clone()), torch.nn.Parameter(other.clone())
    opt = ours([p, q], masks={p: m}, max_grad_norm=0.5)
    stock_opt = stock([ref, ref_q])
    if isinstance(stock_opt, torch.optim.RMSprop):  # ours decays decoupled: RMSprop's own decay is L2
        stock_opt.param_groups[0]["weight_decay"] = 0.0
    for i in range(4):
        g = torch.randn(40, 30)
        g[~m] = torch.where(torch.rand(int((~m).sum())) < 0.5, float("nan"), 1e6)
        p.grad, ref.grad = g.clone(), g[m].clone()
        gq = torch.randn(7) if i != 2 else None  # q misses step 3
        q.grad, ref_q.grad = gq, (None if gq is None else gq.clone())
        opt.step()
        if ref.grad.norm() > 0.5:
            ref.grad.mul_(0.5 / (ref.grad.norm() + 1e-6))
        if ref_q.grad is not None and ref_q.grad.norm() > 0.5:
            ref_q.grad.mul_(0.5 / (ref_q.grad.norm() + 1e-6))
        if isinstance(stock_opt, torch.optim.RMSprop):
            with torch.no_grad():
                ref.mul_(1 - 1e-2 * 0.05)
                if ref_q.grad is not None:
                    ref_q.mul_(1 - 1e-2 * 0.05)
        stock_opt.step()
    assert torch.equal(p.detach()[~m].view(torch.int32), w[~m].view(torch.int32))  # bits, -0.0 included
    assert torch.allclose(p.detach()[m], ref.detach(), atol=1e-6)
    assert torch.allclose(q.detach(), ref_q.detach(), atol=1e-6)
    per_entry = len(opt._state_keys) * 4
    if density < 0.5:  # state and index only for the trainable entries
        assert opt.state_bytes() == per_entry * (int(m.sum()) + 7)  # not per_entry * (1200 + 7)
        assert opt.index_bytes() == 4 * int(m.sum())
    else:  # dense state; the index names the frozen entries
        assert opt.state_bytes() == per_entry * (1200 + 7)
        assert opt.index_bytes() == 4 * int((~m).sum())


def test_train_hands_its_clip_to_the_optimizer(tiny, toy, monkeypatch):
    """The per-tensor clip runs inside the optimizer's step now: train() must pass it on
    (and None when clipping is off)."""
    import fl_lota.training.train as train_mod

    seen = []

    def spy(*a, **k):
        opt = build(*a, **k)
        seen.append(opt.max_grad_norm)
        return opt

    build = train_mod.build_optimizer
    monkeypatch.setattr(train_mod, "build_optimizer", spy)
    for clip in (0.25, None):
        finetune("fft", tiny, toy, TrainConfig(steps=1, lr=1e-3, max_grad_norm=clip), pad_id=PAD)
    assert seen == [0.25, None]


def test_per_tensor_clipping():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])
    clip_per_tensor_([a, b], 1.0)
    assert a.grad.norm() == pytest.approx(1.0, rel=1e-5)  # clipped
    assert torch.allclose(b.grad, torch.tensor([0.3, 0.4, 0.0]))  # left alone


@pytest.mark.parametrize("bf16", [True, False])
def test_grad_accumulation_and_precision(tiny, toy, bf16):
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=4, grad_accum=2, bf16=bf16)
    res = finetune("fft", tiny, toy, cfg, pad_id=PAD)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert all(p.dtype == torch.float32 for p in tiny.parameters())  # float32 masters


def test_collate_masks_prompt_and_padding():
    from fl_lota.training.data import Example

    batch = collate([Example((1, 5, 6), (7, 8)), Example((1, 9), (4,))], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8], [1, 9, 4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, 8], [-100, -100, 4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    cut = collate([Example((1, 2, 3, 4, 5), (7, 8))], pad_id=0, max_len=4)  # prompt loses its left
    assert cut["input_ids"].tolist() == [[4, 5, 7, 8]]


def test_bad_configuration_is_named(tiny, toy):
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['lrate'\]"):
        TrainConfig.from_dict({"lrate": 1e-3})
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sparsty'\] for method 'lota'"):
        finetune("lota", tiny, toy, CFG, pad_id=PAD, sparsty=0.9)
    with pytest.raises(ValueError, match="unknown fine-tuning method 'qlora'"):
        finetune("qlora", tiny, toy, CFG, pad_id=PAD)
    with pytest.raises(ValueError, match="no training examples"):
        finetune("fft", tiny, [], CFG, pad_id=PAD)
    with pytest.raises(ModelNotFoundError, match="cannot load model '/nonexistent/model'"):
        load_model("/nonexistent/model")


def test_library_never_imports_flower():
    root = pathlib.Path(__file__).resolve().parents[1] / "fl_lota"
    for path in root.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+flwr(\.|\s|$)", path.read_text(), re.M), path


def test_sparse_lr_changes_only_the_sparse_phase(toy):
    cfg = TrainConfig(steps=3, lr=1e-3)
    a = finetune("lota", load_model("tiny"), toy, cfg, pad_id=PAD)
    b = finetune("lota", load_model("tiny"), toy, cfg, pad_id=PAD, sparse_lr=1e-2)
    assert all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)  # same calibration, same mask
    ratio = sum(float(b.delta[n].values.abs().sum()) for n in b.delta) / sum(
        float(a.delta[n].values.abs().sum()) for n in a.delta
    )
    assert ratio > 3  # RMSprop moves each entry about lr per step
    with pytest.raises(ValueError, match="sparse_lr must be > 0"):
        finetune("lota", load_model("tiny"), toy, cfg, pad_id=PAD, sparse_lr=0.0)
