"""Real deployment on Flower's own runtime: certificates, the SuperLink, node registration, runs.

Thin wrappers around Flower's commands (``flower-superlink``, ``flwr``); the SuperNode side is in
``client/node.py``. Each ``*_argv`` function only builds a command line (pure, unit-tested); the
``fedslm`` subcommands run them. Flower 1.42 (what pip resolves for ``flwr>=1.41,<1.43``) serves the
Fleet, Control and Runtime APIs of a SuperLink on one HTTPS address (``--host``/``--port``), and
authenticates SuperNodes by EC key pairs in OpenSSH format: the SuperLink runs with
``--enable-supernode-auth`` and only accepts nodes whose public key was registered through its
Control API (``flwr supernode register``); ``--auth-list-public-keys`` no longer exists.

Certificate directory written by :func:`write_certificates`::

    ca.crt, ca.key            the certificate authority (ca.key stays with whoever issues certificates)
    server.crt, server.key    the SuperLink's TLS certificate (SANs: localhost, 127.0.0.1, --host ...)
    nodes/node-K.key          node K's private key (OpenSSH, EC P-384): copy to node K only
    nodes/node-K.pub          node K's public key (OpenSSH): registered with the SuperLink
    public-keys.csv           the public keys ``fedslm server`` registers, one per line
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedslm.errors import RunFailedError
from fedslm.fs import atomic_dir, atomic_write, check_out_dir
from fedslm.logs import get_logger

log = get_logger(__name__)

DEFAULT_SUPERLINK = "127.0.0.1:8000"  # Flower's default: the SuperLink's HTTPS API (Fleet, Control, Runtime)
LOCAL_NAMES = ("localhost", "127.0.0.1")  # always in the server certificate's SANs
NODE_KEY_CURVE = "secp384r1"  # Flower's own choice for SuperNode keys (any NIST curve is accepted)
CERT_DAYS = 365

# What every deploy process gets (each can be overridden from the environment).
DEPLOY_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    # never `uv sync` the app's dependencies at run time: that would pull a CUDA torch (all are in the venv)
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class DeployError(RunFailedError):
    """A deployment step cannot go on; the message says what to do."""


# -- certificates and node keys ----------------------------------------------------------------


@dataclass(frozen=True)
class CertPaths:
    """The files of a certificate directory (see the module docstring)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def public_keys(self) -> Path:
        return self.root / "public-keys.csv"

    def node_key(self, k: int) -> Path:
        return self.root / "nodes" / f"node-{k}.key"

    def node_pub(self, k: int) -> Path:
        return self.root / "nodes" / f"node-{k}.pub"

    def check_server(self) -> None:
        missing = [p for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise DeployError(
                f"missing {', '.join(str(p) for p in missing)}; create them with `fedslm certs --out {self.root}`"
            )


def write_certificates(
    out: Path, nodes: int, hosts: Sequence[str] = (), days: int = CERT_DAYS, force: bool = False
) -> CertPaths:
    """A CA, a SuperLink certificate for ``localhost``/``127.0.0.1`` + ``hosts``, and ``nodes`` node keys."""
    if nodes < 1:
        raise DeployError(f"--nodes {nodes}: need at least one node")
    replaced = check_out_dir(out, force, hint="choose a new folder (a CA is made once: keep ca.key)")
    if replaced:
        log.warning("--force: replacing %d entries of %s: %s", len(replaced), out, ", ".join(replaced))
    with atomic_dir(out) as tmp:  # all of it or nothing: never a new CA beside old node keys
        _write_certificates(CertPaths(tmp), nodes, hosts, days)
    return CertPaths(Path(out))


def _write_certificates(paths: CertPaths, nodes: int, hosts: Sequence[str], days: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedslm CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    names = list(dict.fromkeys([*LOCAL_NAMES, *hosts]))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    _write(paths.ca_key, _pem_private(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(pem))
    _write(paths.server_key, _pem_private(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(pem))
    public_lines = []
    for k in range(nodes):
        public_lines.append(write_node_key(paths.node_key(k), paths.node_pub(k), comment=f"fedslm-node-{k}"))
    _write(paths.public_keys, ("\n".join(public_lines) + "\n").encode())
    log.info("wrote CA, server certificate (SANs %s) and %d node keys", ", ".join(names), nodes)


def write_node_key(key_path: Path, pub_path: Path, comment: str = "") -> str:
    """An EC P-384 key pair in OpenSSH format, as ``flower-supernode`` and ``flwr supernode register`` read it."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode() + (f" {comment}" if comment else "")
    key_path.parent.mkdir(parents=True, exist_ok=True)
    _write(key_path, private, private=True)
    _write(pub_path, (line + "\n").encode())
    return line


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    atomic_write(path, data, 0o600 if private else None)


# -- command lines -----------------------------------------------------------------------------


def connect_address(address: str) -> str:
    """The address a local client uses for a SuperLink bound to ``address`` (a wildcard -> 127.0.0.1)."""
    host, port = split_address(address)
    return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "") else address


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); a clear error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise DeployError(f"address {address!r} is not host:port, e.g. {DEFAULT_SUPERLINK}")
    return host.strip("[]"), int(port)


def superlink_argv(
    certs: Path | None,
    address: str = DEFAULT_SUPERLINK,
    insecure: bool = False,
    database: Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no runtime dependency installation.

    ``insecure`` drops TLS and with it SuperNode authentication (Flower refuses authentication without
    TLS): any node can then join and read the global adapter. Only for a throwaway local test.
    """
    host, port = split_address(address)
    argv = [tool("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        argv += ["--database", str(database)]
    if insecure:
        log.warning(
            "INSECURE SuperLink: no TLS and no SuperNode authentication; traffic (adapters, metrics) is "
            "unencrypted and ANY node can join. Use only for a local test; drop --insecure otherwise."
        )
        return [*argv, "--insecure"]
    if certs is None:
        raise DeployError("a SuperLink needs --certs DIR (from `fedslm certs`), or --insecure for a local test")
    paths = CertPaths(Path(certs))
    return [
        *argv,
        "--ssl-ca-certfile",
        str(paths.ca_cert),
        "--ssl-certfile",
        str(paths.server_cert),
        "--ssl-keyfile",
        str(paths.server_key),
        "--enable-supernode-auth",
    ]


def register_argv(public_key: Path, connection: str, name: str | None = None) -> list[str]:
    """``flwr supernode register``: let the node holding the matching private key join."""
    argv = [tool("flwr"), "supernode", "register", str(public_key), connection]
    return argv + (["--name", name] if name else [])


def list_nodes_argv(connection: str) -> list[str]:
    return [tool("flwr"), "supernode", "list", connection, "--format", "json"]


def run_argv(
    app: Path,
    connection: str,
    config: str,
    out_dir: str | None = None,
    overrides: Sequence[str] = (),
    stream: bool = True,
    resume: str | None = None,
) -> list[str]:
    """``flwr run APP CONNECTION`` with ``config``, ``out-dir``, ``set`` and ``resume`` of
    ``[tool.flwr.app.config]`` (``config`` "" with ``resume``: the run's own ``config.yaml``)."""
    run_config = [f"config={json.dumps(config)}"]
    if out_dir:
        run_config.append(f"out-dir={json.dumps(out_dir)}")
    if resume:
        run_config.append(f"resume={json.dumps(resume)}")
    if overrides:
        bad = [o for o in overrides if "," in o or "=" not in o]
        if bad:
            raise DeployError(f"--set {bad[0]!r}: expected KEY=VALUE without commas")
        run_config.append(f"set={json.dumps(','.join(overrides))}")
    argv = [tool("flwr"), "run", str(app), connection, "--run-config", " ".join(run_config)]
    return argv + (["--stream"] if stream else [])


def stage_app(app: Path, dest: Path) -> Path:
    """Copy the files of ``app`` that ``flwr run`` packs into its FAB to ``dest``; return ``dest``.

    ``flwr run APP`` (1.42) lists every file under APP, then keeps the FAB's: ~30 s of CPU for a
    checkout holding ``make test``'s three virtual environments (171,000 files) before anything is
    submitted. This walk skips what the FAB never holds: virtual environments (a ``pyvenv.cfg``),
    hidden and ``__pycache__`` folders, and what the app's ``.gitignore`` names; it copies what
    Flower's own include patterns match, and the ``.gitignore``. Flower filters the copy by its own
    rules, so the FAB (and its hash) is the one it builds from APP itself.
    """
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns
    from flwr.common.constant import FAB_INCLUDE_PATTERNS

    included = build_pathspec(FAB_INCLUDE_PATTERNS)
    ignored = build_pathspec(load_gitignore_patterns(app / ".gitignore"))
    if (app / ".gitignore").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(app / ".gitignore", dest / ".gitignore")
    for folder, dirs, files in os.walk(app):
        here = Path(folder)
        rel = here.relative_to(app)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d != "__pycache__"
            and not (here / d / "pyvenv.cfg").exists()
            and not ignored.match_file(f"{(rel / d).as_posix()}/")
        ]
        for name in files:
            path, posix = here / name, (rel / name).as_posix()
            if included.match_file(posix) and not ignored.match_file(posix) and not path.is_symlink():
                (dest / rel).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel / name)
    return dest


# -- Flower CLI configuration ($FLWR_HOME/config.toml) -----------------------------------------


def flwr_home(env: Mapping[str, str] | None = None) -> Path:
    """``$FLWR_HOME``, else ``.flwr-home`` in the current directory (as ``make flwr-run`` uses)."""
    env = os.environ if env is None else env
    return Path(env.get("FLWR_HOME") or Path.cwd() / ".flwr-home").expanduser().resolve()


def write_connection(
    home: Path, name: str, address: str, root_certificates: Path | None, insecure: bool = False
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``home/config.toml``, keeping every other entry."""
    import tomli_w  # a dependency of flwr

    split_address(address)
    path = Path(home) / "config.toml"
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    superlink = data.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    elif root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    else:
        raise DeployError(f"connection {name!r} needs the CA certificate (--certs DIR) or --insecure")
    superlink[name] = entry
    superlink.setdefault("default", name)
    return atomic_write(path, tomli_w.dumps(data))  # the user's file keeps its mode


# -- processes ---------------------------------------------------------------------------------


def tool(name: str) -> str:
    """A Flower executable of this environment (the venv's, found even when it is not activated)."""
    here = Path(sys.executable).with_name(name)
    return str(here) if here.exists() else name


def deploy_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default ``os.environ``) + :data:`DEPLOY_ENV` defaults + the venv's bin first on PATH.

    Flower starts ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name.
    """
    env = dict(os.environ if base is None else base)
    for key, value in DEPLOY_ENV.items():
        env.setdefault(key, value)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # not negotiable: a CUDA torch would follow
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in env.get("PATH", "").split(os.pathsep) if p != bin_dir)])
    env.update(extra)
    return env


def wait_for_port(address: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Until something accepts TCP connections on ``address`` (``alive`` false: stop waiting)."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise DeployError(f"the process that should listen on {address} exited")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"nothing listens on {address} after {timeout:.0f} s")


def register_nodes(public_keys: Path, connection: str, env: Mapping[str, str], timeout: float = 60.0) -> list[int]:
    """Register every OpenSSH public key of ``public_keys`` (one per line); returns the node ids."""
    ids = []
    for n, line in enumerate(_key_lines(public_keys)):
        comment = line.split()[2] if len(line.split()) > 2 else f"node-{n}"
        with tempfile.TemporaryDirectory() as tmp:  # flwr reads one key per file
            key_file = Path(tmp) / "node.pub"
            key_file.write_text(line + "\n")
            argv = [*register_argv(key_file, connection, name=comment), "--format", "json"]
            proc = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout)
        # flwr exits 0 with {"success": false, ...} for a key a SuperLink with --database already knows
        if "already in use" in proc.stdout + proc.stderr:
            log.info("%s is already registered (the SuperLink's --database keeps registrations)", comment)
            continue
        reply = _last_json(proc.stdout) if proc.returncode == 0 and "{" in proc.stdout else {}
        if proc.returncode != 0 or reply.get("success") is False or "node-id" not in reply:
            raise DeployError(f"registering {comment} failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
        ids.append(int(reply["node-id"]))
        log.info("registered %s as SuperNode %s", comment, ids[-1])
    return ids


def list_nodes(connection: str, env: Mapping[str, str], timeout: float = 60.0) -> list[dict[str, Any]]:
    """The SuperLink's nodes as ``flwr supernode list --format json`` reports them (``status`` etc.)."""
    proc = subprocess.run(list_nodes_argv(connection), env=dict(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DeployError(f"flwr supernode list failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
    return list(_last_json(proc.stdout).get("nodes", []))


def stop_stale_run(run_id: int, connection: str, env: Mapping[str, str], timeout: float = 60.0) -> bool:
    """``flwr stop run_id`` if the SuperLink still has that run pending or running: a run whose ServerApp
    died (with a ``--database`` it survives a SuperLink restart) would otherwise have its queued round
    messages trained, and counted in the clients' privacy ledgers, next to the resumed run's."""
    flwr = tool("flwr")
    argv = [flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"]
    proc = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout)
    runs = _last_json(proc.stdout).get("runs", []) if proc.returncode == 0 and "{" in proc.stdout else []
    status = str(runs[0].get("status", "")) if runs else "unknown to the SuperLink"
    if not status.startswith(("pending", "starting", "running")):
        log.info("Flower run %s, which last worked on this run, is %s: nothing to stop", run_id, status)
        return False
    argv = [flwr, "stop", str(run_id), connection, "--format", "json"]
    proc = subprocess.run(argv, env=dict(env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or '"success": false' in proc.stdout:
        raise DeployError(
            f"flwr stop {run_id} failed: {(proc.stdout + proc.stderr).strip()[-400:]}; stop that run"
            " (`flwr stop RUN_ID CONNECTION`) before resuming, or its queued messages are trained too"
        )
    log.info("stopped Flower run %s (left %s by the crash): its queued messages will not be trained", run_id, status)
    return True


def _key_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DeployError(f"{path}: no such file; `fedslm certs` writes it")
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _last_json(text: str) -> dict[str, Any]:
    """The JSON object that ``flwr ... --format json`` prints (after any progress lines)."""
    start = text.find("{")
    if start < 0:
        raise DeployError(f"no JSON in flwr's output: {text[-400:]!r}")
    return json.loads(text[start:])


def run_foreground(
    argv: Sequence[str],
    env: Mapping[str, str],
    after_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> int:
    """Run ``argv`` until it exits or Ctrl-C; ``after_start(proc)`` runs once started (its failure stops it)."""
    log.info("starting: %s", " ".join(argv))
    proc = subprocess.Popen(list(argv), env=dict(env))
    try:
        if after_start is not None:
            after_start(proc)
        return proc.wait()
    except KeyboardInterrupt:
        log.info("stopping %s", argv[0])
        return stop_process(proc)
    except BaseException:
        stop_process(proc)
        raise


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
