"""The run config: parsed once, unknown or ill-typed keys named; every shipped config valid."""

from __future__ import annotations

import glob
import tomllib
from pathlib import Path

import pytest

from fl_lota.federated.runconfig import KEYS, RunConfig, RunConfigError

ROOT = Path(__file__).resolve().parents[1]
APPS = sorted(glob.glob(str(ROOT / "sims" / "*" / "pyproject.toml")))
CONFS = sorted(glob.glob(str(ROOT / "sims" / "*" / "conf" / "*.toml")))


def app_config(pyproject: str) -> dict:
    return tomllib.loads(Path(pyproject).read_text())["tool"]["flwr"]["app"]["config"]


def test_defaults_are_valid():
    cfg = RunConfig()
    assert cfg.merges == ("mask_aware",)
    assert cfg.spec.num_clients == 4


@pytest.mark.parametrize("pyproject", APPS)
def test_every_app_lists_every_key_and_parses(pyproject):
    conf = app_config(pyproject)
    assert set(conf) == set(KEYS), f"{pyproject}: keys differ from fl_lota.federated.runconfig: {set(conf) ^ set(KEYS)}"
    RunConfig.from_run_config(conf)
    assert "federations" not in tomllib.loads(Path(pyproject).read_text())["tool"]["flwr"]


@pytest.mark.parametrize("conf", CONFS)
def test_every_conf_file_is_valid_over_its_app(conf):
    base = app_config(str(Path(conf).parents[1] / "pyproject.toml"))
    RunConfig.from_run_config(base | tomllib.loads(Path(conf).read_text()))


def test_there_are_configs_to_check():
    assert APPS and len(CONFS) >= 2


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"sparsty": 0.9}, "sparsty"),
        ({"sparsity": "high"}, "'sparsity': expected float"),
        ({"local-steps": 2.5}, "'local-steps': expected int"),
        ({"bf16": 1}, "'bf16': expected bool"),
        ({"method": "qlora"}, "qlora"),
        ({"merge": "average"}, "average"),
        ({"eval-merges": "ties,median"}, "median"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"federation": "math,poetry"}, "poetry"),
        ({"results-dir": "results/run1"}, "absolute"),
        ({"values": "fp8"}, "fp8"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_name_the_key(config, needle):
    with pytest.raises(RunConfigError, match=needle):
        RunConfig.from_run_config(config)


def test_ints_are_accepted_for_floats_and_merges_are_deduplicated():
    cfg = RunConfig.from_run_config({"lr": 1, "merge": "ties", "eval-merges": "ties, fedavg,fedavg"})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.merges == ("ties", "fedavg")


def test_finetune_options_follow_the_method():
    lota = RunConfig()
    assert lota.finetune_options(first_round=True)["calibration_steps"] == lota.calibration_steps
    assert "calibration_steps" not in lota.finetune_options(first_round=False)
    assert RunConfig(method="fft").finetune_options(first_round=True) == {}
    assert RunConfig(method="lora", lora_rank=4).finetune_options(first_round=True) == {"rank": 4, "alpha": 8}


def test_verbose_changes_no_stored_results_key_and_no_resume():
    from fl_lota.federated.runconfig import RunConfig

    quiet, loud = RunConfig(), RunConfig(verbose=True)
    assert quiet.identity() == loud.identity() and "verbose" not in quiet.identity()
    assert quiet.resumable() == loud.resumable()
    assert RunConfig(seed=1).identity() != quiet.identity()
