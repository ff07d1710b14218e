"""The ``fl-lota`` command.

    fl-lota run      [--conf FILE] [--set key=value ...] [--supernodes N] [--gpus-per-client F]
    fl-lota compare  [--grid "lota:mask_aware,ties fft:fedavg,ties lora:fedavg"] [--seeds 3] [--out DIR] ...
    fl-lota tune     --task sql ...          (one model, one task: python -m fl_lota.tune)

``run`` drives ``flwr run`` on ``sims/heterogeneous_tasks`` (or ``--app``), streams its log
and exits non-zero with Flower's reason when the run did not complete. ``compare`` runs the
protocol of ``fl_lota.compare`` (tuning on validation, single-task references, one
federation per method x merge and seed) and writes compare.md, compare.json, compare.png.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from datetime import UTC, datetime
from pathlib import Path

from fl_lota.compare import DEFAULT_GRID, DEFAULT_TUNE, RESERVED, ComparePlan, TuneSpec, effective_config, parse_grid
from fl_lota.federated.launch import RunFailed, launch
from fl_lota.federated.precheck import check_run
from fl_lota.federated.runconfig import KEYS, RunConfig, RunConfigError
from fl_lota.tasks.partition import FederationSpec

__all__ = ["main", "parse_grid", "parse_sets"]

DEFAULT_APP = "sims/heterogeneous_tasks"


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
    return RunConfig.from_run_config(effective_config(app, conf, sets))


def _gpu_note(cfg: RunConfig, args) -> None:
    """A GPU visible here and no GPU share asked for: Ray hides the GPU from clients that
    hold no share (CUDA_VISIBLE_DEVICES=''), so they would train on the CPU. Say so."""
    import torch

    if args.gpus_per_client is None and cfg.device != "cpu" and torch.cuda.is_available():
        print(
            f"fl-lota: note: this machine has a GPU, but clients get a GPU share only with --gpus-per-client "
            f"(e.g. 0.25: 4 clients per GPU); without one Ray hides the GPU from them and device={cfg.device} "
            + ("trains on the CPU" if cfg.device == "auto" else "fails, naming this setting"),
            file=sys.stderr,
        )


def _federation(cfg: RunConfig, args) -> dict[str, object]:
    _gpu_note(cfg, args)
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
    ap.add_argument(
        "--verbose", action="store_true", help="clients keep the libraries' progress bars and messages (verbose=true)"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fl-lota", description="Federated LoTA on Flower")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the federated job once")
    _common(run)
    cmp = sub.add_parser("compare", help="fine-tuning methods x merge methods under one protocol")
    _common(cmp)
    cmp.add_argument("--grid", default=DEFAULT_GRID, help="method:merge[,merge] entries (default: %(default)s)")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per run (default: %(default)s)")
    cmp.add_argument(
        "--tune",
        default=DEFAULT_TUNE,
        help="candidate values, method.key=v1,v2 or ties.key=...; (default: %(default)s)",
    )
    cmp.add_argument("--no-tune", action="store_true", help="run every method at the configured values")
    cmp.add_argument("--val-size", type=int, default=64, help="validation examples held out of each task's train")
    cmp.add_argument("--plan-only", action="store_true", help="print the plan and its time estimate, run nothing")
    cmp.add_argument("--no-estimate", action="store_true", help="skip the speed probe behind the time estimate")
    cmp.add_argument("--out", help="folder for the runs and the table (default ~/fl-lota-results/compare-<time>); "
                     "give an existing one to resume it")  # fmt: skip
    exp = sub.add_parser("export", help="the merged model of a run as a Hugging Face model folder")
    exp.add_argument("results", help="the run's results folder (its path is logged first)")
    exp.add_argument("--out", required=True, help="a new folder for the model (nothing is overwritten)")
    exp.add_argument("--merge", help="which merge scored in the run (default: the run's own)")
    exp.add_argument(
        "--client-updates", metavar="DIR", help="also copy each client's last update (safetensors) into DIR"
    )
    sub.add_parser("tune", help="fine-tune one model on one task (see python -m fl_lota.tune -h)", add_help=False)
    return ap


def cmd_run(args) -> int:
    app = Path(args.app)
    sets = parse_sets(args.set) | ({"verbose": True} if args.verbose else {})
    cfg = _effective(app, args.conf, sets)
    check_run(cfg)  # every task and the model, before Flower starts
    launch(
        app, config_file=args.conf, run_config=sets, federation_config=_federation(cfg, args), flwr_home=args.flwr_home
    )
    return 0


def cmd_compare(args) -> int:
    from fl_lota.compare import run_compare

    app = Path(args.app)
    grid = parse_grid(args.grid)
    sets = parse_sets(args.set) | ({"verbose": True} if args.verbose else {})
    given = set(sets) | (
        set(tomllib.loads(Path(args.conf).read_text())) if args.conf and Path(args.conf).is_file() else set()
    )
    fixed = sorted(given & set(RESERVED))
    if fixed:
        raise ValueError(
            f"compare sets {fixed} for every run itself; leave them out of --set/--conf (use --grid, --seeds)"
        )
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    base = effective_config(app, args.conf, sets)
    check_run(RunConfig.from_run_config(base))  # every task and the model, before anything runs
    tune = None if args.no_tune else TuneSpec.parse(args.tune)
    if tune is not None:  # every candidate must be a valid run config, checked before anything runs
        for method, merges in grid:
            for cand in tune.candidates(method):
                RunConfig.from_run_config(base | cand | {"method": method})
            for merge in merges:
                for cand in tune.merge_candidates(merge):
                    RunConfig.from_run_config(base | cand | {"method": method, "merge": merge})
    plan = ComparePlan(
        app=app,
        base=base,
        grid=grid,
        seeds=list(range(args.seeds)),
        tune=tune,
        val_size=args.val_size,
        federation_config=_federation(RunConfig.from_run_config(base), args),
        flwr_home=args.flwr_home,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out).expanduser().absolute() if args.out else Path.home() / "fl-lota-results" / f"compare-{stamp}"
    return run_compare(plan, out, plan_only=args.plan_only, estimate=not args.no_estimate)


def cmd_export(args) -> int:
    from fl_lota.federated.export import export_client_updates, export_model

    out = export_model(args.results, args.out, merge=args.merge)
    print(f"fl-lota: model written to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    if args.client_updates:
        files = export_client_updates(args.results, args.client_updates)
        print(f"fl-lota: {len(files)} client update(s) written to {args.client_updates}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "tune":
        from fl_lota.tune import main as tune_main

        tune_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return {"run": cmd_run, "compare": cmd_compare, "export": cmd_export}[args.command](args)
    except (RunFailed, FileNotFoundError, ValueError) as e:
        print(f"fl-lota: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
