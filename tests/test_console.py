"""What a person reads: no progress bars off a terminal (a Ray actor's stderr), the
libraries quiet in client processes unless verbose."""

from __future__ import annotations

import io
import logging
import os
import sys

import pytest

from conftest import PAD, reverse_task
from fl_lota import TrainConfig, finetune
from fl_lota.federated.console import quiet_libraries
from fl_lota.training.models import load_model


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("tty", [False, True])
def test_training_draws_a_bar_only_on_a_terminal(tty, monkeypatch):
    err = Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=4, bf16=False)
    finetune("fft", load_model("tiny", seed=0), reverse_task(16), cfg, pad_id=PAD)
    assert ("fft:" in err.getvalue()) is tty


@pytest.fixture
def restore_transformers_verbosity():
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    yield
    tlog.set_verbosity(level)
    tlog.enable_progress_bar()


def test_client_processes_silence_the_libraries_unless_verbose(monkeypatch, restore_transformers_verbosity):
    from transformers.utils import logging as tlog

    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        monkeypatch.setenv(key, "unset")  # put back as they were after the test
    tlog.set_verbosity_info()
    quiet_libraries(verbose=True)
    assert tlog.get_verbosity() == logging.INFO and tlog.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "unset"
    quiet_libraries(verbose=False)
    assert tlog.get_verbosity() == logging.ERROR and not tlog.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
