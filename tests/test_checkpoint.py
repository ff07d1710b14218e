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
        masks={"p0": sparse_tv(10).support(), "p1": sparse_tv(11).support()},  # masks: positions
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
    (tmp_path / ".round-0003.tmp-999" / "global.fltv").write_bytes(b"partial")
    assert load_checkpoint(tmp_path).round == 2


def test_no_checkpoint_and_unreadable_ones(tmp_path):
    assert load_checkpoint(tmp_path / "none") is None
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, ckpt(1))
    (tmp_path / "round-0001" / "global.fltv").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"global\.fltv: its sha256 differs"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["global.fltv", "mask-p1.fltv", "state.json"])
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


@pytest.mark.parametrize("manifest", [b"[1, 2]", b'{"state.json": null, "global.fltv": 3}', b"\xff{"])
def test_a_manifest_that_is_not_a_digest_table_is_named(tmp_path, manifest):
    save_checkpoint(tmp_path, ckpt(1))
    (tmp_path / "round-0001" / "MANIFEST.json").write_bytes(manifest)
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json: not"):
        load_checkpoint(tmp_path)


def test_update_and_masks_are_stored_exactly_at_the_size_they_take_on_the_wire(tmp_path):
    """G held as bf16 goes as bf16 (float32 values as float32: exact either way); a mask's
    zero values take almost nothing. Safetensors files took 12 bytes per entry."""
    g = sparse_tv(1, density=0.3, shapes={"a": (256, 256)})
    g16 = g.with_values({n: t.values.to(torch.bfloat16) for n, t in g.items()})
    mask = sparse_tv(2, density=0.1, shapes={"a": (256, 256)}).support()
    c = ckpt(1)
    c.global_tv, c.masks = g16, {"p0": mask}
    folder = save_checkpoint(tmp_path, c)
    back = load_checkpoint(tmp_path)
    assert same_tv(back.global_tv, g16) and torch.equal(back.masks["p0"]["a"].indices, mask["a"].indices)
    assert (folder / "global.fltv").stat().st_size < 3 * g.nnz  # bf16 values and coded gaps
    assert (folder / "mask-p0.fltv").stat().st_size < 1 * mask.nnz
    c.global_tv = g  # float32 values that bf16 cannot hold go as float32
    save_checkpoint(tmp_path, c)
    assert same_tv(load_checkpoint(tmp_path).global_tv, g)


def test_a_checkpoint_written_as_safetensors_is_still_read(tmp_path):
    """Checkpoints before FLTV files: global.safetensors and mask-<key>.safetensors."""
    import hashlib
    import json

    c = ckpt(2)
    folder = save_checkpoint(tmp_path, c)
    for f in folder.glob("*.fltv"):
        f.unlink()
    c.global_tv.save(folder / "global.safetensors")
    for key, m in c.masks.items():
        m.save(folder / f"mask-{key}.safetensors")
    manifest = {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.name != "MANIFEST.json"
    }
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    back = load_checkpoint(tmp_path)
    assert same_tv(back.global_tv, c.global_tv) and same_tv(back.masks["p1"], c.masks["p1"])
