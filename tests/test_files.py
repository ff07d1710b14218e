"""write_atomic: the whole file or the old one, never a half-written one or a stray temp file."""

from __future__ import annotations

import os

import pytest

from fl_lota.federated.files import write_atomic


def test_it_writes_bytes_and_text_and_makes_the_folder(tmp_path):
    write_atomic(tmp_path / "a" / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "a" / "c.json", "é\n")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "c.json").read_text(encoding="utf-8") == "é\n"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin", "c.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_atomic(path, "old")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
