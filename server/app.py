"""The ServerApp: runs the rounds with LotaFedAvg and writes the results folder.

<results-dir>/config.json         the parsed run config
<results-dir>/metrics.jsonl       one row per round (server/book.py documents the keys)
<results-dir>/summary.md          per-round table: bytes and scores
<results-dir>/scores.png, bytes.png
<results-dir>/global_update.safetensors   the final merged update G (base + G = global model)
<results-dir>/global_update@<merge>.safetensors   each further merge scored in the last round
<results-dir>/client_updates/p<N>-<client>.safetensors   each client's last accepted update

(``fl_lota.federated.export`` documents the formats; ``fl-lota export`` makes a Hugging Face model.)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

import fl_lota.preload  # noqa: F401  (first: the model libraries in one thread at a time)
from fl_lota.federated import reaper, report
from fl_lota.federated.checkpoint import load_checkpoint
from fl_lota.federated.precheck import check_run
from fl_lota.federated.runconfig import RunConfig
from fl_lota.training.models import param_shapes

from . import updates
from .book import RoundBook
from .strategy import LotaFedAvg

app = ServerApp()

NODE_WAIT_SECONDS = 120


def results_dir(cfg: RunConfig) -> Path:
    if cfg.results_dir:
        return Path(cfg.results_dir).expanduser()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path.home() / "fl-lota-results" / f"{stamp}-{cfg.method}-{cfg.merge}"


def wait_for_nodes(grid: Grid, needed: int, timeout: float = NODE_WAIT_SECONDS) -> None:
    """Fail clearly, instead of waiting forever, when the federation lacks SuperNodes."""
    t0 = time.monotonic()
    while (have := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(
                f"the federation needs {needed} SuperNodes (one per client) but {have} connected within "
                f"{timeout:.0f} s; in simulation pass --federation-config 'num-supernodes={needed}'"
            )
        time.sleep(1.0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # in simulation this process also drives Ray: if it is killed hard, the watchdog stops
    # the Ray processes it started (they would otherwise run on, holding memory)
    reaper.watch()
    cfg = RunConfig.from_run_config(context.run_config)
    out = results_dir(cfg)
    ckpt_dir = out / "checkpoint"
    ckpt = load_checkpoint(ckpt_dir)
    if ckpt is None and (out / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{out} holds a run's metrics.jsonl but no checkpoint to resume; choose another results-dir"
        )
    shapes = param_shapes(cfg.model)  # a model that names nothing stops the run here, named
    for label in check_run(cfg, local_only=True, check_model=False):
        log(WARNING, "fl-lota: task %r reads files this machine does not hold; its client checks them", label)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    num_clients = cfg.spec.num_clients
    book = RoundBook(cfg, out)
    strategy = LotaFedAvg(cfg, book, num_clients=num_clients, shapes=shapes)
    first = 1
    if ckpt is not None and ckpt.round > cfg.num_server_rounds:
        raise ValueError(
            f"{out} holds a run of {ckpt.round} rounds, more than num-server-rounds={cfg.num_server_rounds}; "
            "choose another results-dir (or as many rounds)"
        )
    if ckpt is not None:
        t0 = time.perf_counter()
        strategy.restore(ckpt)
        book.rewrite()  # metrics.jsonl as of the checkpoint (a row written after it is dropped)
        first = ckpt.round + 1
        log(INFO, "fl-lota: resuming %s after round %d (%.1f s to restore)", out, ckpt.round, time.perf_counter() - t0)
    else:
        log(INFO, "fl-lota: results go to %s", out)
    wait_for_nodes(grid, num_clients)
    t0 = time.perf_counter()
    strategy.run(grid, first_round=first, checkpoint_dir=ckpt_dir)
    wall = time.perf_counter() - t0
    for problem in updates.finish(out, strategy.aggregator, cfg):
        log(WARNING, "fl-lota: a client's update was not written: %s", problem)
    report.write_run_report(out, book.rows, wall_seconds=wall)
    log(INFO, "fl-lota: %d rounds in %.0f s; summary in %s", len(book.rows), wall, out / "summary.md")
    never = book.never_accepted()
    if never:  # a run without a client's task is not the run that was asked for
        raise RuntimeError(
            "client(s) whose every upload failed or was refused: "
            + "; ".join(f"node {n} ({why})" for n, why in never.items())
            + f"; the summary in {out} lacks their tasks"
        )
