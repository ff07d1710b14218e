"""Flower's deployment engine for fl-lota: dev credentials, and a loopback federation.

    python -m server.deploy creds  --out /abs/creds --nodes 4 [--san 10.0.0.5]
    python -m server.deploy local  --creds /abs/creds --nodes 2 --conf sims/heterogeneous_tasks/conf/tiny.toml \\
                                   [--set key=value ...] [--workdir /abs/work]
    python -m server.deploy probe  --superlink host:9092 (--root-certificates /abs/ca.crt | --insecure)

``creds`` writes a development CA, a SuperLink TLS certificate (for localhost, 127.0.0.1 and
each ``--san``) and one EC P-384 key pair per SuperNode (OpenSSH public key, PEM private
key): what ``flower-superlink --ssl-*``, ``flower-supernode --root-certificates`` and
SuperNode authentication (``--enable-supernode-auth``, ``flwr supernode register``) need.
Development only: keep real keys in a secret store.

``local`` starts a SuperLink (TLS, SuperNode authentication on) and one SuperNode per client
as separate processes on 127.0.0.1, each SuperNode given its partition with
``--node-config``, registers the SuperNodes' public keys, runs the app with ``flwr run``,
checks the run completed, and stops every process it started, whatever happens.
The README's "Running across machines" section gives the same commands for several hosts.

``probe`` says, from a SuperNode's machine, why a SuperNode started with the same
``--superlink`` and ``--root-certificates``/``--insecure`` would not connect: nothing listens
there, TLS on one side only, or a certificate the given CA does not verify (a SuperNode
itself retries such connections silently). It cannot check SuperNode keys: a key the
SuperLink does not know shows only in the SuperLink's log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fl_lota.federated.launch import RunFailed, executable, free_port, run_config_file, wait_finished

__all__ = ["Federation", "probe_superlink", "write_creds"]


def write_creds(out: str | Path, nodes: int, sans: tuple[str, ...] = ()) -> Path:
    """CA, SuperLink certificate and key, and ``nodes`` SuperNode key pairs under ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fl-lota dev"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        )

    def pem_key(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def write(path: Path, data: bytes, private: bool = False) -> None:
        path.write_bytes(data)
        if private:
            path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fl-lota dev CA"))
        .issuer_name(name("fl-lota dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for s in sans:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            alt.append(x509.DNSName(s))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (
        x509.CertificateBuilder()
        .subject_name(name("fl-lota superlink"))
        .issuer_name(ca.subject)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    write(out / "ca.key", pem_key(ca_key), private=True)
    write(out / "server.pem", srv.public_bytes(serialization.Encoding.PEM))
    write(out / "server.key", pem_key(srv_key), private=True)
    for i in range(nodes):
        k = ec.generate_private_key(ec.SECP384R1())
        ssh_key = k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        write(out / f"supernode-{i}.key", ssh_key, private=True)  # the format Flower's SuperNode reads
        pub = k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write(out / f"supernode-{i}.pub", pub + b"\n")
    return out


def probe_superlink(
    address: str, root_certificates: str | Path | None = None, *, insecure: bool = False, timeout: float = 5.0
) -> str | None:
    """Why a SuperNode started with ``--superlink address`` and these TLS settings cannot
    reach the SuperLink, or None when the connection and TLS agree."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return f"{address!r} is not host:port"
    host = host.strip("[]")
    if root_certificates is not None and not Path(root_certificates).is_file():
        what = "is not a file" if Path(root_certificates).exists() else "does not exist"
        return f"the root certificates file {root_certificates} {what}"
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as e:
        return (
            f"nothing answers at {address} ({e.strerror or e}): is the SuperLink running, "
            "are the host and port right, does a firewall block the port?"
        )
    if root_certificates is not None:
        try:
            ctx = ssl.create_default_context(cafile=str(root_certificates))
        except ssl.SSLError as e:
            sock.close()
            return f"the root certificates file {root_certificates} holds no PEM certificate ({e.reason or e})"
    else:  # only to learn whether the other side speaks TLS at all
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            speaks_tls = True
    except ssl.SSLCertVerificationError as e:
        return (
            f"the SuperLink at {address} serves TLS with a certificate that {root_certificates} does not accept "
            f"({e.verify_message}): pass the CA that signed the SuperLink's certificate as --root-certificates, "
            "and reach the SuperLink by a name or IP its certificate lists"
        )
    except (ssl.SSLError, OSError):
        speaks_tls = False
    finally:
        sock.close()
    if speaks_tls and insecure:
        return (
            f"the SuperLink at {address} serves TLS but the SuperNode is started with --insecure: "
            "start it with --root-certificates <the CA that signed the SuperLink's certificate>"
        )
    if not speaks_tls and not insecure:
        return (
            f"the SuperLink at {address} does not speak TLS (started with --insecure?): start the SuperNode "
            "with --insecure too, or give the SuperLink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile"
        )
    return None


@dataclass
class Federation:
    """A SuperLink and SuperNodes on loopback, as separate processes (a context manager
    that stops them all on exit)."""

    creds: Path
    nodes: int
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.creds, self.workdir = Path(self.creds), Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()  # Flower 1.4x serves Fleet, Control and Runtime APIs on one HTTPS port
        home = self.workdir / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "fl-lota-deploy"\n\n[superlink.fl-lota-deploy]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.creds / "ca.crt"}"\n'
        )
        self.env = dict(os.environ) | {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }

    def _start(self, cmd: list[str], log: str) -> subprocess.Popen:
        f = open(self.workdir / log, "w")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        p.log = f  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [executable("flwr"), *args]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, wait: float = 60) -> None:
        c = self.creds
        self._start(
            [
                executable("flower-superlink"),
                "--ssl-ca-certfile", str(c / "ca.crt"),
                "--ssl-certfile", str(c / "server.pem"),
                "--ssl-keyfile", str(c / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db"),
            ],
            "superlink.log",
        )  # fmt: skip
        t0 = time.monotonic()
        while True:  # the Control API answers once the SuperLink is up
            r = self.flwr("supernode", "list", "--format", "json", timeout=30)
            if r.returncode == 0 and '"success": true' in r.stdout.replace("'", '"'):
                break
            if time.monotonic() - t0 > wait or self.procs[0].poll() is not None:
                raise RuntimeError(
                    f"SuperLink did not come up: {r.stdout[-800:]} {r.stderr[-800:]}\n{self.log('superlink.log')}"
                )
            time.sleep(1.0)
        self.node_ids: list[str] = []
        for i in range(self.nodes):
            r = self.flwr("supernode", "register", str(c / f"supernode-{i}.pub"), "--format", "json")
            if r.returncode != 0 or "error" in r.stdout.lower():
                raise RuntimeError(f"registering supernode {i} failed: {r.stdout[-800:]} {r.stderr[-800:]}")
            try:
                self.node_ids.append(str(json.loads(r.stdout[r.stdout.index("{") :])["node-id"]))
            except (ValueError, KeyError):
                raise RuntimeError(f"registering supernode {i}: no node id in {r.stdout[-300:]!r}") from None
        for i in range(self.nodes):
            self._start(
                [
                    executable("flower-supernode"),
                    "--root-certificates", str(c / "ca.crt"),
                    "--superlink", f"127.0.0.1:{self.port}",
                    "--auth-supernode-private-key", str(c / f"supernode-{i}.key"),
                    "--auth-supernode-public-key", str(c / f"supernode-{i}.pub"),
                    "--node-config", f"partition-id={i} num-partitions={self.nodes}",
                    "--host", "127.0.0.1",
                    "--port", str(free_port()),
                ],
                f"supernode-{i}.log",
            )  # fmt: skip
        self.wait_online(wait)

    def wait_online(self, wait: float = 60) -> None:
        """Until every registered SuperNode is online. A SuperNode that cannot reach the
        SuperLink (no or wrong --root-certificates against TLS, a key the SuperLink does
        not know, a wrong address) retries without saying why: name it, with its log."""
        t0 = time.monotonic()
        status: dict[str, str] = {}
        while time.monotonic() - t0 < wait:
            r = self.flwr("supernode", "list", "--format", "json", timeout=30)
            with contextlib.suppress(ValueError, KeyError):
                status = {n["node-id"]: n["status"] for n in json.loads(r.stdout)["nodes"]}
            if all(status.get(n) == "online" for n in self.node_ids):
                return
            time.sleep(1.0)
        late = [i for i, n in enumerate(self.node_ids) if status.get(n) != "online"]
        why = probe_superlink(f"127.0.0.1:{self.port}", self.creds / "ca.crt")
        raise RuntimeError(
            (f"{why}\n" if why else "")
            + f"SuperNode(s) {late} did not connect to the SuperLink at 127.0.0.1:{self.port} within {wait:.0f} s "
            f"(status: {[status.get(self.node_ids[i], 'unknown') for i in late]}). A SuperNode retries silently when "
            "TLS does not match (its --root-certificates must be the CA that signed the SuperLink's certificate), "
            "when its key was not registered (flwr supernode register), or when the address is wrong "
            "('python -m server.deploy probe' checks the first and the last). "
            + "".join(f"\nsupernode-{i}.log ends:\n{self.log(f'supernode-{i}.log')[-1200:]}" for i in late)
        )

    def log(self, name: str) -> str:
        p = self.workdir / name
        return p.read_text()[-3000:] if p.exists() else ""

    def run(self, app: str | Path, run_config: dict[str, object], timeout: float = 1800) -> dict:
        """``flwr run`` on this federation; returns the run's status record, raises
        RunFailed (with the logs) unless it completed."""
        with run_config_file(run_config) as cfg_path:
            args = ["run", str(app), "fl-lota-deploy", "--format", "json"]
            r = self.flwr(*args, *(["--run-config", cfg_path] if cfg_path else []), timeout=120)
        try:
            run_id = str(json.loads(r.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError):
            raise RunFailed(f"flwr run failed to submit: {r.stdout[-1500:]} {r.stderr[-1500:]}") from None

        def alive() -> str | None:
            dead = [p for p in self.procs if p.poll() is not None]
            return f"{len(dead)} federation process(es) exited" if dead else None

        try:
            return wait_finished(run_id, self.env, timeout=timeout, interval=2.0, alive=alive, patient=True)
        except RunFailed as e:
            raise RunFailed(f"{e}\n{self._logs()}") from None

    def _logs(self) -> str:
        return "\n".join(self.log(p.name) for p in sorted(self.workdir.glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            p.log.close()  # type: ignore[attr-defined]

    def __enter__(self) -> Federation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    from fl_lota.cli import parse_sets

    ap = argparse.ArgumentParser(prog="python -m server.deploy", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("creds", help="write dev TLS certificates and SuperNode keys")
    c.add_argument("--out", required=True)
    c.add_argument("--nodes", type=int, default=4)
    c.add_argument("--san", action="append", default=[], help="extra host name or IP of the SuperLink")
    loc = sub.add_parser("local", help="SuperLink + SuperNodes on 127.0.0.1, one flwr run, then stop")
    loc.add_argument("--creds", required=True)
    loc.add_argument("--nodes", type=int, default=4)
    loc.add_argument("--app", default="sims/heterogeneous_tasks")
    loc.add_argument("--conf", help="run-config TOML file")
    loc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    loc.add_argument("--workdir", help="logs and state (default: a temporary folder)")
    pr = sub.add_parser("probe", help="why a SuperNode with these settings would not reach the SuperLink")
    pr.add_argument("--superlink", required=True, metavar="HOST:PORT")
    tls = pr.add_mutually_exclusive_group(required=True)
    tls.add_argument("--root-certificates", metavar="CA_PEM")
    tls.add_argument("--insecure", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "probe":
        why = probe_superlink(args.superlink, args.root_certificates, insecure=args.insecure)
        print(why or f"{args.superlink}: reachable, and TLS agrees (SuperNode keys are not checked)")
        return 1 if why else 0
    if args.cmd == "creds":
        print(write_creds(args.out, args.nodes, tuple(args.san)))
        return 0
    import tomllib

    cfg = tomllib.loads(Path(args.conf).read_text()) if args.conf else {}
    cfg |= parse_sets(args.set)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fl-lota-deploy-"))
    with Federation(Path(args.creds), args.nodes, work) as fed:
        status = fed.run(args.app, cfg)
    print(json.dumps(status, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
