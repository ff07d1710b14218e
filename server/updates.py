"""The run's updates on disk, for ``fl-lota export``: G of every merge scored last, and each
client's last accepted update.

Each round, every accepted upload is written as it came (the compressed FLTV payload,
atomically) to ``client_updates/.p<N>-<task>.fltv``; a full upload (one that carries its
mask) also to ``.p<N>-<task>.mask.fltv``. The server keeps none of them in memory, and a
resumed run finds them. At the end ``finish`` decodes each client's last payload (a
values-only one against its last full upload) into ``client_updates/p<N>-<task>.safetensors``
(``fl_lota.federated.export`` documents the format). The payloads stay (hidden, about one upload and
one mask per client): a run resumed for more rounds decodes its later values-only uploads
against them.
"""

from __future__ import annotations

import re
from pathlib import Path

from fl_lota.federated.aggregator import Aggregator
from fl_lota.federated.export import CLIENT_UPDATES
from fl_lota.federated.files import write_atomic
from fl_lota.federated.runconfig import RunConfig
from fl_lota.vectors import codec

from .book import RoundBook

__all__ = ["finish", "spill"]


def _stem(pid: int | None, book: RoundBook, node: str) -> str:
    name = f"p{pid}-{book.client_name(pid)}" if pid is not None else f"node{node}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def spill(out: Path, agg: Aggregator, book: RoundBook) -> None:
    """Write this round's accepted uploads (``agg.last``) under ``out``."""
    folder = out / CLIENT_UPDATES
    for node, payload in agg.last.items():
        folder.mkdir(parents=True, exist_ok=True)
        stem = _stem(agg.partition_of(node), book, node)
        if not codec.peek(payload).values_only:
            write_atomic(folder / f".{stem}.mask.fltv", payload, durable=False)
        write_atomic(folder / f".{stem}.fltv", payload, durable=False)  # no flush per round: up to GBs


def finish(out: Path, agg: Aggregator, cfg: RunConfig) -> list[str]:
    """G files and the clients' last updates as safetensors; returns what could not be
    written, with why (a run's results are kept whatever one file holds)."""
    problems = []
    agg.global_tv.save(out / "global_update.safetensors")
    for stale in out.glob("global_update@*.safetensors"):
        stale.unlink()  # from an earlier run of this folder: only this run's last re-merges stay
    for name, payload in agg.candidates.items():
        if name != cfg.merge:
            codec.decode(payload).save(out / f"global_update@{name}.safetensors")
    folder = out / CLIENT_UPDATES
    for path in sorted(folder.glob(".*.fltv")) if folder.is_dir() else []:
        if path.name.endswith(".mask.fltv"):
            continue
        stem = path.name[1 : -len(".fltv")]
        try:
            payload = path.read_bytes()
            mask = None
            if codec.peek(payload).values_only:
                mask = codec.decode((folder / f".{stem}.mask.fltv").read_bytes())
            codec.decode(payload, mask=mask).save(folder / f"{stem}.safetensors")
        except (OSError, ValueError) as e:  # CodecError included
            problems.append(f"{stem}: {type(e).__name__}: {e}")
    return problems
