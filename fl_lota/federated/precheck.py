"""Checks before round 1: every task of the federation and the model, with named errors.

A broken ``file:`` task (a missing file, a misspelled column, answers the metric cannot
read) or a model path that names nothing would otherwise fail a client in every round, or
the ServerApp after Flower has started. ``check_run`` loads each task as its client will
(``fl_lota.tasks.get_task``) and the model's shapes, and raises ``PrecheckError`` naming the
task or model and the problem.

Without ``local_only`` (``fl-lota run``/``compare``: the clients run here) the device is
checked too: ``device=cuda`` with a CPU build of torch or no GPU fails before Flower starts.

``local_only=True`` (the ServerApp): on the deployment engine a client's files live on the
client's machine, so a ``file:`` path that does not exist here is not an error here: the
client checks it, and a client that fails every round fails the run.
"""

from __future__ import annotations

from pathlib import Path

from fl_lota.federated.runconfig import RunConfig
from fl_lota.tasks import TaskSpecError, get_task, is_spec, parse_spec, task_label
from fl_lota.training.device import DeviceError, resolve

__all__ = ["PrecheckError", "check_run"]


class PrecheckError(ValueError):
    """The run cannot start: the message names the task or model and what is wrong."""


def _local(spec: str) -> bool:
    if not is_spec(spec):
        return True  # built-in tasks are generated or read where every machine reads them
    s = parse_spec(spec)
    return s.kind == "file" and Path(s.source).exists() and (s.test is None or Path(s.test).exists())


def check_run(cfg: RunConfig, *, local_only: bool = False, check_model: bool = True) -> list[str]:
    """Load every task of ``cfg``'s federation and the model's shapes; returns the tasks
    left to their clients (``local_only``). Raises PrecheckError."""
    from fl_lota.training.models import param_shapes

    skipped = []
    for spec in dict.fromkeys(cfg.spec.tasks):
        if local_only and not _local(spec):
            skipped.append(task_label(spec))
            continue
        try:
            get_task(spec, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.data_seed)
        except (TaskSpecError, FileNotFoundError, ValueError) as e:
            raise PrecheckError(f"task {task_label(spec)!r} cannot be loaded: {e}") from None
    if cfg.spec.alpha is not None and not skipped:  # a mixed federation: the split itself must work
        from fl_lota.tasks.partition import client_data

        try:
            client_data(cfg.spec, 0, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.data_seed)
        except ValueError as e:
            raise PrecheckError(str(e)) from None
    if not local_only:  # the clients of a local simulation compute on this machine, with this torch
        try:
            resolve(cfg.device)
        except DeviceError as e:
            raise PrecheckError(str(e)) from None
    if check_model:
        try:
            param_shapes(cfg.model)
        except (OSError, ValueError) as e:
            raise PrecheckError(f"model {cfg.model!r}: {e}") from None
    return skipped
