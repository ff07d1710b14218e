"""Tokenised prompt/answer pairs and the batches the trainer consumes.

The loss is taken on answer tokens only: prompt and padding positions get label -100.
A client reads its examples as one endless seeded stream (``stream_order``, ``DataStream``):
each round, and each phase within a round, continues where the last one stopped, so a
federated run walks through the local data instead of replaying its first batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["IGNORE_INDEX", "DataStream", "Example", "batch_iterator", "client_stream_seed", "collate", "stream_order"]

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


def _epoch_seed(seed: int | str, epoch: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def client_stream_seed(seed: int, partition: int) -> str:
    """The seed of federated client ``partition``'s example stream in a run seeded ``seed``:
    ``stream_order(n, client_stream_seed(seed, p), start, count)`` lists the examples it used."""
    return f"{seed}:p{partition}"


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int | str, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
    return tuple(torch.randperm(n, generator=g).tolist())


def stream_order(n: int, seed: int | str, start: int, count: int) -> list[int]:
    """Example indices at positions ``[start, start + count)`` of an endless stream over
    ``n`` examples: epoch ``e`` (positions ``e*n .. (e+1)*n - 1``) is a permutation of
    ``range(n)`` seeded by ``(seed, e)``. Any position is reached without replaying the
    ones before it, so a client can continue its stream in any round, after any restart."""
    if n < 1:
        raise ValueError("no training examples")
    if start < 0 or count < 0:
        raise ValueError(f"stream positions must be >= 0, got start={start}, count={count}")
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, off = divmod(pos, n)
        perm = _permutation(n, seed, epoch)
        take = min(n - off, count - len(out))
        out.extend(perm[off : off + take])
        pos += take
    return out


class DataStream:
    """Endless full batches read from position ``start`` of a client's example stream
    (``stream_order``): batch ``k`` holds the examples at positions
    ``start + k*batch_size ..``, crossing epoch boundaries where it must. ``seen`` lists the
    example indices served so far, in order; ``position`` is where the next batch begins.
    Every fine-tuning phase of a round reads on from where the previous one stopped."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        pad_id: int,
        seed: int | str = 0,
        start: int = 0,
        max_len: int | None = None,
    ) -> None:
        if not examples:
            raise ValueError("no training examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = examples
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.start = self.position = start
        self.max_len = max_len
        self.seen: list[int] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        idx = stream_order(len(self.examples), self.seed, self.position, self.batch_size)
        self.position += self.batch_size
        self.seen += idx
        return collate([self.examples[j] for j in idx], self.pad_id, self.max_len)

    @property
    def batches(self) -> int:
        """Batches served so far (each one forward and one backward pass)."""
        return (self.position - self.start) // self.batch_size


def batch_iterator(
    examples: Sequence[Example],
    batch_size: int,
    *,
    pad_id: int,
    seed: int | str = 0,
    max_len: int | None = None,
    start: int = 0,
) -> DataStream:
    """Endless batches from position ``start`` of the seeded stream (a ``DataStream``)."""
    return DataStream(examples, batch_size, pad_id=pad_id, seed=seed, start=start, max_len=max_len)
