"""The server's state after each round, written atomically, so a restarted run resumes.

    <results-dir>/checkpoint/LATEST             name of the newest complete round folder
    <results-dir>/checkpoint/round-0003/
        global.fltv                             G, the cumulative merged update
        mask-<key>.fltv                         each registered LoTA mask (its entries; values zero)
        state.json                              round, config, metrics rows, RNG state, mask keys
        MANIFEST.json                           sha256 of each file above

Update and masks are FLTV payloads (``fl_lota.vectors.codec``), encoded exactly: bf16 values
when every value is a bf16 number (``G`` decoded from a bf16 run always is), else float32;
a mask's zero values compress to almost nothing. That is about 2.2 bytes per entry of ``G``
and 0.6 per entry of a mask, where safetensors files of int64 positions and float32 values
took 12. Checkpoints written as ``global.safetensors`` and ``mask-<key>.safetensors`` (before
2026-11-24) are still read.

A round folder is written under a temporary name, every file fsynced, then renamed into
place; LATEST is replaced the same way (temp file, fsync, ``os.replace``). A crash at any
moment leaves either the previous checkpoint or the new one, never a mix. Reading checks
every file against the manifest: a changed byte is a ``CheckpointError`` naming the file,
never a silent resume from other state. FLTV, safetensors and JSON only, never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from fl_lota.federated.downlink import encode_exact
from fl_lota.federated.files import fsync_dir, fsync_file, write_atomic
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

MANIFEST = "MANIFEST.json"


class CheckpointError(ValueError):
    """A checkpoint whose files do not match their recorded checksums (or lack them)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_ROUND = re.compile(r"^round-(\d{4,})$")
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class Checkpoint:
    round: int
    global_tv: SparseTaskVector
    masks: dict[str, SparseTaskVector]
    rows: list[dict]
    config: dict
    rng: object = None  # random.getstate(), as JSON
    extra: dict = field(default_factory=dict)


def _to_json(obj):
    """random.getstate() holds tuples; JSON turns them into lists (``_from_json`` undoes it)."""
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x) for x in obj]}
    if isinstance(obj, list):
        return [_to_json(x) for x in obj]
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_from_json(x) for x in obj["__tuple__"])
    if isinstance(obj, list):
        return [_from_json(x) for x in obj]
    return obj


def save_checkpoint(folder: str | Path, ckpt: Checkpoint, *, keep: int = 1) -> Path:
    """Write ``ckpt`` as ``folder/round-NNNN`` atomically and point LATEST at it; older
    round folders beyond ``keep`` are removed afterwards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{ckpt.round:04d}"
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for key in ckpt.masks:
        if not _KEY.match(key):
            raise ValueError(f"mask key {key!r} is not a safe file name")
    (tmp / "global.fltv").write_bytes(encode_exact(ckpt.global_tv, "bf16"))
    for key, tv in ckpt.masks.items():
        (tmp / f"mask-{key}.fltv").write_bytes(encode_exact(tv, "bf16"))
    state = {
        "round": ckpt.round,
        "config": ckpt.config,
        "rows": ckpt.rows,
        "rng": _to_json(ckpt.rng),
        "masks": sorted(ckpt.masks),
        "extra": ckpt.extra,
    }
    (tmp / "state.json").write_text(json.dumps(state))
    manifest = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for f in tmp.iterdir():
        fsync_file(f)
    fsync_dir(tmp)
    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    write_atomic(folder / "LATEST", name + "\n")  # fsyncs the folder: the round's rename too
    done = sorted(p for p in folder.iterdir() if _ROUND.match(p.name))
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(round_dir: Path) -> None:
    path = round_dir / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{round_dir}: no {MANIFEST}, so its files cannot be checked")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not JSON") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise CheckpointError(f"{path}: not a table of file names and sha256 digests")
    if "state.json" not in manifest:
        raise CheckpointError(f"{path} lists no state.json")
    if "global.fltv" not in manifest and "global.safetensors" not in manifest:
        raise CheckpointError(f"{path} lists no global.fltv")
    for name, digest in manifest.items():
        f = round_dir / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"{round_dir}: {name!r} listed in its manifest is missing")
        if _sha256(f) != digest:
            raise CheckpointError(
                f"{f}: its sha256 differs from the one {MANIFEST} lists: the file, or the manifest, "
                "was changed or damaged"
            )


def _read(round_dir: Path) -> Checkpoint:
    _verify(round_dir)
    state = json.loads((round_dir / "state.json").read_text())
    manifest = json.loads((round_dir / MANIFEST).read_text())
    masks = {}
    for key in state["masks"]:
        if not _KEY.match(key):
            raise ValueError(f"{round_dir}: bad mask key {key!r}")
        masks[key] = _vector(round_dir, f"mask-{key}", manifest).support()
    return Checkpoint(
        round=int(state["round"]),
        global_tv=_vector(round_dir, "global", manifest),
        masks=masks,
        rows=state["rows"],
        config=state["config"],
        rng=_from_json(state["rng"]),
        extra=state.get("extra", {}),
    )


def _vector(round_dir: Path, stem: str, manifest: dict) -> SparseTaskVector:
    """``<stem>.fltv`` (values held as bf16 when sent so), or an older checkpoint's
    ``<stem>.safetensors``; a file the manifest does not list is a CheckpointError."""
    if f"{stem}.fltv" in manifest:
        return codec.decode((round_dir / f"{stem}.fltv").read_bytes(), native=True)
    if f"{stem}.safetensors" in manifest:
        return SparseTaskVector.load(round_dir / f"{stem}.safetensors")
    raise CheckpointError(f"{round_dir}: {stem}.fltv is not in the manifest")


def load_checkpoint(folder: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``folder``, or None when there is none. Round
    folders that fail to read (a disk error after the rename) fall back to older ones;
    leftover temporary folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted((p for p in folder.iterdir() if _ROUND.match(p.name)), reverse=True)
    latest = folder / "LATEST"
    if latest.is_file():
        named = folder / latest.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.insert(0, named)
    errors = []
    for c in candidates:
        try:
            return _read(c)
        except CheckpointError:
            raise  # changed bytes: say so, never resume from other state
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            errors.append(f"{c.name}: {e}")
    if errors:
        raise ValueError(f"no readable checkpoint in {folder}: {'; '.join(errors)}")
    return None
