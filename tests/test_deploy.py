"""Real deployment on Flower's runtime: certificates, the SuperLink/SuperNode/flwr run command lines, and a
TLS + node-authenticated federation of 3 SuperNodes on 127.0.0.1 (an unregistered node is refused)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from fedslm.client.node import NodeSpec, client_id_from_key, node_config, supernode_argv

from fedslm.deploy import (
    CertPaths,
    DeployError,
    deploy_env,
    list_nodes,
    run_argv,
    stage_app,
    superlink_argv,
    write_certificates,
    write_connection,
    write_node_key,
)
from fedslm.fs import OutDirError

ROOT = Path(__file__).resolve().parent.parent
FEDSLM = str(Path(sys.executable).with_name("fedslm"))
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return write_certificates(tmp_path_factory.mktemp("deploy") / "certs", 3, hosts=["fl.example.org", "10.1.2.3"])


# -- certificates ------------------------------------------------------------------------------


def test_certs_are_parseable_and_chain_to_the_ca(certs: CertPaths) -> None:
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "fl.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = load_pem_private_key(certs.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    for private in (certs.ca_key, certs.server_key, certs.node_key(0)):
        assert private.stat().st_mode & 0o077 == 0, f"{private} is readable by others"


def test_node_keys_are_what_flower_reads(certs: CertPaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    lines = certs.public_keys.read_text().splitlines()
    assert len(lines) == 3
    for k in range(3):
        private = load_ssh_private_key(certs.node_key(k).read_bytes(), None)  # as flower-supernode loads it
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(certs.node_pub(k)) == public_key_to_bytes(private.public_key())
        assert lines[k] == certs.node_pub(k).read_text().strip()
        assert lines[k].startswith("ecdsa-sha2-nistp384 ") and lines[k].endswith(f"fedslm-node-{k}")
    assert client_id_from_key(certs.node_key(2)) == 2


def test_certs_refuse_to_overwrite_a_ca(certs: CertPaths) -> None:
    # OutDirError, not DeployError: a non-empty --out is the user's mistake (exit 2), not a failed deployment
    with pytest.raises(OutDirError, match="--force"):
        write_certificates(certs.root, 1)


def test_certs_refuse_any_non_empty_folder_and_force_replaces_all_of_it(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutDirError, match=r"not empty \(1 entries: notes.txt\).*--force"):
        write_certificates(out, 1)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing written beside the user's file
    first = write_certificates(tmp_path / "fresh", 3)
    old_ca = first.ca_key.read_bytes()
    again = write_certificates(first.root, 1, force=True)
    assert again.ca_key.read_bytes() != old_ca  # a new CA ...
    assert sorted(p.name for p in (again.root / "nodes").iterdir()) == ["node-0.key", "node-0.pub"]  # no stale keys
    assert sorted(p.name for p in tmp_path.iterdir()) == ["certs", "fresh"]  # no temp left beside it


# -- command lines -----------------------------------------------------------------------------


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_superlink_argv_turns_on_tls_and_node_auth(certs: CertPaths, fedslm_log: pytest.LogCaptureFixture) -> None:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    argv = superlink_argv(certs.root, "127.0.0.1:9555")
    assert _flag(argv, "--ssl-ca-certfile") == str(certs.ca_cert)
    assert _flag(argv, "--ssl-certfile") == str(certs.server_cert)
    assert _flag(argv, "--ssl-keyfile") == str(certs.server_key)
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    args = _parse_args_run_superlink().parse_args(argv[1:])  # every flag exists in the installed Flower
    assert args.enable_supernode_auth and not args.insecure
    assert args.runtime_dependency_install is False and (args.host, args.port) == ("127.0.0.1", 9555)
    assert not fedslm_log.records
    with pytest.raises(DeployError, match="--certs"):
        superlink_argv(None)


def test_insecure_superlink_warns(fedslm_log: pytest.LogCaptureFixture) -> None:
    argv = superlink_argv(None, insecure=True)
    assert "--insecure" in argv and "--enable-supernode-auth" not in argv and "--ssl-certfile" not in argv
    assert "--disable-runtime-dependency-installation" in argv
    assert any(r.levelno == logging.WARNING and "INSECURE" in r.getMessage() for r in fedslm_log.records)


def test_supernode_argv_carries_tls_key_and_node_config(
    certs: CertPaths, tmp_path: Path, fedslm_log: pytest.LogCaptureFixture
) -> None:
    from flwr.common.config import parse_config_args
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    spec = NodeSpec(
        key=certs.node_key(1),
        data=tmp_path / "my data.jsonl",
        client_id=1,
        root_certificates=certs.ca_cert,
        superlink="10.1.2.3:9555",
        profile="phone",
        state_dir=tmp_path / "state",
    )
    argv = supernode_argv(spec)
    args = _parse_args_run_supernode().parse_args(argv[1:])
    assert args.root_certificates == str(certs.ca_cert) and not args.insecure
    assert args.auth_supernode_private_key == str(certs.node_key(1))
    assert args.superlink == "10.1.2.3:9555" and args.isolation == "subprocess"
    assert args.port == 9095 and args.host == "127.0.0.1"  # 9094 + client id: several nodes on one machine
    assert args.runtime_dependency_install is False
    assert parse_config_args([node_config(spec)]) == {
        "data-path": str((tmp_path / "my data.jsonl").resolve()),
        "client-id": 1,
        "state-dir": str((tmp_path / "state").resolve()),
        "profile": "phone",
        "resident-socket": str(spec.resident_socket),
    }
    assert not fedslm_log.records
    insecure = supernode_argv(NodeSpec(key=None, data=tmp_path / "d.jsonl", client_id=0, insecure=True))
    assert "--insecure" in insecure and "--root-certificates" not in insecure
    assert any("INSECURE" in r.getMessage() for r in fedslm_log.records)
    assert "profile" not in node_config(NodeSpec(key=None, data=tmp_path, client_id=0, insecure=True))
    with pytest.raises(DeployError, match="--profile"):
        NodeSpec(key=None, data=tmp_path, client_id=0, profile='a" b')


def test_run_argv_and_connection(certs: CertPaths, tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    argv = run_argv(
        ROOT, "site", "configs/tiny.yaml", "/srv/runs/a", ["train.local_steps=1", "federation.num_rounds=2"]
    )
    assert argv[1:4] == ["run", str(ROOT), "site"] and "--stream" in argv
    assert parse_config_args([_flag(argv, "--run-config")]) == {
        "config": "configs/tiny.yaml",
        "out-dir": "/srv/runs/a",
        "set": "train.local_steps=1,federation.num_rounds=2",
    }
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    write_connection(home, "site", "127.0.0.1:9555", certs.ca_cert)
    conf = tomllib.loads((home / "config.toml").read_text())
    assert conf["superlink"]["default"] == "local" and conf["superlink"]["local"]["address"] == ":local:"
    assert conf["superlink"]["site"] == {"address": "127.0.0.1:9555", "root-certificates": str(certs.ca_cert)}
    env = deploy_env({"PATH": "/usr/bin", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "0"})
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_write_connection_replaces_config_toml_atomically_keeping_its_mode(tmp_path: Path) -> None:
    import stat

    home = tmp_path / "home"
    path = write_connection(home, "a", "127.0.0.1:9555", None, insecure=True)
    path.chmod(0o600)
    write_connection(home, "b", "127.0.0.1:9556", None, insecure=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the user's choice is kept
    assert sorted(tomllib.loads(path.read_text())["superlink"]) == ["a", "b", "default"]
    assert [p.name for p in home.iterdir()] == ["config.toml"]  # no temp left


def test_staged_app_packs_the_same_fab_without_walking_venvs_or_ignored_folders(tmp_path: Path) -> None:
    """`fedslm run` hands `flwr run` a copy of the app's FAB files: Flower then builds the same FAB (same
    bytes) as from the app folder, and the copy holds no virtual environment, cache or ignored run."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "app"
    files = {
        "pyproject.toml": (ROOT / "pyproject.toml").read_text(),
        ".gitignore": (ROOT / ".gitignore").read_text(),
        "LICENSE": "MIT\n",
        "fedslm/__init__.py": "X = 1\n",
        "fedslm/data.bin": "not in a FAB\n",
        "configs/tiny.yaml": "model: {}\n",
        "tests/test_a.py": "def test(): pass\n",
        "tests/golden.json": "{}\n",
        "fedslm/__pycache__/x.py": "cached\n",
        ".venv/lib/site.py": "venv\n",
        ".venv-python3.12/pyvenv.cfg": "home = /usr\n",
        ".venv-python3.12/lib/site.py": "venv\n",
        "myenv/pyvenv.cfg": "home = /usr\n",
        "runs/demo/metrics.jsonl": "{}\n",
    }
    for rel, text in files.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    staged = stage_app(app, tmp_path / "staged")
    copied = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
    assert copied == [".gitignore", "LICENSE", "configs/tiny.yaml", "fedslm/__init__.py", "pyproject.toml",
                      "tests/golden.json", "tests/test_a.py"]  # fmt: skip
    want, got = build_fab_from_disk(app), build_fab_from_disk(staged)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()


@pytest.fixture
def cli_logging() -> Iterator[None]:
    """``fedslm``'s main() sets up console logging (no propagation): undo it for the tests that follow."""
    logger = logging.getLogger("fedslm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_cli_subcommands_fail_early(tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None) -> None:
    from fedslm.simulation.cli import main

    assert main(["certs", "--out", str(tmp_path / "c"), "--nodes", "2"]) == 0
    assert CertPaths(tmp_path / "c").node_pub(1).is_file() and not CertPaths(tmp_path / "c").node_key(2).exists()
    # an existing CA is kept: the non-empty --out is refused as a user mistake (exit 2; it was 1, a DeployError)
    assert main(["certs", "--out", str(tmp_path / "c"), "--nodes", "2"]) == 2
    assert main(["server", "--certs", str(tmp_path / "missing")]) == 1
    assert "fedslm certs --out" in capsys.readouterr().err
    key = str(tmp_path / "c" / "nodes" / "node-1.key")
    assert main(["node", "--certs", str(tmp_path / "c"), "--key", key, "--data", str(tmp_path / "no.jsonl")]) == 1
    assert "no.jsonl: no such file" in capsys.readouterr().err
    # the run config is validated before anything is submitted
    assert main(["run", "configs/tiny.yaml", "--set", "model.quantization=fp4", "--app", str(ROOT)]) == 2


def _stopped_run(run: Path, overrides: list[str]) -> str:
    """A run directory as a run killed in round 2 leaves it: config.yaml, run.json, checkpoint round 1."""
    from fedslm.server import checkpoint
    from fedslm.server.preflight import load_run
    from fedslm.server.resume import start_run
    from fedslm.strategies import registry

    cfg = load_run(ROOT / "configs" / "tiny.yaml", overrides, scope="server")
    start_run(run, "stopped-123", cfg.federation.num_clients, flower_run=7)
    (run / "config.yaml").write_text(cfg.to_yaml())
    state = {"config_digest": checkpoint.config_digest(cfg.to_yaml()), "rows": [{"round": 0}, {"round": 1}]}
    checkpoint.save(run, 1, {"w": np.zeros(3, dtype=np.float32)}, registry.build(cfg).state_dict(), state)
    return cfg.to_yaml()


def test_run_resume_is_checked_before_anything_is_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cli_logging: None
) -> None:
    from types import SimpleNamespace

    from fedslm.server.app import deployed_run
    from fedslm.server.resume import ResumeError, last_flower_run, resume_point
    from fedslm.simulation.cli import main

    run = tmp_path / "run"
    sets = ["federation.num_clients=3", "train.local_steps=1"]
    _stopped_run(run, sets)
    tiny = str(ROOT / "configs" / "tiny.yaml")
    resume = ["run", tiny, "--app", str(ROOT), "--connection", "nowhere", "--resume", str(run)]
    # a config that is not the run's is refused, naming the key and both values
    assert main([*resume, "--set", "federation.num_clients=3", "--set", "train.local_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "train.local_steps is 2, the run in" in err and "has 1" in err and "Traceback" not in err
    assert main([*resume, "--out", str(tmp_path / "x")]) == 2 and "drop --out" in capsys.readouterr().err
    assert main(["run", "--set", "train.local_steps=1", "--resume", str(run)]) == 2  # --set needs its CONFIG
    from flwr.common.config import parse_config_args

    argv = run_argv(ROOT, "t", "", resume=str(run))
    assert parse_config_args([_flag(argv, "--run-config")]) == {"config": "", "resume": str(run)}
    # the ServerApp: the run's config, name and last complete round; without CONFIG the run's config.yaml
    cfg, out, name, ck = deployed_run(SimpleNamespace(run_id=8, run_config={"config": "", "resume": str(run)}))
    assert (out, name, cfg.train.local_steps, cfg.federation.num_clients) == (run, "stopped-123", 1, 3)
    assert ck is not None and ck.round == 1
    given = {"config": tiny, "set": "federation.num_clients=3,train.local_steps=1", "resume": str(run)}
    assert deployed_run(SimpleNamespace(run_id=9, run_config=given))[2] == "stopped-123"
    # each Flower run that worked on it is noted: the next `fedslm run --resume` stops the last if it is left
    assert json.loads((run / "run.json").read_text())["flower_runs"] == [7, 8, 9] and last_flower_run(run) == 9
    # a new run never starts into a directory that holds one (its run.json names the clients' ledgers)
    with pytest.raises(ResumeError, match="already holds a run"):
        deployed_run(SimpleNamespace(run_id=10, run_config={"config": tiny, "out-dir": str(run)}))
    new = SimpleNamespace(run_id=11, run_config={"config": tiny, "out-dir": str(tmp_path / "new")})
    _, _, fresh, none = deployed_run(new)
    assert none is None and json.loads((tmp_path / "new" / "run.json").read_text())["run_name"] == fresh
    with pytest.raises(ResumeError, match="no config.yaml there"):
        resume_point(tmp_path / "new")  # started, never got to write its config
    for f in (run / "checkpoints").glob("round-*"):
        shutil.rmtree(f)
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        resume_point(run)


# -- a federation on 127.0.0.1 -----------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Processes:
    """Processes started by a test, each in its own session; all of them and their children stopped at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL to ``proc`` and its descendants at once (a node that dies, no chance to say so)."""
        for pid in {proc.pid, *_descendants(proc.pid)}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        """SIGTERM to every process started and its descendants (Flower's SuperExec runs in a session of its
        own, its app processes below it), SIGKILL to what is left after 10 s."""
        pids: set[int] = set()
        for proc in self.started:
            pids |= {proc.pid, *_descendants(proc.pid)}
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while pids and time.monotonic() < deadline:
                for proc in self.started:
                    proc.poll()  # reap our direct children
                pids = {p for p in pids if _state(p) not in ("Z", "gone")}
                time.sleep(0.1)
            if not pids:
                return


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def _wait(what: str, check, timeout: float, interval: float = 1.0):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _node_data(out: Path, clients: int) -> list[Path]:
    """Each node's private file: the natural partition the simulation would give that client."""
    from fedslm import data as data_mod
    from fedslm.config import load_config
    from fedslm.model import cache_root

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    paths = []
    for k in range(clients):
        recs = data_mod.client_records(cfg.data, cache_root(cfg.model), k, clients).records
        paths.append(out / f"node-{k}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in recs))
    return paths


@pytest.mark.timeout(480)
def test_tls_federation_of_three_authenticated_nodes(tmp_path: Path, processes: Processes) -> None:
    t0 = time.monotonic()
    certs = write_certificates(tmp_path / "certs", 3)
    intruder = tmp_path / "intruder" / "node-9.key"  # a valid key pair, never registered
    write_node_key(intruder, intruder.with_suffix(".pub"))
    data = _node_data(tmp_path, 3)
    link_port, *node_ports = _free_ports(5)
    link = f"127.0.0.1:{link_port}"
    env = deploy_env(FLWR_HOME=str(tmp_path / "flwr-home"), FEDSLM_LOG="INFO")

    server = processes.start(
        "server", [FEDSLM, "server", "--certs", str(certs.root), "--address", link, "--connection", "t"], env
    )
    _wait(
        "the SuperLink to start and register the 3 node keys",
        lambda: server.poll() is not None or processes.log("server").count("as SuperNode") == 3,
        timeout=60,
        interval=0.2,
    )
    assert server.poll() is None, processes.log("server")[-3000:]

    def node(name: str, key: Path, data_file: Path, port: int) -> subprocess.Popen[bytes]:
        argv = [FEDSLM, "node", "--certs", str(certs.root), "--key", str(key), "--data", str(data_file)]
        argv += ["--superlink", link, "--runtime-port", str(port), "--state-dir", str(tmp_path / "state")]
        return processes.start(name, argv, env)

    nodes = [node(f"node-{k}", certs.node_key(k), data[k], node_ports[k]) for k in range(3)]
    stranger = node("intruder", intruder, data[0], node_ports[3])
    _wait("3 nodes online", lambda: sum(n["status"] == "online" for n in _nodes_or_empty(env)) == 3, timeout=60)
    assert all(n.poll() is None for n in nodes)

    # the unregistered node is refused by the SuperLink and gives up; it never joins
    _wait("the unregistered node to exit", lambda: stranger.poll() is not None, timeout=60, interval=0.5)
    assert stranger.returncode != 0
    assert "Failed to activate SuperNode" in processes.log("intruder"), processes.log("intruder")[-2000:]
    assert "No SuperNode found with the given public key" in processes.log("server")
    assert len(_nodes_or_empty(env)) == 3
    t_ready = time.monotonic() - t0

    # 3 rounds; node 2 is killed as round 2 starts: the SuperLink answers for it with an error once its
    # heartbeat lapses (Flower: 2 x 30 s at most), round 2 goes on with the 2 others (min_train_clients=2),
    # and round 3 samples only the 2 nodes still online
    out = tmp_path / "run"
    overrides = ["federation.num_clients=3", "federation.num_rounds=3", "train.local_steps=1"]
    run = [FEDSLM, "run", "configs/tiny.yaml", "--connection", "t", "--out", str(out), "--app", str(ROOT)]
    for o in overrides:
        run += ["--set", o]
    submit = processes.start("run", run, env)
    metrics = out / "metrics.jsonl"

    def rows() -> list[dict[str, object]]:
        return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []

    _wait("round 1", lambda: submit.poll() is not None or len(rows()) >= 2, timeout=120, interval=0.2)
    assert submit.poll() is None and [r["round"] for r in rows()] == [0, 1], processes.log("run")[-3000:]
    processes.kill(nodes[2])
    _wait("the run to end", lambda: submit.poll() is not None, timeout=200, interval=1.0)
    assert submit.returncode == 0, processes.log("run")[-3000:] + processes.log("server")[-3000:]
    got = rows()
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    assert [r["clients"] for r in got[1:]] == [3, 2, 2], (got, processes.log("run")[-6000:])
    assert [r["failed"] for r in got[1:]] == [0, 1, 0] and not any(r["skipped"] for r in got)
    assert got[3]["eval_loss"] < got[0]["eval_loss"]
    # each node's resident worker loaded the base model once and served every round's message
    assert [r["model_loads_max"] for r in got[1:]] == [1, 1, 1]
    assert [r["process_messages_min"] for r in got[1:]] == [1, 2, 3], got
    assert all(processes.log(f"node-{k}").count("resident worker listening") == 1 for k in range(3))
    assert (out / "adapters" / "round-003" / "adapter_config.json").is_file()
    assert nodes[0].poll() is None and nodes[1].poll() is None
    took = time.monotonic() - t0 - t_ready
    print(f"deploy: ready in {t_ready:.1f} s, run (a node killed in round 2) in {took:.1f} s")


def _nodes_or_empty(env: dict[str, str]) -> list[dict[str, object]]:
    try:
        return list_nodes("t", env, timeout=30)
    except (DeployError, subprocess.TimeoutExpired):
        return []


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(run: Path) -> list[dict[str, object]]:
    metrics = run / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


def _running_runs(env: dict[str, str]) -> list[int]:
    proc = subprocess.run(
        [str(Path(FEDSLM).with_name("flwr")), "ls", "t", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    runs = json.loads(proc.stdout[proc.stdout.find("{") :]).get("runs", []) if "{" in proc.stdout else []
    return [int(r["run-id"]) for r in runs if str(r.get("status", "")).startswith("running")]


@pytest.mark.timeout(900)
def test_superlink_and_serverapp_killed_in_round_two_resume_to_the_same_adapter(
    tmp_path: Path, processes: Processes
) -> None:
    """TLS, node authentication, 3 SuperNodes, local DP: one run goes through uninterrupted; a second,
    with the same seed, loses its SuperLink and ServerApp to SIGKILL as round 2 starts. The SuperLink
    is restarted on the same port, certificates and --database (the SuperNodes keep running and
    reconnect), and `fedslm run --resume` ends it with the same adapter, bit for bit, and the clients'
    epsilon continued from their ledgers (a reset one would be lower: 1 round's worth instead of 2)."""
    t0 = time.monotonic()
    certs = write_certificates(tmp_path / "certs", 3)
    data = _node_data(tmp_path, 3)
    link_port, *node_ports = _free_ports(4)
    link = f"127.0.0.1:{link_port}"
    env = deploy_env(FLWR_HOME=str(tmp_path / "flwr-home"), FEDSLM_LOG="INFO")
    server_argv = [FEDSLM, "server", "--certs", str(certs.root), "--address", link, "--connection", "t"]
    server_argv += ["--database", str(tmp_path / "superlink.db")]

    def start_server(name: str) -> subprocess.Popen[bytes]:
        proc = processes.start(name, server_argv, env)
        _wait("the SuperLink", lambda: proc.poll() is not None or "SuperLink up on" in processes.log(name), 90, 0.2)
        assert proc.poll() is None, processes.log(name)[-3000:]
        return proc

    server = start_server("server")
    nodes = []
    for k in range(3):
        argv = [FEDSLM, "node", "--certs", str(certs.root), "--key", str(certs.node_key(k)), "--data", str(data[k])]
        argv += ["--superlink", link, "--runtime-port", str(node_ports[k]), "--state-dir", str(tmp_path / "state")]
        nodes.append(processes.start(f"node-{k}", argv, env))
    _wait("3 nodes online", lambda: sum(n["status"] == "online" for n in _nodes_or_empty(env)) == 3, timeout=90)
    t_ready = time.monotonic() - t0

    sets = ["federation.num_clients=3", "federation.num_rounds=2", "train.local_steps=1", "privacy.mode=local"]
    submit = [FEDSLM, "run", "configs/tiny.yaml", "--connection", "t", "--app", str(ROOT)]
    submit += [a for s in sets for a in ("--set", s)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run = processes.start("run-whole", [*submit, "--out", str(whole)], env)
    _wait("the uninterrupted run", lambda: run.poll() is not None, timeout=300)
    assert run.returncode == 0 and (whole / "summary.json").is_file(), processes.log("run-whole")[-4000:]
    t_whole = time.monotonic() - t0 - t_ready

    # the second run: SuperLink, SuperExec and ServerApp (all below `fedslm server`) and the submitting
    # `flwr run` are killed as soon as round 1's checkpoint is on disk: the ServerApp is in round 2
    run = processes.start("run-killed", [*submit, "--out", str(killed)], env)
    done = killed / "checkpoints" / "round-001"
    _wait("round 1 of the second run", lambda: run.poll() is not None or done.is_dir(), timeout=300, interval=0.02)
    victims = {pid: _cmdline(pid) for pid in {server.pid, *_descendants(server.pid)}}
    exited = run.poll()  # None: the submitter was still waiting on round 2
    processes.kill(server)
    processes.kill(run)
    # the ServerApp was among them (else: what the submitter and the server had said, for the race seen once)
    why = f"{victims}\nrun exit {exited}, round 1 checkpoint {done.is_dir()}\n" + processes.log("run-killed")[-1500:]
    assert any("flwr-serverapp" in c for c in victims.values()), why + processes.log("server")[-1500:]
    assert any("flower-superlink" in c for c in victims.values()), victims
    assert not (killed / "summary.json").exists() and [r["round"] for r in _rows(killed)][:2] == [0, 1]
    assert all(n.poll() is None for n in nodes)  # the SuperNodes stay up, retrying the SuperLink

    # restart on the same port, certificates and database: the nodes' registrations are kept
    t_kill = time.monotonic()
    start_server("server-2")
    assert "already registered" in processes.log("server-2")
    stale = json.loads((killed / "run.json").read_text())["flower_runs"]
    assert len(stale) == 1
    _wait("3 nodes back online", lambda: sum(n["status"] == "online" for n in _nodes_or_empty(env)) == 3, 120)
    resumed = processes.start("run-resumed", [FEDSLM, "run", "--resume", str(killed), "--connection", "t"], env)
    _wait("the resumed run", lambda: resumed.poll() is not None, timeout=300)
    assert resumed.returncode == 0, processes.log("run-resumed")[-4000:]
    # the dead run survives in the database as running until Flower expires it (its ServerApp's
    # heartbeat lapses, ~30-60 s): `fedslm run --resume` stopped it first, unless Flower already had
    log = processes.log("run-resumed")
    assert f"stopped Flower run {stale[0]}" in log or f"Flower run {stale[0]}, which last worked" in log, log[-3000:]
    assert _running_runs(env) == [] and len(json.loads((killed / "run.json").read_text())["flower_runs"]) == 2
    assert (killed / "summary.json").is_file(), processes.log("run-resumed")[-4000:]
    t_resume = time.monotonic() - t_kill
    run_log = (killed / "run.log").read_text()  # both ServerApp sessions appended their lines
    assert "---- round 2/2 ----" in run_log and "resumed from" in run_log and "Federation finished" in run_log

    got, want = _rows(killed), _rows(whole)
    assert [r["round"] for r in got] == [0, 1, 2] and [r["clients"] for r in got[1:]] == [3, 3]
    final = Path("adapters") / "round-002" / "adapter_model.safetensors"
    assert _sha256(killed / final) == _sha256(whole / final)  # bit for bit
    eps = [r["epsilon_max"] for r in got]
    assert eps[1:] == [r["epsilon_max"] for r in want[1:]] and eps[1] < eps[2], (eps, want)
    clients = json.loads((killed / "summary.json").read_text())["privacy"]["clients"]
    assert clients == json.loads((whole / "summary.json").read_text())["privacy"]["clients"]
    assert sorted(clients) == ["0", "1", "2"]
    # round 2 was trained twice on every node (the uninterrupted run, the resumed one), never by the
    # killed run: the kill came before its round-2 messages reached a node
    assert [processes.log(f"node-{k}").count(f"client {k} round 2:") for k in range(3)] == [2, 2, 2]
    print(
        f"deploy resume: ready {t_ready:.1f} s, uninterrupted run {t_whole:.1f} s,"
        f" restart + resume {t_resume:.1f} s, epsilon per round {eps[1:]},"
        f" dead run stopped by --resume: {'stopped Flower run' in log}"
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
