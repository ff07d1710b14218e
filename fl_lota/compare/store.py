"""The comparison's stored units: each finished unit is a JSON file holding the settings
that made it (its key) and its result; a unit is reused only when its key matches, with
settings that RunConfig gained since counted at their defaults."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

from fl_lota.federated.files import write_atomic
from fl_lota.federated.runconfig import RunConfig
from fl_lota.tasks import Task

__all__ = [
    "aside",
    "cached",
    "completed",
    "digest",
    "plain",
    "settings",
    "store",
    "stored",
    "task_fingerprint",
    "unit_key",
    "write_json",
]


def write_json(path: Path, obj: object) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def completed(stored: Mapping[str, object], current: Mapping[str, object]) -> dict[str, object]:
    """A stored run config with the keys RunConfig gained since filled in at their
    defaults (``RunConfig.completed``), restricted to the keys either side holds."""
    filled = RunConfig.completed(stored)
    return {k: v for k, v in filled.items() if k in current or k in stored}


def same_key(stored: object, key: Mapping[str, object]) -> bool:
    if not isinstance(stored, dict):
        return False
    if isinstance(stored.get("config"), dict) and "config" in key:
        stored = stored | {"config": completed(stored["config"], key["config"])}
    return stored == key


def stored(path: Path, key: Mapping[str, object]) -> dict | None:
    """The result stored at ``path`` if it was made with ``key`` (settings that RunConfig
    gained since count at their defaults), else None."""
    if path.is_file():
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        if same_key(record.get("key"), plain(key)):
            return record["result"]
    return None


def cached(path: Path, key: Mapping[str, object], compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The stored result at ``path`` if it was made with ``key``, else ``compute()``
    (stored with its key). Returns (result, reused)."""
    found = stored(path, key)
    if found is not None:
        return found, True
    result = compute()
    store(path, key, result)
    return result, False


def plain(key: Mapping[str, object]) -> dict:
    """``key`` as it reads back from JSON (tuples become lists), for comparison."""
    return json.loads(json.dumps(key, sort_keys=True))


def store(path: Path, key: Mapping[str, object], result: dict) -> None:
    write_json(path, {"key": plain(key), "result": result})


def unit_key(cfg: RunConfig, task: Task, part: int) -> dict:
    """What makes a single-task run: its settings, its data and its partition."""
    return {"config": cfg.identity(), "task": task_fingerprint(task), "partition": part}


def digest(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def task_fingerprint(task: Task) -> str:
    """The task's name and a digest of its train and test items: a stored unit is reused
    only for the very data it was made with."""
    h = hashlib.blake2b(digest_size=16)
    for split in (task.train, task.test):
        for s in split:
            h.update(json.dumps([s.prompt, s.answer], ensure_ascii=False).encode())
        h.update(b"\x00")
    return f"{task.name}:{h.hexdigest()}"


def settings(cfg: RunConfig) -> dict:
    """A federation's settings as stored: its folders left out, so a comparison folder that
    was moved still recognises its finished runs."""
    return {k: v for k, v in plain(cfg.identity()).items() if k not in ("results_dir", "client_state_dir")}


def aside(folder: Path) -> Path:
    n = 1
    while (aside := folder.with_name(f"{folder.name}.stale-{n}")).exists():
        n += 1
    folder.rename(aside)
    return aside
