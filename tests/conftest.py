"""Shared fixtures: a tiny random Llama and a toy task it can learn in a few steps."""

from __future__ import annotations

import random

import pytest
import torch

from fl_lota.training.data import Example
from fl_lota.training.models import load_model

PAD, BOS, SEP = 0, 1, 2


def reverse_task(n: int, seed: int = 0, length: int = 5) -> list[Example]:
    """Prompt: BOS x1..xL SEP; answer: xL..x1 (tokens 3..29 of the tiny vocabulary)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        xs = [rng.randrange(3, 30) for _ in range(length)]
        out.append(Example(tuple([BOS, *xs, SEP]), tuple(xs[::-1])))
    return out


def constant_task(n: int, token: int, seed: int = 0) -> list[Example]:
    """Prompt: BOS x1..x4 SEP; answer: ``token`` twice (a second, different task)."""
    rng = random.Random(seed)
    return [Example(tuple([BOS, *(rng.randrange(3, 30) for _ in range(4)), SEP]), (token, token)) for _ in range(n)]


@pytest.fixture
def tiny():
    return load_model("tiny", seed=0)


@pytest.fixture
def toy():
    return reverse_task(64)


@torch.no_grad()
def mean_loss(model, examples, pad_id: int = PAD) -> float:
    from fl_lota.training.data import collate

    batch = collate(examples, pad_id)
    model.eval()
    return float(model(**batch).loss)


def _superlink_home(home):
    """A Flower home whose local SuperLink (started by the first ``flwr run`` on it) is
    stopped when the fixture ends."""
    from fl_lota.federated.launch import stop_local_superlink

    try:
        yield home
    finally:
        stop_local_superlink(home)


@pytest.fixture(scope="module")
def flwr_home(tmp_path_factory):
    """One Flower home (and SuperLink) shared by a module's runs."""
    yield from _superlink_home(tmp_path_factory.mktemp("flwr-home"))


@pytest.fixture
def own_flwr_home(tmp_path):
    """A Flower home of this test alone: a SuperLink the test itself starts, with the
    environment it sets (a shared one may already run with another)."""
    yield from _superlink_home(tmp_path / "flwr-home")
