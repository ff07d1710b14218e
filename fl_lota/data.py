"""Tokenised prompt/answer pairs and the batches the trainer consumes.

The loss is taken on answer tokens only: prompt and padding positions get label -100.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["IGNORE_INDEX", "Example", "batch_iterator", "collate"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training pair as token ids (the answer ends with EOS where the model has one)."""

    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.answer_ids:
            raise ValueError("an example needs at least one answer token")


def collate(examples: Sequence[Example], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask (B, T) and labels (B, T) with -100
    outside the answer. Over ``max_len``, the prompt loses tokens from its left so the
    answer survives; an answer longer than ``max_len`` is cut at the right."""
    rows = []
    for ex in examples:
        p, a = list(ex.prompt_ids), list(ex.answer_ids)
        if max_len is not None and len(p) + len(a) > max_len:
            a = a[:max_len]
            p = p[len(p) - (max_len - len(a)) :] if max_len > len(a) else []
        rows.append((p, a))
    T = max(len(p) + len(a) for p, a in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a, dtype=torch.long)
        labels[i, len(p) : n] = torch.tensor(a, dtype=torch.long)
        attn[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def batch_iterator(
    examples: Sequence[Example],
    batch_size: int,
    *,
    pad_id: int,
    seed: int = 0,
    max_len: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches; each epoch is a fresh seeded permutation (same seed, same order)."""
    if not examples:
        raise ValueError("no training examples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            chunk = order[i : i + batch_size]
            if len(chunk) < batch_size and len(examples) >= batch_size:
                break  # drop the ragged tail: every step sees a full batch
            yield collate([examples[j] for j in chunk], pad_id, max_len)
