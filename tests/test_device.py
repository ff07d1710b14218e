"""The GPU path without a GPU where it can be checked (device errors, out-of-memory, base
weights kept per process, memory released), and on a GPU where one is present."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from test_federated import TINY

from clients.app import gpu_share
from fl_lota.federated import node as fedclient
from fl_lota.federated.node import LocalNode
from fl_lota.federated.precheck import PrecheckError, check_run
from fl_lota.federated.protocol import EvalReport, TrainReport
from fl_lota.federated.report import write_run_report
from fl_lota.federated.runconfig import RunConfig, RunConfigError
from fl_lota.training import device
from fl_lota.vectors import codec
from fl_lota.vectors.task_vector import SparseTaskVector

EMPTY = codec.encode(SparseTaskVector())
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a GPU")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fake_cuda(monkeypatch, *, built: bool = True, available: bool = True, count: int = 1) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_specs_are_checked_where_the_config_enters():
    assert device.resolve("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:", "CPU", "cuda0"):
        with pytest.raises(RunConfigError, match="'device'"):
            RunConfig(**{**TINY, "device": bad})
        with pytest.raises(device.DeviceError, match="must be auto, cpu, cuda or cuda:N"):
            device.resolve(bad)
    RunConfig(**{**TINY, "device": "cuda:1"})  # valid here; whether a GPU is there is the client's question


@no_gpu
def test_auto_is_the_cpu_without_a_gpu():
    assert device.resolve("auto") == torch.device("cpu")


def test_cuda_with_a_cpu_build_of_torch_names_the_build(monkeypatch):
    _fake_cuda(monkeypatch, built=False, available=False, count=0)
    with pytest.raises(device.DeviceError, match=r"CPU build.*install the CUDA build.*device=cpu"):
        device.resolve("cuda")


def test_cuda_with_no_visible_gpu_names_the_share_setting(monkeypatch):
    _fake_cuda(monkeypatch, available=False, count=0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(device.DeviceError, match=r"CUDA_VISIBLE_DEVICES='' hides every GPU.*client-resources-num-gpus"):
        device.resolve("cuda")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(device.DeviceError, match=r"no usable GPU.*nvidia-smi"):
        device.resolve("cuda:0")


def test_a_gpu_index_past_the_last_names_the_count(monkeypatch):
    _fake_cuda(monkeypatch, count=1)
    assert device.resolve("cuda") == torch.device("cuda")
    assert device.resolve("cuda:0") == torch.device("cuda:0")
    with pytest.raises(device.DeviceError, match=r"sees 1 GPU\(s\).*use device=cuda"):
        device.resolve("cuda:1")


@no_gpu
def test_a_client_on_a_machine_without_a_gpu_fails_at_start_with_a_named_error():
    cfg = RunConfig(**{**TINY, "device": "cuda"})
    with pytest.raises(device.DeviceError, match="device 'cuda'"):
        LocalNode(cfg, 0)  # before any data is built or model loaded, not deep in torch
    with pytest.raises(PrecheckError, match="device 'cuda'"):
        check_run(cfg)  # fl-lota run / compare: before Flower starts
    check_run(cfg, local_only=True)  # the ServerApp: the clients' machines may have GPUs


def test_bf16_on_a_gpu_without_it_names_the_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))  # V100
    monkeypatch.setattr(device, "describe", lambda d: "cuda:0 (Tesla V100, 16.0 GiB)")
    with pytest.raises(device.DeviceError, match=r"V100.*no bfloat16.*bf16=false.*eval-precision=float32"):
        device.autocast_bf16(torch.device("cuda"), True)  # training enters here
    with pytest.raises(device.DeviceError, match=r"V100.*no bfloat16"):
        device.check_bf16(torch.device("cuda"))  # and generation in bf16 (tasks.evaluate.bf16_weights)
    assert device.autocast_bf16(torch.device("cuda"), False) is not None  # float32 needs no check
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))  # A100
    assert isinstance(device.autocast_bf16(torch.device("cuda"), True), torch.autocast)


def test_out_of_memory_is_a_named_error_raised_after_the_memory_is_freed(monkeypatch):
    cfg = RunConfig(**TINY)
    node = LocalNode(cfg, 0, gpu_share="client-resources-num-gpus=0.25 (Ray simulation)")
    expected = LocalNode(cfg, 0).train(EMPTY)
    real_finetune, real_release = fedclient.finetune, device.release
    held: list[weakref.ref] = []
    alive_at_release: list[bool] = []

    def oom(*args, **kwargs):
        big = torch.zeros(1 << 20)  # what a failed step leaves in its frames (activations)
        held.append(weakref.ref(big))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def release(dev):
        real_release(dev)
        alive_at_release.append(held[-1]() is not None if held else False)

    monkeypatch.setattr(fedclient, "finetune", oom)
    monkeypatch.setattr(device, "release", release)
    with pytest.raises(device.GpuOutOfMemory) as err:
        node.train(EMPTY)
    msg = str(err.value)
    for part in (
        "while training",
        "model 'tiny'",
        "client-resources-num-gpus=0.25",
        "batch-size (now 4)",
        "max-len (now 64)",
    ):
        assert part in msg, part
    assert alive_at_release == [False]  # the failed step's tensors were gone when memory was released
    # the process serves the next round: same upload as a client that never failed
    monkeypatch.setattr(fedclient, "finetune", real_finetune)
    again = node.train(EMPTY)
    assert again.payload == expected.payload and len(alive_at_release) == 2
    # evaluation too
    monkeypatch.setattr(fedclient, "evaluate", oom)
    with pytest.raises(device.GpuOutOfMemory, match="while evaluating"):
        node.evaluate({"mask_aware": EMPTY})


def test_other_errors_pass_through_unchanged(monkeypatch):
    node = LocalNode(RunConfig(**TINY), 0)

    def broken(*args, **kwargs):
        raise FloatingPointError("loss became nan at step 3; lower the learning rate")

    monkeypatch.setattr(fedclient, "finetune", broken)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        node.train(EMPTY)


def test_base_weights_load_once_per_process_across_clients_and_rounds(monkeypatch):
    cfg = RunConfig(**TINY)
    fedclient._BASE.clear()
    calls = []
    real = fedclient.load

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fedclient, "load", counting)
    a, b = LocalNode(cfg, 0), LocalNode(cfg, 1)  # a Ray actor serves several clients in turn
    r1 = a.train(EMPTY)
    b.train(EMPTY)
    a.train(EMPTY, r1.mask_payload, server_round=2)
    b.evaluate({"mask_aware": EMPTY})
    assert len(calls) == 1
    # the kept model is reset to the base each time: round 1 again gives the same upload
    assert a.train(EMPTY).payload == r1.payload


@no_gpu
def test_cpu_reports_carry_no_gpu_figures():
    node = LocalNode(RunConfig(**TINY), 0)
    assert "gpu-peak-bytes" not in node.train(EMPTY).metrics
    assert "gpu-peak-bytes" not in node.evaluate({"mask_aware": EMPTY}).to_metrics()


def test_gpu_peak_is_a_checked_report_field_and_reaches_the_summary(tmp_path):
    base = LocalNode(RunConfig(**TINY), 0).train(EMPTY).metrics  # a whole report, off a GPU
    assert TrainReport.from_metrics(
        base | {"gpu-peak-bytes": 2.0**31}, num_clients=2, max_examples=10**6
    ).gpu_peak_bytes == (2**31)
    with pytest.raises(ValueError, match="gpu-peak-bytes"):
        TrainReport.from_metrics(base | {"gpu-peak-bytes": -1.0}, num_clients=2, max_examples=10**6)
    ev = {"partition-id": 0.0, "num-examples": 4.0, "eval-seconds": 1.0, "gpu-peak-bytes": 5.0}
    assert EvalReport.from_metrics(ev, num_clients=2).gpu_peak_bytes == 5
    row = {"round": 1, "method": "lota", "merge": "mask_aware", "scores": {}}
    cpu = dict(row, clients=[{"client": "math", "partition": 0, "gpu_peak_bytes": None}])
    write_run_report(tmp_path / "cpu", [cpu])
    assert "GPU" not in (tmp_path / "cpu" / "summary.md").read_text()
    rows = [
        dict(
            row,
            clients=[{"client": "math", "partition": 0, "gpu_peak_bytes": 3 * 2**30}],
            eval_clients=[{"client": "math", "partition": 0, "gpu_peak_bytes": 2**30}],
        ),
        dict(row, round=2, clients=[{"client": "math", "partition": 0, "gpu_peak_bytes": 2**30}]),
    ]
    write_run_report(tmp_path / "gpu", rows)
    assert "- math (p0): evaluation 1.00 GiB, training 3.00 GiB" in (tmp_path / "gpu" / "summary.md").read_text()


def test_outside_ray_the_share_is_the_whole_gpu():
    assert "whole GPU" in gpu_share()


@gpu
def test_a_client_trains_and_evaluates_on_the_gpu():
    cfg = RunConfig(**{**TINY, "device": "cuda", "bf16": torch.cuda.is_bf16_supported()})
    fedclient._BASE.clear()
    gc.collect()
    torch.cuda.empty_cache()
    node = LocalNode(cfg, 0)
    r1 = node.train(EMPTY)
    model, _, base = fedclient.load_base(cfg.model, node.device)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(v.device.type == "cpu" and v.is_pinned() for v in base.values())  # one copy on the GPU
    kept = torch.cuda.memory_allocated()
    assert r1.metrics["gpu-peak-bytes"] > kept  # training needed more than the model
    r2 = node.train(EMPTY, r1.mask_payload, server_round=2)
    assert (
        r2.values_only and codec.decode(r2.payload, mask=codec.decode(r1.payload)).nnz == codec.decode(r1.payload).nnz
    )
    assert torch.cuda.memory_allocated() <= kept  # optimizer state and activations released
    scores = node.evaluate({"mask_aware": r1.payload})
    assert 0.0 <= scores["score.math@mask_aware"] <= 1.0 and scores["gpu-peak-bytes"] > 0
    assert torch.cuda.memory_reserved() <= kept + (64 << 20)  # cached blocks handed back


def test_fl_lota_run_says_when_a_gpu_is_here_but_clients_get_no_share(monkeypatch, capsys):
    from types import SimpleNamespace

    from fl_lota.cli import _federation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = RunConfig(**{**TINY, "device": "auto"})
    _federation(cfg, SimpleNamespace(supernodes=None, gpus_per_client=None, cpus_per_client=None))
    assert "--gpus-per-client" in capsys.readouterr().err
    fed = _federation(cfg, SimpleNamespace(supernodes=None, gpus_per_client=0.25, cpus_per_client=None))
    assert fed["client-resources-num-gpus"] == 0.25 and capsys.readouterr().err == ""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _federation(cfg, SimpleNamespace(supernodes=None, gpus_per_client=None, cpus_per_client=None))
    assert capsys.readouterr().err == ""


def test_a_lora_client_serves_the_next_round_after_a_failed_one(monkeypatch):
    from fl_lota.training import lora

    cfg = RunConfig(**{**TINY, "method": "lora"})
    expected = LocalNode(cfg, 0).train(EMPTY).payload
    node = LocalNode(cfg, 0)
    real = lora.train

    def oom(*args, **kwargs):  # fails inside the adapter-wrapped model
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(lora, "train", oom)
    with pytest.raises(device.GpuOutOfMemory):
        node.train(EMPTY)
    monkeypatch.setattr(lora, "train", real)
    assert node.train(EMPTY).payload == expected  # no adapter left behind in the kept model


@no_gpu
def test_the_commands_name_an_unusable_device_without_a_traceback(capsys):
    """A device the machine lacks is a usage error (a ValueError): the command says which
    setting to change and exits 2, no traceback."""
    from fl_lota.tune import main

    with pytest.raises(SystemExit) as e:
        main(
            ["--task", "math", "--model", "tiny", "--device", "cuda", "--steps", "1", "--n-train", "4", "--n-test", "2"]
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "device 'cuda'" in err and "Traceback" not in err
