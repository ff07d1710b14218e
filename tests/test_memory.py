"""The server's memory figures: the round's own peak, not the process's lifetime one."""

import sys

import pytest
import torch

from fl_lota.federated import memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


@linux
def test_the_peak_starts_afresh_and_sees_a_freed_allocation():
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    del big
    assert memory.reset_peak()
    start = memory.peak_mb()
    assert start is not None and start < memory.rss_mb() + 64  # the old 256 MiB peak is gone
    x = torch.ones(32 * 2**20)  # 128 MiB, touched
    during = memory.rss_mb()
    del x
    peak = memory.peak_mb()
    # the peak saw it, after it was freed too (the kernel batches RSS counts per thread: a
    # few MiB either way)
    assert during - start > 100 and peak - start > 100 and peak >= during - 16


def test_no_figures_where_proc_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_STATUS", tmp_path / "absent")
    assert memory.rss_mb() is None and memory.peak_mb() is None
