"""Describing a federation by a short string and giving each client its data.

    "math,sql,classify,instruct"               one task per client (4 clients)
    "math,sql,classify;clients=6;alpha=0.5"    the tasks' training data mixed over 6 clients
                                               with a Dirichlet(alpha) skew per task

Mixing uses ``flwr-datasets``' DirichletPartitioner (a data-only package: the Flower
framework itself is never imported here).
"""

from __future__ import annotations

from dataclasses import dataclass

from fl_lota.tasks import Sample, Task, check_task, get_task, task_label

__all__ = ["ClientData", "FederationSpec", "client_data"]


@dataclass(frozen=True)
class FederationSpec:
    tasks: tuple[str, ...]
    num_clients: int
    alpha: float | None = None  # None: one task per client

    @classmethod
    def parse(cls, text: str) -> FederationSpec:
        parts = [p.strip() for p in text.split(";") if p.strip()]
        if not parts:
            raise ValueError("empty federation string; example: 'math,sql,classify,instruct'")
        tasks = tuple(t.strip() for t in parts[0].split(",") if t.strip())
        for t in tasks:
            try:
                check_task(t)
            except ValueError as e:
                raise ValueError(f"in federation {text!r}: {e}") from None
        labels: dict[str, str] = {}
        for t in tasks:  # reports and references key tasks by name: one name, one task
            if labels.setdefault(task_label(t), t) != t:
                raise ValueError(
                    f"in federation {text!r}: two different tasks are both named {task_label(t)!r}; "
                    "give each file: or hf: spec its own name=..."
                )
        opts = {}
        for p in parts[1:]:
            key, sep, val = p.partition("=")
            if not sep or key.strip() not in ("clients", "alpha"):
                raise ValueError(f"bad federation option {p!r} in {text!r}; expected clients=N or alpha=X")
            opts[key.strip()] = val.strip()
        if not opts:
            return cls(tasks, len(tasks))
        if "alpha" not in opts or "clients" not in opts:
            raise ValueError(f"a mixed federation needs both clients=N and alpha=X: {text!r}")
        spec = cls(tasks, int(opts["clients"]), float(opts["alpha"]))
        if spec.num_clients < 1 or not spec.alpha > 0:
            raise ValueError(f"clients must be >= 1 and alpha > 0 in {text!r}")
        return spec


@dataclass
class ClientData:
    partition_id: int
    train: list[Sample]
    tasks: list[Task]  # the tasks whose data this client holds; evaluate on their test splits

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.tasks)


def client_data(
    spec: FederationSpec | str,
    partition_id: int,
    *,
    n_train: int = 256,
    n_test: int = 64,
    seed: int = 0,
    sources: dict[str, str] | None = None,
) -> ClientData:
    """The training data and tasks of client ``partition_id``."""
    spec = FederationSpec.parse(spec) if isinstance(spec, str) else spec
    if not 0 <= partition_id < spec.num_clients:
        raise ValueError(f"partition id {partition_id} outside a federation of {spec.num_clients} clients")
    sources = sources or {}
    if spec.alpha is None:
        task = get_task(
            spec.tasks[partition_id],
            n_train=n_train,
            n_test=n_test,
            seed=seed,
            source=sources.get(spec.tasks[partition_id]),
        )
        return ClientData(partition_id, list(task.train), [task])

    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    tasks = [get_task(t, n_train=n_train, n_test=n_test, seed=seed, source=sources.get(t)) for t in spec.tasks]
    pool = [(ti, si) for ti, t in enumerate(tasks) for si in range(len(t.train))]
    ds = Dataset.from_dict({"task": [ti for ti, _ in pool], "row": list(range(len(pool)))})
    part = DirichletPartitioner(
        num_partitions=spec.num_clients,
        partition_by="task",
        alpha=spec.alpha,
        min_partition_size=1,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )
    part.dataset = ds
    try:
        rows = part.load_partition(partition_id)["row"]
    except ValueError as e:  # flwr-datasets gives up when a client would get no example
        raise ValueError(
            f"federation {','.join(spec.tasks)};clients={spec.num_clients};alpha={spec.alpha:g}: the Dirichlet split "
            f"of {len(pool)} training examples ({n_train} per task) over {spec.num_clients} clients leaves some "
            f"client without examples ({str(e).splitlines()[0][:120]}); raise n-train or alpha, or use fewer clients"
        ) from None
    train = [tasks[pool[r][0]].train[pool[r][1]] for r in rows]
    held = sorted({pool[r][0] for r in rows})
    return ClientData(partition_id, train, [tasks[i] for i in held])
