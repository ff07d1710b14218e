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


def test_the_temp_file_is_beside_the_target_and_only_a_durable_write_flushes(tmp_path, monkeypatch):
    replaced, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst)))
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    write_atomic(tmp_path / "x.json", "{}")
    ((src, dst),) = replaced
    assert src.parent == dst.parent == tmp_path and src.name.startswith(".x.json.tmp-")  # a rename, never a copy
    assert len(synced) == 2  # the file, then the folder (the rename)
    write_atomic(tmp_path / "big.fltv", b"\x01" * 10, durable=False)
    assert len(synced) == 2 and (tmp_path / "big.fltv").read_bytes() == b"\x01" * 10


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
