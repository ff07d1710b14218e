"""Federations of many clients with client sampling: per round, how many clients trained,
the server's seconds (decode, merge, the round's wall time) and its memory (the ServerApp
process's peak during the round), against the number of clients.

    python bench/scale.py --out /abs/folder                          # tiny model: 25, 50, 100 clients
    python bench/scale.py --out /abs/folder --clients 32 --model default --set n-train=64

Each federation mixes math, sql and classify over N clients with a Dirichlet(0.5) skew per
task and samples a quarter of them per round (``fraction-train=0.25``), 3 rounds; the
federation's runs are ``fl-lota run`` (Flower's simulation, Ray). Tables come from each
run's metrics.jsonl (``--from`` reads folders made before).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fl_lota.cli import main as cli_main
from fl_lota.federated.report import read_rows
from fl_lota.tasks.partition import FederationSpec

TINY = ["calibration-steps=1", "local-steps=3", "batch-size=4", "max-len=64", "n-test=4", "bf16=false"]


def run(out: Path, clients: int, model: str, extra: list[str], flwr_home: str | None) -> Path:
    folder = out / f"{model}-{clients}"
    if (folder / "metrics.jsonl").is_file():
        print(f"{folder}: stored", flush=True)
        return folder
    sets = [
        f"model={model}",
        f"federation=math,sql,classify;clients={clients};alpha=0.5",
        "fraction-train=0.25",
        "num-server-rounds=3",
        f"n-train={max(4 * clients, 64)}",  # per task: about 12 examples per client
        f"results-dir={folder}",
        *(TINY if model == "tiny" else []),
        *extra,
    ]
    argv = ["run", "--supernodes", str(clients)]
    for kv in sets:
        argv += ["--set", kv]
    if flwr_home:
        argv += ["--flwr-home", flwr_home]
    print("fl-lota " + " ".join(argv), flush=True)
    rc = cli_main(argv)
    if rc:
        raise SystemExit(f"the {clients}-client federation failed (exit {rc})")
    return folder


def table(folders: list[Path]) -> None:
    print(
        f"{'clients':>7} {'round':>5} {'trained':>7} {'scored':>6} {'decode s':>8} {'merge s':>7} "
        f"{'round s':>7} {'server peak MiB':>15} {'server end MiB':>14} {'uplink MB':>9}"
    )
    for folder in folders:
        rows = read_rows(folder / "metrics.jsonl")
        spec = FederationSpec.parse(json.loads((folder / "config.json").read_text())["federation"])
        clients = spec.num_clients
        for r in rows:
            sec, mem = r.get("seconds", {}), r.get("server_memory_mb", {})
            peak, end = mem.get("peak"), mem.get("rss")
            print(
                f"{clients:>7} {r['round']:>5} {r.get('accepted', 0):>4}/{r['sampled']:<2} "
                f"{len(r.get('scored_partitions', [])):>6} {sec.get('decode', 0):8.2f} {sec.get('merge', 0):7.2f} "
                f"{sec.get('round_wall', 0):7.1f} {peak if peak is not None else float('nan'):15.0f} "
                f"{end if end is not None else float('nan'):14.0f} {r.get('uplink_bytes', 0) / 1e6:9.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="absolute folder for the runs (a run already there is read, not run again)")
    ap.add_argument("--from", dest="src", nargs="+", help="run folders made before: print their table")
    ap.add_argument("--clients", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--set", action="append", default=[], help="further run-config settings (key=value)")
    ap.add_argument("--flwr-home", help="private Flower state folder")
    args = ap.parse_args()
    if not (args.out or args.src):
        ap.error("give --out (run) or --from (read)")
    if args.src:
        folders = [Path(f) for f in args.src]
    else:
        out = Path(args.out).absolute()
        folders = [run(out, n, args.model, args.set, args.flwr_home) for n in args.clients]
    table(folders)


if __name__ == "__main__":
    main()
