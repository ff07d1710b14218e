"""Server checkpoints: written atomically, read back exactly, every file checked against its
recorded checksum: a changed byte is an error naming the file, never a silent resume."""

from __future__ import annotations

import random

import pytest
import torch
from test_federated import sparse_tv

from fl_lota.federated.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


def ckpt(rnd: int) -> Checkpoint:
    random.seed(rnd)
    return Checkpoint(
        round=rnd,
        global_tv=sparse_tv(rnd),
        masks={"p0": sparse_tv(10), "p1": sparse_tv(11)},
        rows=[{"round": r, "uplink_bytes": 100 * r} for r in range(1, rnd + 1)],
        config={"method": "lota", "sparsity": 0.9},
        rng=random.getstate(),
        extra={"run_tag": "abc123"},
    )


def same_tv(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n].to_dense(), b[n].to_dense()) for n in a)


def test_round_trip(tmp_path):
    c = ckpt(3)
    save_checkpoint(tmp_path, c)
    back = load_checkpoint(tmp_path)
    assert back.round == 3 and back.rows == c.rows and back.config == c.config and back.extra == c.extra
    assert same_tv(back.global_tv, c.global_tv) and set(back.masks) == {"p0", "p1"}
    assert same_tv(back.masks["p1"], c.masks["p1"])
    random.setstate(back.rng)
    a = random.random()
    random.setstate(c.rng)
    assert a == random.random()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_newest_complete_checkpoint_wins_and_old_ones_go(tmp_path):
    for r in (1, 2, 3):
        save_checkpoint(tmp_path, ckpt(r))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("round-")) == ["round-0003"]
    assert load_checkpoint(tmp_path).round == 3


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, ckpt(1), keep=2)
    save_checkpoint(tmp_path, ckpt(2), keep=2)
    (tmp_path / ".round-0003.tmp-999").mkdir()  # a write that never finished
    (tmp_path / ".round-0003.tmp-999" / "global.safetensors").write_bytes(b"partial")
    assert load_checkpoint(tmp_path).round == 2


def test_no_checkpoint_and_unreadable_ones(tmp_path):
    assert load_checkpoint(tmp_path / "none") is None
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, ckpt(1))
    (tmp_path / "round-0001" / "global.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"global\.safetensors: its sha256 differs"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["global.safetensors", "mask-p1.safetensors", "state.json"])
def test_one_changed_byte_in_any_file_is_an_error_naming_it(tmp_path, name):
    save_checkpoint(tmp_path, ckpt(2), keep=2)
    save_checkpoint(tmp_path, ckpt(3), keep=2)  # an older, intact round is no excuse to resume from it
    f = tmp_path / "round-0003" / name
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"round-0003/{name}"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_without_its_manifest_is_refused(tmp_path):
    save_checkpoint(tmp_path, ckpt(1))
    (tmp_path / "round-0001" / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=r"no MANIFEST\.json"):
        load_checkpoint(tmp_path)


def test_unsafe_mask_keys_are_refused(tmp_path):
    c = ckpt(1)
    c.masks = {"../evil": sparse_tv(0)}
    with pytest.raises(ValueError, match="safe file name"):
        save_checkpoint(tmp_path, c)


@pytest.mark.parametrize("manifest", [b"[1, 2]", b'{"state.json": null, "global.safetensors": 3}', b"\xff{"])
def test_a_manifest_that_is_not_a_digest_table_is_named(tmp_path, manifest):
    save_checkpoint(tmp_path, ckpt(1))
    (tmp_path / "round-0001" / "MANIFEST.json").write_bytes(manifest)
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json: not"):
        load_checkpoint(tmp_path)
