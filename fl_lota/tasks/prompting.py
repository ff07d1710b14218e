"""Text samples to token ids: the model's chat template where it has one."""

from __future__ import annotations

from collections.abc import Sequence

from fl_lota.tasks.base import Sample
from fl_lota.training.data import Example

__all__ = ["format_prompt", "to_examples"]


def format_prompt(tokenizer, text: str, chat: bool = True) -> str:
    """The prompt as the model expects it: a user turn plus the assistant header from the
    chat template, or ``"<text>\\nAnswer: "`` for models without one (or ``chat=False``)."""
    if chat and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"{text}\nAnswer: "


def to_examples(tokenizer, samples: Sequence[Sample]) -> list[Example]:
    """Token ids for training: the formatted prompt, then the answer and EOS."""
    eos = tokenizer.eos_token_id
    out = []
    for s in samples:
        p = tokenizer(format_prompt(tokenizer, s.prompt, s.meta.get("chat", True)), add_special_tokens=False)[
            "input_ids"
        ]
        a = tokenizer(s.answer, add_special_tokens=False)["input_ids"]
        out.append(Example(tuple(p), tuple(a) + ((eos,) if eos is not None else ())))
    return out
