"""Loading causal language models: any Hugging Face id or local path, or ``tiny``.

``tiny`` is a small random Llama built from a config (no download), for tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_CONFIG", "ModelNotFoundError", "load_model"]

TINY_CONFIG = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


class ModelNotFoundError(FileNotFoundError):
    """The model id or path names nothing this machine can load."""


def load_model(name: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0, **overrides):
    """``tiny`` (``overrides`` change its config), or a hub id / local path for
    ``AutoModelForCausalLM``. Weights stay in ``dtype`` (float32 masters by default:
    bf16 autocast handles the compute)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name == "tiny":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY_CONFIG, **overrides}))
        return model.to(dtype=dtype, device=device)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **overrides)
    except OSError as e:
        hint = "no such local folder" if not Path(name).exists() else "the folder holds no loadable model"
        raise ModelNotFoundError(
            f"cannot load model {name!r}: {hint}, and no cached hub copy ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    return model.to(device)
