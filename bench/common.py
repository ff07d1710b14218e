"""Helpers shared by the bench scripts: SmolLM2-135M shapes, sparse vectors, memory."""

from __future__ import annotations

import math

import torch

from fl_lota.federated import memory
from fl_lota.vectors.task_vector import SparseTaskVector, SparseTensor

# SmolLM2-135M: hidden 576, MLP 1536, 9 query / 3 key-value heads of 64, 30 layers, vocab 49152
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def smollm2_shapes(with_embeddings: bool = True) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of SmolLM2-135M (134.5M entries with the tied embedding)."""
    h, f, kv = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"], 3 * 64
    shapes = {"model.embed_tokens.weight": (SMOLLM2["vocab_size"], h)} if with_embeddings else {}
    for i in range(SMOLLM2["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (h, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (f, h),
            f"{p}.mlp.up_proj.weight": (f, h),
            f"{p}.mlp.down_proj.weight": (h, f),
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
        }
    return shapes | {"model.norm.weight": (h,)}


def random_sparse(shapes, density: float, seed: int, scale: float = 1e-4) -> SparseTaskVector:
    """A task vector with a uniformly random mask at ``density`` (Bernoulli per entry, as
    a top-k mask of noise-like deltas looks) and N(0, scale) values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        idx = torch.nonzero(torch.rand(n, generator=g) < density).reshape(-1)
        out[name] = SparseTensor(tuple(shape), idx, torch.randn(idx.numel(), generator=g) * scale)
    return SparseTaskVector(out)


def reset_peak_rss() -> None:
    """Reset the peak to the current RSS (Linux: write 5 to clear_refs)."""
    if not memory.reset_peak():
        raise SystemExit("this bench measures peak memory through /proc (Linux)")
