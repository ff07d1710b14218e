"""Fine-tune one model on one task and report what it gained and what it would cost to send.

    python -m fl_lota.tune --task math --method lota --sparsity 0.9
    python -m fl_lota.tune --task gsm8k --source ../shared/data/gsm8k --method fft

Prints the base score, the fine-tuned score, trained parameters, time and the encoded size
of the update (the adapter a federated client would upload).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from fl_lota.tasks import TASKS, get_task
from fl_lota.tasks.evaluate import evaluate
from fl_lota.tasks.prompting import to_examples
from fl_lota.training.device import EVAL_PRECISIONS, generation_bf16, precision_name, resolve
from fl_lota.training.methods import FINETUNE_METHODS, finetune
from fl_lota.training.models import DEFAULT_MODEL, load
from fl_lota.training.train import TrainConfig
from fl_lota.vectors import codec

__all__ = ["build_parser", "main", "run"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fl_lota.tune", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=DEFAULT_MODEL, help="'default' (embedded SmolLM2-135M-Instruct), 'tiny', hub id or path"
    )
    ap.add_argument(
        "--task",
        required=True,
        help=f"{', '.join(TASKS)}, or a spec: file:/abs/train.jsonl?prompt=q&answer=a&metric=exact_match (README)",
    )
    ap.add_argument("--source", help="hub name or local folder/file for real datasets")
    ap.add_argument("--method", default="lota", choices=sorted(FINETUNE_METHODS))
    ap.add_argument("--sparsity", type=float, default=0.9, help="lota: frozen fraction (0.9 = 10%% trainable)")
    ap.add_argument("--mask-mode", default="global", choices=["global", "per_tensor"])
    ap.add_argument("--calibration-steps", type=int, default=20, help="lota: full fine-tuning steps for the mask")
    ap.add_argument(
        "--sparse-lr", type=float, default=None, help="lota: learning rate of the sparse phase (default --lr)"
    )
    ap.add_argument("--steps", type=int, default=40, help="training steps (lota: of sparse adaptation)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--optimizer", default="rmsprop", choices=["rmsprop", "adamw"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--values", default="bf16", choices=sorted(codec.VALUE_DTYPES), help="wire dtype of the update")
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    ap.add_argument(
        "--eval-precision",
        default="auto",
        choices=EVAL_PRECISIONS,
        help="generation at evaluation: auto (bf16 when trained so and bf16 is native and fast here: a GPU "
        "from Ampere on, a CPU with AMX or AVX512-BF16 that measures it faster; else float32), bf16 (the model "
        "cast to bf16) or float32",
    )
    ap.add_argument("--device", default="auto", help="auto (cuda when a GPU is visible), cpu, cuda or cuda:N")
    ap.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    ap.add_argument("--save", help="write the task vector to this .safetensors file")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return ap


def run(args: argparse.Namespace, task=None) -> dict:
    """Fine-tune as ``args`` say; returns the figures ``main`` prints."""
    task = task or get_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=args.seed, source=args.source)
    device = resolve(args.device)
    model, tok = load(args.model, device=str(device))
    eval_bf16 = generation_bf16(device, args.eval_precision, not args.no_bf16)
    out = {"task": task.name, "method": args.method, "metric": task.metric, "model": args.model}
    out["eval_precision"] = precision_name(eval_bf16)
    if not args.skip_base:
        out["base"] = evaluate(model, tok, task, bf16=eval_bf16)["score"]
    cfg = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        batch_size=args.batch_size,
        max_grad_norm=args.max_grad_norm,
        bf16=not args.no_bf16,
        seed=args.seed,
    )
    options = {}
    if args.method == "lota":
        options = dict(
            sparsity=args.sparsity,
            mask_mode=args.mask_mode,
            calibration_steps=args.calibration_steps,
            sparse_lr=args.sparse_lr,
        )
    elif args.method == "lora":
        options = dict(rank=args.lora_rank, alpha=2 * args.lora_rank)
    t0 = time.perf_counter()
    res = finetune(args.method, model, to_examples(tok, task.train), cfg, pad_id=tok.pad_token_id, **options)
    out["train_seconds"] = time.perf_counter() - t0
    out["steps"] = len(res.losses)
    out["calibration_steps"] = args.calibration_steps if args.method == "lota" else 0
    out["loss_first"], out["loss_last"] = res.losses[0], res.losses[-1]
    out["tuned"] = evaluate(model, tok, task, bf16=eval_bf16)["score"]
    out["trained_params"] = res.trained_params
    payload = codec.encode(res.delta, values=args.values)
    out["payload_bytes"] = len(payload)
    if args.method == "lota":
        out["payload_values_only_bytes"] = len(codec.encode(res.delta, values=args.values, values_only=True))
    out["dense_fp32_bytes"] = 4 * res.delta.numel
    out["phases"] = res.phases
    out["config"] = asdict(cfg)
    if args.save:
        res.delta.save(args.save)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except (FileNotFoundError, ValueError) as e:  # missing model or data, bad option or spec: say so
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.json:
        print(json.dumps(out))
        return out
    print(f"task {out['task']} ({out['metric']}), method {out['method']}, model {out['model']}")
    if "base" in out:
        print(f"  base score       {out['base']:.3f}")
    print(f"  fine-tuned score {out['tuned']:.3f}")
    print(f"  trained params   {out['trained_params']:,}")
    loss = f"loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}"
    steps = f"{out['calibration_steps']} calibration + {out['steps']}" if out["calibration_steps"] else out["steps"]
    print(f"  training         {steps} steps, {out['train_seconds']:.0f} s, {loss}")
    mb = out["payload_bytes"] / 1e6
    print(f"  encoded update   {mb:.2f} MB ({args.values}); dense fp32 {out['dense_fp32_bytes'] / 1e6:.1f} MB")
    if "payload_values_only_bytes" in out:
        print(f"  values-only      {out['payload_values_only_bytes'] / 1e6:.2f} MB (later federated rounds)")
    return out


if __name__ == "__main__":
    main()
