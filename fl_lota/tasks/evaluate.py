"""Evaluation: batched greedy generation with a KV cache, then each task's metric.

The merging literature reports the *normalized score*: the merged model's score on a task
divided by the score of the model fine-tuned on that task alone, averaged over tasks.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.generation import utils as generation_utils

from fl_lota.tasks.base import Sample, Task
from fl_lota.tasks.prompting import format_prompt
from fl_lota.training.device import check_bf16

__all__ = ["DEFAULT_BATCH", "MIN_SHARED_PREFIX", "bf16_weights", "evaluate", "generate", "shared_prefix"]

# prompts per generation batch: on a 2-core CPU, SmolLM2-135M answered in 0.215 s per item
# at 16 and 0.149 s at 64 (float32); a task's 100 test prompts in one batch took 10.9 s
# against 12.1 s in batches of 64 (math; instruct 14.4 s against 15.9 s; float32, Xeon
# without AMX, 2026-11-24). The KV cache of 128 rows of ~140 tokens is ~0.8 GB
DEFAULT_BATCH = 128


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    batch_size: int = DEFAULT_BATCH,
    progress: bool = True,
    desc: str = "generate",
    chat: bool | Sequence[bool] = True,
    bf16: bool = False,
) -> list[str]:
    """Greedy replies to raw user prompts (formatted with the chat template here), each
    tokenized once; the prefix all prompts of a batch share is computed once (``_greedy``);
    KV cache, stops at EOS; special tokens stripped from the replies.
    ``bf16``: generate with the model in bf16 (``bf16_weights``), about 3x faster than
    float32 on a 2-core AMD EPYC with AVX512-BF16 (SmolLM2-135M, 100 classify prompts: 2.9 s
    against 8.8 s, bench/results/generation) and faster than bf16 autocast, which casts every
    linear layer's input and keeps the rest in float32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        chats = [chat] * len(prompts) if isinstance(chat, bool) else list(chat)
        texts = [format_prompt(tokenizer, p, c) for p, c in zip(prompts, chats, strict=True)]
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=None if progress else True, leave=False):
            rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[i : i + batch_size]]
            with bf16_weights(model, bf16):
                new = _greedy(model, rows, tokenizer.pad_token_id, tokenizer.eos_token_id, max_new_tokens, device)
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return out


@contextmanager
def bf16_weights(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: the model's floating-point parameters hold bf16 copies of their values (the
    model generates in bf16, weights and activations, as an inference server runs it);
    after, even on an error, the same parameter objects hold their own float32 tensors
    again, untouched. Buffers (rotary frequencies) stay as they are. The bf16 copies cost
    half the parameters' bytes while they live; a GPU before Ampere is a DeviceError."""
    if not enabled:
        yield
        return
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != torch.bfloat16]
    if params:
        check_bf16(params[0].device)
    kept = [p.data for p in params]
    try:
        for p in params:  # tied weights are one parameter: cast once
            p.data = p.data.to(torch.bfloat16)
        yield
    finally:
        for p, data in zip(params, kept, strict=True):
            p.data = data


# a shared prefix shorter than this is prefilled with each row (its own forward is not worth it)
MIN_SHARED_PREFIX = 8

# generate's keyword for a cache handed in, and the model output's attribute holding one:
# transformers 5.24 renamed past_key_values to cache (the old name warns until 6.0); earlier
# versions know only the old name
CACHE_KWARG = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def shared_prefix(rows: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one of its own
    (the first forward of generation needs a token to predict from)."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for k in range(max(n, 0)):
        if any(r[k] != first[k] for r in rows):
            return k
    return max(n, 0)


def _can_share_prefix(model) -> bool:
    """Whether a prefix's KV cache can be handed to ``generate`` and repeated for the batch:
    a decoder whose generation config names no cache of its own (a model that asks for a
    static or hybrid cache refuses one passed in) and no beam search (which would need the
    cache repeated per beam)."""
    gc = getattr(model, "generation_config", None)
    return (
        not getattr(model.config, "is_encoder_decoder", False)
        and getattr(gc, "cache_implementation", None) is None
        and getattr(gc, "num_beams", None) in (None, 1)
    )


def _greedy(
    model, rows: list[list[int]], pad: int, eos: int, max_new_tokens: int, device: torch.device
) -> torch.Tensor:
    """Greedy continuations of token ``rows`` (the new tokens, one row each, padded after
    EOS). The prefix every row shares (the chat template's system turn: 24 to 29 of 48 to 86
    tokens in the generated tasks) is run once and its KV cache repeated for the batch; each
    row's own tokens follow it, padded between prefix and suffix (masked out, positions
    counted from the mask), so no row pays for another's prefix or padding in the prefix.
    Rows sharing too little go the plain way: no prefix, which is left padding."""
    p = shared_prefix(rows)
    cache = None
    if p >= MIN_SHARED_PREFIX and _can_share_prefix(model):
        cache = getattr(model(input_ids=torch.tensor([rows[0][:p]], device=device), use_cache=True), CACHE_KWARG)
        # full-attention layers only: a sliding-window or linear-attention layer's state
        # would not follow the padding between prefix and rows
        if isinstance(cache, DynamicCache) and all(type(x) is DynamicLayer for x in cache.layers):
            cache.batch_repeat_interleave(len(rows))
        else:
            cache = None
    if cache is None:
        p = 0
    width = max(len(r) for r in rows) - p  # the longest row's own tokens
    ids = torch.tensor([r[:p] + [pad] * (width - len(r) + p) + r[p:] for r in rows], device=device)
    mask = torch.tensor([[1] * p + [0] * (width - len(r) + p) + [1] * (len(r) - p) for r in rows], device=device)
    if cache is not None and _plain_greedy(model):
        return _greedy_dropping(model, ids[:, p:], mask, cache, pad, eos, max_new_tokens)
    gen = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **{CACHE_KWARG: cache},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=pad,
        eos_token_id=eos,
    )
    return gen[:, p + width :]


# generation settings that make greedy decoding more than the argmax of the logits: with any
# of them set, generation goes through Hugging Face's generate, which applies them
_PROCESSORS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_length": 0,
    "min_new_tokens": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "num_beams": 1,
    "guidance_scale": 1.0,
    "watermarking_config": None,
}


def _plain_greedy(model) -> bool:
    """Whether greedy decoding of ``model`` is the argmax of its logits: its generation
    config sets none of the settings that change the logits (``_PROCESSORS``)."""
    gc = getattr(model, "generation_config", None)
    return gc is not None and all(getattr(gc, k, None) in (None, off) for k, off in _PROCESSORS.items())


def _greedy_dropping(
    model,
    own: torch.Tensor,
    mask: torch.Tensor,
    cache: DynamicCache,
    pad: int,
    eos: int,
    max_new_tokens: int,
) -> torch.Tensor:
    """Greedy decoding that stops each row at its EOS: a row that emitted EOS leaves the batch
    (its KV cache rows are dropped), so the batch shrinks as answers end instead of running
    every row to the longest answer (SmolLM2-135M on the default tasks: half of a math
    batch's answers end by token 10 of 24). ``own``: each row's own tokens (B, W) after the
    prefix held in ``cache`` (B rows); ``mask`` (B, P + W) marks prefix, padding and tokens.
    Positions count from the mask, as Hugging Face's generate counts them. Returns (B,
    max_new_tokens): each row's new tokens, its EOS, then ``pad``."""
    device = own.device
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = torch.full((own.shape[0], max_new_tokens), pad, dtype=torch.long, device=device)
    alive = torch.arange(own.shape[0], device=device)  # the rows still in the batch
    step_ids, step_pos = own, positions[:, -own.shape[1] :]
    kw = {CACHE_KWARG: cache, **keep}  # the cache is updated in place
    for step in range(max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **kw).logits
        nxt = logits[:, -1].argmax(-1)  # (A,)
        out[alive, step] = nxt
        going = nxt != eos
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):  # some rows ended: drop them from the batch and the cache
            idx = going.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            alive, nxt, mask, step_pos = alive[idx], nxt[idx], mask[idx], step_pos[idx]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
    return out


def evaluate(
    model,
    tokenizer,
    task: Task,
    *,
    samples: Sequence[Sample] | None = None,
    batch_size: int = DEFAULT_BATCH,
    max_new_tokens: int | None = None,
    progress: bool = True,
    bf16: bool = False,
) -> dict[str, float]:
    """The task's metrics on its test split (or ``samples``), plus ``n``."""
    samples = task.test if samples is None else samples
    preds = generate(
        model,
        tokenizer,
        [s.prompt for s in samples],
        max_new_tokens=max_new_tokens or task.max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        desc=f"eval {task.name}",
        chat=[s.meta.get("chat", True) for s in samples],
        bf16=bf16,
    )
    return task.score(preds, samples) | {"n": len(samples)}
