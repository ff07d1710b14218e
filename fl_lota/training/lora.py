"""LoRA baseline through peft (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022), on all attention and MLP projections as in the LoTA paper."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from fl_lota.training.train import TrainConfig, TrainStats, train

__all__ = ["LoraOptions", "LoraResult", "lora_finetune"]


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] | str = "all-linear"  # peft: every linear layer but the LM head

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class LoraResult:
    delta: dict[str, torch.Tensor]  # dense B @ A * alpha / r per adapted weight
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight -> (B * alpha / r, A): (out, r), (r, in)
    stats: TrainStats
    n_params: int  # adapter parameters trained


def lora_finetune(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    opts: LoraOptions,
) -> LoraResult:
    """Train LoRA adapters, merge them into ``model`` in place (the model ends tuned, as
    after the other methods) and return the dense deltas and the low-rank factors per
    adapted weight (named as in ``model``), the stats and the adapter parameter count."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    targets = opts.targets if isinstance(opts.targets, str) else list(opts.targets)
    pcfg = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, pcfg)
    params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    try:
        stats = train(peft_model, params, batches, cfg, desc="lora")
    except BaseException:
        peft_model.unload()  # the model as it was: adapters removed, nothing merged
        raise
    delta, factors = {}, {}
    with torch.no_grad():
        for name, mod in peft_model.base_model.model.named_modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                delta[f"{name}.weight"] = mod.get_delta_weight("default").detach().float().clone()
                b = mod.lora_B["default"].weight.detach().float() * mod.scaling["default"]
                factors[f"{name}.weight"] = (b.clone(), mod.lora_A["default"].weight.detach().float().clone())
    n_params = sum(p.numel() for p in params.values())
    peft_model.merge_and_unload()
    return LoraResult(delta, factors, stats, n_params)
