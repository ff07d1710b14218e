"""A federated client's work, free of Flower: start from the global model, fine-tune on the
local task, encode the update, evaluate. ``clients/app.py`` wraps this in a ClientApp.

The global model is ``base + G``: every client holds the base weights (the model name is
part of the run config) and receives the cumulative merged update ``G`` as an FLTV payload,
so a client that missed rounds still starts from the right weights. Uploads are the round's
update ``trained - (base + G)``:

    lota, first round a client takes part in:  calibrate -> extract mask -> sparse adapt;
                                               full payload (indices + values)
    lota, later rounds:                        sparse adapt on the same mask;
                                               values-only payload (the server holds the mask)
    fft:                                       dense payload, every round
    lora:                                      the low-rank factors (fl_lota.vectors.lowrank), every round

The mask is kept by the caller (Flower's node state) as the first round's payload bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from fl_lota.federated.files import write_atomic
from fl_lota.federated.protocol import EvalReport, TrainReport
from fl_lota.federated.runconfig import RunConfig
from fl_lota.tasks.evaluate import evaluate
from fl_lota.tasks.partition import ClientData, client_data
from fl_lota.tasks.prompting import to_examples
from fl_lota.training import device as devices
from fl_lota.training.data import client_stream_seed
from fl_lota.training.methods import finetune
from fl_lota.training.models import load
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector

__all__ = ["LocalNode", "TrainOutcome", "load_base"]

_BASE: dict[tuple[str, str], tuple[torch.nn.Module, object, dict[str, torch.Tensor]]] = {}
T = TypeVar("T")


def load_base(model: str, device: str | torch.device):
    """(model, tokenizer, base state) for ``model`` on ``device``, loaded once per process
    (Ray actors and SuperNodes serve many rounds and clients) and kept across rounds. One
    model is kept at a time. On a GPU the base copy stays in (pinned) host memory: a reset
    copies it over the model's weights, and the GPU holds one copy of the model, not two."""
    key = (model, str(device))
    if key not in _BASE:
        if _BASE:
            _BASE.clear()
            devices.release(torch.device(device))
        m, tok = load(model, device=str(device))
        on_gpu = torch.device(device).type == "cuda"
        base = {
            k: (v.detach().to("cpu").pin_memory() if on_gpu else v.detach().clone()) for k, v in m.state_dict().items()
        }
        _BASE[key] = (m, tok, base)
    return _BASE[key]


@dataclass
class TrainOutcome:
    payload: bytes  # the FLTV upload
    values_only: bool
    mask_payload: bytes | None  # set when a new mask was made: keep it for later rounds
    report: TrainReport  # what the client reports with the upload
    seen: list[int] = field(default_factory=list)  # indices of the training examples used, in order

    @property
    def metrics(self) -> dict[str, float]:
        """The report as it travels (``TrainReport.to_metrics``)."""
        return self.report.to_metrics()


class LocalNode:
    """Client ``partition_id`` of the federation in ``cfg``."""

    def __init__(
        self, cfg: RunConfig, partition_id: int, data: ClientData | None = None, *, gpu_share: str = "the whole GPU"
    ) -> None:
        """``data``: the client's examples and evaluation tasks (default: its share of the
        federation in ``cfg``; the single-task and tuning runs pass their own). ``gpu_share``:
        how much of the GPU this client was given, named in an out-of-memory error. A
        device this process cannot use is a DeviceError here, before any round."""
        self.device = devices.resolve(cfg.device)
        self.eval_bf16 = cfg.eval_bf16(self.device)  # generation in bf16 (eval-precision)
        self.gpu_share = gpu_share
        self.cfg = cfg
        self.partition_id = partition_id
        self.data: ClientData = data or client_data(
            cfg.spec, partition_id, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.data_seed
        )
        if not self.data.train:
            raise ValueError(f"client {partition_id} of federation {cfg.federation!r} holds no training data")

    # ---- the mask on disk (client-state-dir) ---------------------------------------

    def _mask_path(self, run_tag: str) -> Path | None:
        if not self.cfg.client_state_dir or not run_tag:
            return None
        if not run_tag.isalnum():
            raise ValueError(f"bad run tag {run_tag!r}")
        return Path(self.cfg.client_state_dir).expanduser() / f"mask-{run_tag}-p{self.partition_id}.fltv"

    def load_mask(self, run_tag: str) -> bytes | None:
        """The mask payload this client kept on disk for run ``run_tag``, if any (a
        restarted client resumes with the mask the server registered)."""
        path = self._mask_path(run_tag)
        if path is None or not path.is_file():
            return None
        data = path.read_bytes()
        codec.peek(data)  # a damaged file is an error, not a silent new mask
        return data

    def save_mask(self, run_tag: str, payload: bytes) -> None:
        path = self._mask_path(run_tag)
        if path is None:
            return
        write_atomic(path, payload)

    # ---- model state -------------------------------------------------------------

    def _model_at(self, global_update: bytes | SparseTaskVector) -> tuple[torch.nn.Module, object, float]:
        """The model reset to ``base + G`` (``G`` decoded or its payload); returns (model,
        tokenizer, seconds)."""
        t0 = time.perf_counter()
        model, tok, base = load_base(self.cfg.model, self.device)
        model.load_state_dict(base)
        g = _decoded(global_update)
        if len(g):
            g.apply_to(model)
        return model, tok, time.perf_counter() - t0

    def _scores(self, model, tok) -> dict[str, float]:
        """Task -> score of ``model`` on this client's test split(s)."""
        cfg = self.cfg
        return {
            task.name: float(
                evaluate(model, tok, task, progress=False, batch_size=cfg.eval_batch_size, bf16=self.eval_bf16)["score"]
            )
            for task in self.data.tasks
        }

    @property
    def test_items(self) -> dict[str, int]:
        return {task.name: len(task.test) for task in self.data.tasks}

    def _on_device(self, phase: str, work: Callable[[], T]) -> T:
        """Run ``work``, measuring peak GPU memory from its start and releasing memory after
        it, also when it fails. A CUDA out-of-memory becomes a GpuOutOfMemory naming the
        model, the GPU, this client's share and the settings to change; it is raised once
        the failed step's tensors are freed, so that the process serves the next round."""
        devices.start_peak(self.device)
        oom = False
        try:
            return work()
        except torch.cuda.OutOfMemoryError:
            oom = True  # leaving the handler drops the traceback and the tensors its frames hold
        except BaseException:
            _BASE.clear()  # the kept model may be half-changed (a LoRA wrap, a partial step): load it afresh
            raise
        finally:
            if oom:
                _BASE.clear()  # its memory too: the next round loads the model again
            devices.release(self.device)
        cfg = self.cfg
        raise devices.out_of_memory(
            cfg.model, self.device, self.gpu_share, phase, cfg.batch_size, cfg.max_len, cfg.eval_batch_size
        )

    def _peak(self) -> int | None:
        peak = devices.peak_bytes(self.device)
        return None if peak is None else int(peak)

    # ---- one training round ------------------------------------------------------

    @property
    def stream_seed(self) -> str:
        """Seed of this client's example stream: the run's seed and the partition."""
        return client_stream_seed(self.cfg.seed, self.partition_id)

    def train(
        self,
        global_payload: bytes | SparseTaskVector,
        mask_payload: bytes | None = None,
        *,
        server_round: int = 1,
        eval_start: bool = False,
        eval_local: bool = False,
        register_mask: bool = False,
    ) -> TrainOutcome:
        """Fine-tune from ``base + G`` for round ``server_round`` (the round picks where in
        the local example stream training continues). ``mask_payload``: the payload that
        registered this client's LoTA mask in an earlier round (reuse the mask, upload
        values only). eval_start / eval_local: also score the received model / the locally
        tuned one. register_mask: the server holds no mask for this client (it asks after
        refusing a values-only upload): send a full upload, which registers the mask again.
        On a GPU the report carries ``gpu-peak-bytes``, this process's peak for the round."""
        return self._on_device(
            "training",
            lambda: self._train(global_payload, mask_payload, server_round, eval_start, eval_local, register_mask),
        )

    def _train(
        self,
        global_payload: bytes | SparseTaskVector,
        mask_payload: bytes | None,
        server_round: int,
        eval_start: bool,
        eval_local: bool,
        register_mask: bool,
    ) -> TrainOutcome:
        cfg = self.cfg
        model, tok, load_s = self._model_at(global_payload)
        eval_s = None
        start_scores: dict[str, float] = {}
        if eval_start:
            t0 = time.perf_counter()
            start_scores = self._scores(model, tok)
            eval_s = time.perf_counter() - t0
        mask = None
        if cfg.method == "lota" and mask_payload is not None:
            mask = codec.decode(mask_payload).masks()
        opts = cfg.finetune_options(first_round=mask is None)
        if mask is not None:
            opts["mask"] = mask
        elif cfg.method == "lota" and cfg.lotto:
            # LoTTO: the global update's entries are earlier clients' masks; this client's
            # calibration leaves them frozen and its mask is drawn from the other entries
            g = _decoded(global_payload)
            if len(g):
                opts["exclude"] = [g.masks()]
        examples = to_examples(tok, self.data.train)
        t0 = time.perf_counter()
        res = finetune(
            cfg.method,
            model,
            examples,
            cfg.train_config(first_round=mask is None),
            pad_id=tok.pad_token_id,
            start=cfg.stream_start(server_round),
            stream_seed=self.stream_seed,
            **opts,
        )
        train_s = time.perf_counter() - t0
        local_scores: dict[str, float] = {}
        if eval_local:
            t0 = time.perf_counter()
            local_scores = self._scores(model, tok)
            eval_s = (eval_s or 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        values_only = mask is not None and not register_mask
        upload = res.factors if res.factors is not None else res.delta  # lora: the low-rank factors
        payload = codec.encode(upload, values=cfg.values, values_only=values_only)
        new_mask = payload if cfg.method == "lota" and mask is None else None
        report = TrainReport(
            partition=self.partition_id,
            num_examples=len(examples),
            load_seconds=load_s,
            train_seconds=train_s,
            codec_seconds=time.perf_counter() - t0,
            loss_first=float(res.losses[0]),
            loss_last=float(res.losses[-1]),
            steps=len(res.losses),
            fb_passes=res.passes,
            train_examples=len(res.seen),
            distinct_examples=len(set(res.seen)),
            stream_start=res.stream_start,
            stream_end=res.stream_end,
            trained_params=res.trained_params,
            nnz=upload.nnz,
            numel=res.delta.numel,
            payload_bytes=len(payload),
            values_only=values_only,
            index_entropy_bytes=0.0 if values_only else codec.index_entropy_bytes(upload),
            eval_seconds=eval_s,
            eval_bf16=None if eval_s is None else self.eval_bf16,
            gpu_peak_bytes=self._peak(),
            phase_seconds=dict(res.phases),
            start_scores=start_scores,
            local_scores=local_scores,
            test_items=self.test_items if eval_start or eval_local else {},
        )
        return TrainOutcome(payload, values_only, new_mask, report, seen=list(res.seen))

    # ---- evaluation of received models -------------------------------------------

    def evaluate(self, payloads: dict[str, bytes | SparseTaskVector]) -> EvalReport:
        """Score ``base + G_m`` for each candidate ``m`` (merge name -> global payload) on
        this client's test split(s)."""
        return self._on_device("evaluating", lambda: self._evaluate(payloads))

    def _evaluate(self, payloads: dict[str, bytes | SparseTaskVector]) -> EvalReport:
        scores: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        for name, payload in payloads.items():
            model, tok, _ = self._model_at(payload)
            scores[name] = self._scores(model, tok)
        return EvalReport(
            partition=self.partition_id,
            num_examples=sum(self.test_items.values()),
            eval_seconds=time.perf_counter() - t0,
            eval_bf16=self.eval_bf16,
            gpu_peak_bytes=self._peak(),
            scores=scores,
            test_items=self.test_items,
        )


def _decoded(update: bytes | SparseTaskVector) -> SparseTaskVector:
    return update if isinstance(update, SparseTaskVector) else codec.decode(update)
