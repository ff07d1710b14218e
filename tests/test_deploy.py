"""Flower's deployment engine: SuperLink and SuperNodes as separate processes on 127.0.0.1,
with TLS and SuperNode authentication, two rounds, and every process stopped after."""

from __future__ import annotations

import socket
import ssl
import threading
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fl_lota.federated.report import read_rows
from server.deploy import Federation, main, probe_superlink, write_creds

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
        # what a SuperNode's machine can check before it starts: the real SuperLink serves TLS
        address = f"127.0.0.1:{fed.port}"
        assert probe_superlink(address, creds / "ca.crt") is None
        assert "serves TLS but the SuperNode is started with --insecure" in probe_superlink(address, insecure=True)
        status = fed.run(APP, conf | {"results-dir": str(out)}, timeout=900)
        assert status["status"] == "finished:completed"
        assert status["network-traffic"]["total-bytes"] > 0  # the messages crossed the network
    assert fed.procs and all(p.poll() is not None for p in fed.procs)  # every process stopped
    rows = read_rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2]
    assert sorted(c["partition"] for c in rows[0]["clients"]) == [0, 1]  # partitions from --node-config
    assert all(c["values_only"] for c in rows[1]["clients"])


def _serve(sock, context=None) -> None:
    """Accept connections on ``sock`` (TLS when ``context``) until it is closed."""
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        try:
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()


@pytest.fixture()
def listeners(tmp_path):
    """A TLS listener with the dev SuperLink certificate and a plaintext one, on loopback."""
    creds = write_creds(tmp_path / "creds", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(creds / "server.pem", creds / "server.key")
    socks = []
    for context in (ctx, None):
        s = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=_serve, args=(s, context), daemon=True).start()
        socks.append(s)
    yield creds, *(f"127.0.0.1:{s.getsockname()[1]}" for s in socks)
    for s in socks:
        s.close()


def test_probe_names_why_a_supernode_would_not_connect(listeners, tmp_path, capsys):
    creds, tls, plain = listeners
    other_ca = write_creds(tmp_path / "other", 1) / "ca.crt"
    closed = socket.create_server(("127.0.0.1", 0))
    closed_address = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    assert probe_superlink(tls, creds / "ca.crt") is None
    assert probe_superlink(plain, insecure=True) is None
    cases = [
        ((tls, None), {"insecure": True}, "serves TLS but the SuperNode is started with --insecure"),
        ((tls, other_ca), {}, "does not accept"),
        ((tls.replace("127.0.0.1", "localhost"), creds / "ca.crt"), {}, None),  # a name the certificate lists
        ((plain, creds / "ca.crt"), {}, "does not speak TLS"),
        ((closed_address, creds / "ca.crt"), {}, "nothing answers"),
        ((tls, tmp_path / "missing.crt"), {}, "does not exist"),
        ((tls, tmp_path), {}, "is not a file"),
        ((tls, other_ca.with_name("supernode-0.pub")), {}, "holds no PEM certificate"),
        (("no-port", None), {"insecure": True}, "not host:port"),
    ]
    for args, kw, needle in cases:
        why = probe_superlink(*args, **kw)
        assert (why is None) if needle is None else (needle in why), (args, why)
    # the command a SuperNode's operator runs: exit 1 and the reason, exit 0 when all agrees
    assert main(["probe", "--superlink", tls, "--insecure"]) == 1
    assert "--root-certificates" in capsys.readouterr().out
    assert main(["probe", "--superlink", tls, "--root-certificates", str(creds / "ca.crt")]) == 0
