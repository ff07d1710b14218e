"""The task type: text samples with a seeded train/test split and a metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["NAMES", "SPLITS", "Sample", "Task", "by_split", "unique_split"]


@dataclass(frozen=True)
class Sample:
    """prompt: the user's request; answer: the target reply; meta: what the metric needs
    (SQL set-up, answer choices, the reference number ...)."""

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Task:
    name: str
    metric: str  # key of fl_lota.tasks.metrics.METRICS: the task's headline score
    train: list[Sample]
    test: list[Sample]
    extra_metrics: tuple[str, ...] = ()
    max_new_tokens: int = 48

    def score(self, predictions: Sequence[str], samples: Sequence[Sample] | None = None) -> dict[str, float]:
        """Mean of the task's metric (``score``) and its extra metrics over the test set
        (or ``samples``), in [0, 1]."""
        from fl_lota.tasks.metrics import METRICS

        samples = self.test if samples is None else samples
        if len(predictions) != len(samples):
            raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
        out = {}
        for name in (self.metric, *self.extra_metrics):
            fn = METRICS[name]
            vals = [fn(p, s) for p, s in zip(predictions, samples, strict=True)]
            out[name] = sum(vals) / max(len(vals), 1)
        out["score"] = out[self.metric]
        return out


def unique_split(
    make_train: Callable[[], Sample],
    make_test: Callable[[], Sample],
    n_train: int,
    n_test: int,
    max_tries: int = 100,
) -> tuple[list, list]:
    """``n_test`` distinct test prompts from ``make_test``, then ``n_train`` distinct train
    prompts from ``make_train`` that are not test prompts: train and test cannot overlap."""
    seen: set[str] = set()

    def draw(make: Callable[[], Sample], n: int, what: str) -> list[Sample]:
        out, tries = [], 0
        while len(out) < n:
            s = make()
            if s.prompt in seen:
                tries += 1
                if tries > max_tries * (n_train + n_test):
                    raise ValueError(f"generator ran out of distinct {what} prompts after {len(out)}")
                continue
            seen.add(s.prompt)
            out.append(s)
        return out

    test = draw(make_test, n_test, "test")
    return draw(make_train, n_train, "train"), test


# ---- shared by the generated tasks (fl_lota.tasks.generated, generated_text)

NAMES = [
    "Anna",
    "Ben",
    "Carla",
    "David",
    "Elena",
    "Farid",
    "Grace",
    "Hugo",
    "Ines",
    "Jamal",
    "Kira",
    "Liam",
    "Maya",
    "Noah",
    "Olga",
    "Pedro",
    "Quinn",
    "Rosa",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Wes",
    "Yuki",
]

SPLITS = ("train", "test")


def by_split(split: str, train: Sequence, test: Sequence):
    """The phrasings of ``split``: a generated task's train and test wordings are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return train if split == "train" else test
