"""The ``fl-lota`` command.

    fl-lota run      [--conf FILE] [--set key=value ...] [--supernodes N] [--gpus-per-client F]
    fl-lota compare  [--grid "lota:mask_aware,ties fft:fedavg,ties lora:fedavg"] [--conf FILE] ...
    fl-lota tune     --task sql ...          (one model, one task: python -m fl_lota.tune)

``run`` and ``compare`` drive ``flwr run`` on ``sims/heterogeneous_tasks`` (or ``--app``) and
check that each run finished as completed. ``compare`` runs one simulation per fine-tuning
method; the merges listed for a method are all scored on that run's uploads every round
(the first one makes the global model), so one training run compares several merges. It
writes compare.md, compare.json and compare.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from . import report
from .launch import RunFailed, launch
from .merge import MERGE_METHODS
from .methods import FINETUNE_METHODS
from .partition import FederationSpec
from .runconfig import KEYS, RunConfig, RunConfigError

__all__ = ["main", "parse_grid", "parse_sets"]

DEFAULT_APP = "sims/heterogeneous_tasks"
DEFAULT_GRID = "lota:mask_aware,ties fft:fedavg,ties lora:fedavg"


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"lota:mask_aware,ties fft:fedavg"`` -> [("lota", ["mask_aware", "ties"]), ("fft", ["fedavg"])]."""
    out = []
    for part in text.split():
        method, sep, merges = part.partition(":")
        names = [m for m in merges.split(",") if m]
        if not sep or not names:
            raise ValueError(f"bad grid entry {part!r}; expected method:merge[,merge...]")
        if method not in FINETUNE_METHODS:
            raise ValueError(f"unknown fine-tuning method {method!r} in grid; known: {sorted(FINETUNE_METHODS)}")
        bad = [m for m in names if m not in MERGE_METHODS]
        if bad:
            raise ValueError(f"unknown merge method(s) {bad} in grid; known: {sorted(MERGE_METHODS)}")
        out.append((method, names))
    if not out:
        raise ValueError("empty grid")
    return out


def parse_sets(items: list[str]) -> dict[str, object]:
    """``key=value`` pairs, values read as TOML (strings may stay unquoted)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key not in KEYS:
            raise RunConfigError(f"unknown run config key {key!r}; known: {sorted(KEYS)}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def _effective(app: Path, conf: str | None, sets: dict[str, object]) -> RunConfig:
    """The run config the apps will see (checked here, before anything starts)."""
    base = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    if conf:
        base |= tomllib.loads(Path(conf).read_text())
    return RunConfig.from_run_config(base | sets)


def _federation(cfg: RunConfig, args) -> dict[str, object]:
    fed: dict[str, object] = {"num-supernodes": args.supernodes or FederationSpec.parse(cfg.federation).num_clients}
    if args.gpus_per_client is not None:
        fed["client-resources-num-gpus"] = args.gpus_per_client
    if args.cpus_per_client is not None:
        fed["client-resources-num-cpus"] = args.cpus_per_client
    return fed


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--app", default=DEFAULT_APP, help="the Flower app folder (default: %(default)s)")
    ap.add_argument("--conf", help="a run-config TOML file, e.g. sims/heterogeneous_tasks/conf/tiny.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one run-config key")
    ap.add_argument("--supernodes", type=int, help="simulated clients (default: the federation's client count)")
    ap.add_argument("--gpus-per-client", type=float, help="Ray: GPU share per client, e.g. 0.25 = 4 per GPU")
    ap.add_argument("--cpus-per-client", type=float, help="Ray: CPU cores per client (Flower's default: 2)")
    ap.add_argument("--flwr-home", help="private Flower state folder (its own local SuperLink)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fl-lota", description="Federated LoTA on Flower")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the federated job once")
    _common(run)
    cmp = sub.add_parser("compare", help="fine-tuning methods x merge methods, one table and plot")
    _common(cmp)
    cmp.add_argument("--grid", default=DEFAULT_GRID, help="method:merge[,merge] entries (default: %(default)s)")
    cmp.add_argument("--out", help="folder for the runs and the table (absolute; default ~/fl-lota-results/compare-*)")
    sub.add_parser("tune", help="fine-tune one model on one task (see python -m fl_lota.tune -h)", add_help=False)
    return ap


def cmd_run(args) -> int:
    app = Path(args.app)
    sets = parse_sets(args.set)
    cfg = _effective(app, args.conf, sets)
    launch(
        app, config_file=args.conf, run_config=sets, federation_config=_federation(cfg, args), flwr_home=args.flwr_home
    )
    return 0


def cmd_compare(args) -> int:
    app = Path(args.app)
    grid = parse_grid(args.grid)
    sets = parse_sets(args.set)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out).expanduser().absolute() if args.out else Path.home() / "fl-lota-results" / f"compare-{stamp}"
    runs = []
    for method, merges in grid:
        run_sets = sets | {
            "method": method,
            "merge": merges[0],
            "eval-merges": ",".join(merges[1:]),
            "results-dir": str(out / method),
        }
        cfg = _effective(app, args.conf, run_sets)  # fail before any run starts
        runs.append((method, run_sets, cfg))
    results = []
    for method, run_sets, cfg in runs:
        print(f"fl-lota compare: {method} with merges {', '.join(cfg.merges)} -> {cfg.results_dir}", flush=True)
        try:
            outcome = launch(
                app,
                config_file=args.conf,
                run_config=run_sets,
                federation_config=_federation(cfg, args),
                flwr_home=args.flwr_home,
            )
            launch_info = {"run_id": outcome.run_id, "status": outcome.status, "seconds": outcome.seconds}
            (Path(cfg.results_dir) / "launch.json").write_text(json.dumps(launch_info) + "\n")
            results.append((method, report.read_rows(Path(cfg.results_dir) / "metrics.jsonl")))
        except (RunFailed, FileNotFoundError, ValueError) as e:
            print(f"fl-lota compare: {method} failed: {e}", file=sys.stderr)
            results.append((method, []))
    md = report.write_comparison(out, report.comparison_rows(results))
    print(md.read_text())
    print(f"fl-lota compare: table {md}, plot {out / 'compare.png'}")
    return 0 if all(rows for _, rows in results) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "tune":
        from .tune import main as tune_main

        tune_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "compare": cmd_compare}[args.command](args)
    except (RunFailed, FileNotFoundError, ValueError) as e:
        print(f"fl-lota: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
