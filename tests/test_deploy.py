"""Flower's deployment engine: SuperLink and SuperNodes as separate processes on 127.0.0.1,
with TLS and SuperNode authentication, two rounds, and every process stopped after."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fl_lota.report import read_rows
from server.deploy import Federation, write_creds

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "sims" / "heterogeneous_tasks"


def test_dev_credentials_chain_and_keys(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out = write_creds(tmp_path, 2, sans=("10.1.2.3", "superlink.example"))
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    srv = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    srv.verify_directly_issued_by(ca)
    names = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example"}
    for i in range(2):
        serialization.load_ssh_private_key((out / f"supernode-{i}.key").read_bytes(), None)
        assert (out / f"supernode-{i}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert (out / f"supernode-{i}.key").stat().st_mode & 0o077 == 0


def test_two_rounds_on_the_deployment_engine(tmp_path):
    creds = write_creds(tmp_path / "creds", 2)
    conf = tomllib.loads((APP / "conf" / "tiny.toml").read_text())
    out = tmp_path / "results"
    fed = Federation(creds, 2, tmp_path / "work")
    with fed:
        status = fed.run(APP, conf | {"results-dir": str(out)}, timeout=900)
        assert status["status"] == "finished:completed"
        assert status["network-traffic"]["total-bytes"] > 0  # the messages crossed the network
    assert fed.procs and all(p.poll() is not None for p in fed.procs)  # every process stopped
    rows = read_rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(c["partition"] for c in rows[0]["clients"]) == [0, 1]  # partitions from --node-config
    assert all(c["values_only"] for c in rows[1]["clients"])
