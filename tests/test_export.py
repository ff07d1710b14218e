"""fl-lota export: the merged model as a Hugging Face folder that plain transformers loads
with fl-lota's own logits, client updates in a format others read, named errors."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file
from test_federated import TINY

from fl_lota.cli import main as cli_main
from fl_lota.federated.aggregator import Aggregator, Upload
from fl_lota.federated.export import ExportError, export_client_updates, export_model, update_files
from fl_lota.federated.node import LocalNode
from fl_lota.federated.runconfig import RunConfig
from fl_lota.training.models import load, param_shapes
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector

PROMPT = torch.tensor([[1, 40, 77, 120, 9, 200, 31]])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results folder as the ServerApp leaves it: one round of two LoTA clients merged
    with mask_aware, ties scored as a further merge."""
    cfg = RunConfig(**{**TINY, "eval_merges": "ties"})
    out = tmp_path_factory.mktemp("results")
    (out / "config.json").write_text(json.dumps(asdict(cfg)))
    agg = Aggregator(cfg, param_shapes(cfg.model))
    ups = []
    for pid in (0, 1):
        r = LocalNode(cfg, pid).train(agg.global_payload)
        ups.append(Upload(str(pid + 10), r.payload, r.metrics["num-examples"], r.report, pid))
    assert agg.aggregate(ups).accepted == ["10", "11"]
    agg.global_tv.save(out / "global_update.safetensors")
    codec.decode(agg.candidates["ties"]).save(out / "global_update@ties.safetensors")
    (out / "client_updates").mkdir()
    codec.decode(agg.last["10"]).save(out / "client_updates" / "p0-math.safetensors")
    row = {
        "round": 1,
        "scores": {"mask_aware": {"math": 0.5, "classify": 0.75}, "ties": {"math": 0.25, "classify": 0.75}},
        "start_scores": {"math": 0.125, "classify": 0.5},
        "cumulative_uplink_bytes": 1234,
        "cumulative_downlink_bytes": 56,
        "cumulative_eval_downlink_bytes": 78,
    }
    (out / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    return out, agg


def _merged_logits(g: SparseTaskVector) -> torch.Tensor:
    model, _ = load("tiny")
    g.apply_to(model)
    with torch.no_grad():
        return model(PROMPT).logits


def test_exported_model_loads_with_plain_transformers_and_gives_fl_lotas_logits(results, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, agg = results
    assert set(update_files(src)) == {"mask_aware", "ties"}
    out = export_model(src, tmp_path / "model")
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = model(PROMPT).logits
    assert torch.equal(got, _merged_logits(agg.global_tv))
    base, tok = load("tiny")
    with torch.no_grad():
        assert not torch.equal(got, base(PROMPT).logits)  # G is in the weights
    assert AutoTokenizer.from_pretrained(out)("12+30=")["input_ids"] == tok("12+30=")["input_ids"]
    card = (out / "README.md").read_text()
    for part in ("Base model**: tiny", "lota + mask_aware", "| math | 0.125 | 0.500 |", "uplink 1,234", "1 rounds"):
        assert part in card, part
    assert "re-merge" not in card


def test_a_further_merge_exports_as_a_labelled_re_merge(results, tmp_path):
    from transformers import AutoModelForCausalLM

    src, agg = results
    out = export_model(src, tmp_path / "ties", merge="ties")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(PROMPT).logits
    assert torch.equal(got, _merged_logits(codec.decode(agg.candidates["ties"])))
    assert not torch.equal(got, _merged_logits(agg.global_tv))
    card = (out / "README.md").read_text()
    assert "lota + ties" in card and "re-merge" in card and "| math | 0.125 | 0.250 |" in card


def test_client_updates_are_plain_safetensors_with_flat_indices(results, tmp_path):
    src, agg = results
    (path,) = export_client_updates(src, tmp_path / "updates")
    raw = load_file(path)  # nothing of fl-lota needed to read and apply it
    model, _ = load("tiny")
    expected, _ = load("tiny")
    codec.decode(agg.last["10"]).apply_to(expected)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in raw:
            name, kind = key.split("::")
            if kind == "values":
                flat = params[name].view(-1)
                idx = raw.get(f"{name}::indices")
                if idx is None:
                    flat += raw[key]
                else:
                    assert bool((idx[1:] > idx[:-1]).all())
                    flat.index_add_(0, idx, raw[key])
    assert all(torch.equal(p, dict(expected.named_parameters())[n]) for n, p in params.items())


def test_export_errors_name_the_problem_and_touch_nothing(results, tmp_path):
    src, _ = results
    with pytest.raises(ExportError, match=r"no global update for merge 'fedavg'; it holds: mask_aware, ties"):
        export_model(src, tmp_path / "a", merge="fedavg")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_model(src, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match=r"no config\.json"):
        export_model(tmp_path, tmp_path / "b")
    # an update from another model does not fit this one
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((src / "config.json").read_text())
    SparseTaskVector.from_dense({"model.norm.weight": torch.ones(3)}).save(other / "global_update.safetensors")
    with pytest.raises(ExportError, match="does not fit model 'tiny'"):
        export_model(other, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c-*"))  # no half-written folder


def test_the_command_line_exports_and_reports_errors(results, tmp_path, capsys):
    src, _ = results
    argv = ["export", str(src), "--out", str(tmp_path / "m"), "--client-updates", str(tmp_path / "u")]
    assert cli_main(argv) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "u" / "p0-math.safetensors").is_file()
    assert cli_main(["export", str(src), "--out", str(tmp_path / "x"), "--merge", "nope"]) == 2
    assert "no global update for merge 'nope'" in capsys.readouterr().err


def test_the_card_shows_only_scores_of_the_exported_weights(results, tmp_path):
    src, _ = results
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "global_update.safetensors"):
        (copy / name).write_bytes((src / name).read_bytes())
    rows = [json.loads((src / "metrics.jsonl").read_text()), {"round": 2, "scores": {}}]  # round 2 not scored
    (copy / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = (export_model(copy, tmp_path / "m") / "README.md").read_text()
    assert "were not scored in the run" in card and "0.500" not in card
