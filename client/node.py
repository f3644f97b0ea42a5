"""A real node: ``flower-supernode`` over TLS, authenticated by its own key, its data path in the node config.

The node config carries ``data-path`` (read by ``client/runner.py``: all of that file is this node's
private data; it is read on the node and never sent), ``client-id``, ``state-dir`` (DP accountant
history, FedSA's local B) and, if given, ``profile``: the name of one of the run config's
``clients.profiles`` (e.g. ``phone``, ``hospital``), which ``client/runner.py`` applies instead of
the profile the run would assign to this client id.

Flower 1.42 runs every message (train, evaluate) of a run in a fresh ``flwr-clientapp`` process in
both isolation modes (``process`` isolation only adds a separately managed ``flower-superexec``; each
of its ClientApp processes still serves one task and exits). So ``fedslm node`` also starts the
node's resident worker (``client/resident.py``) and names its socket in the node config
(``resident-socket``): the short-lived ClientApp processes hand their messages to it, and the base
model is loaded once per node, not once per message. ``subprocess`` isolation is used.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from fedslm.deploy import DEFAULT_SUPERLINK, DeployError, split_address, stop_process, tool
from fedslm.logs import get_logger
from fedslm.protocol import NodeConfig

log = get_logger(__name__)

PROFILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
RUNTIME_PORT_BASE = 9094  # Flower's SuperNode Runtime API port; node K listens on 9094 + K by default
ISOLATION = "subprocess"


@dataclass(frozen=True)
class NodeSpec:
    """What ``fedslm node`` needs to start one SuperNode."""

    key: Path | None  # the node's OpenSSH EC private key (None only with insecure)
    data: Path  # this node's private data file (.jsonl/.csv/.parquet with the config's columns)
    client_id: int
    root_certificates: Path | None = None  # the CA certificate that signed the SuperLink's certificate
    superlink: str = DEFAULT_SUPERLINK
    profile: str = ""  # a name in the run config's clients.profiles ("" = the one the run assigns)
    state_dir: Path | None = None  # default: <fedslm cache>/node-state
    runtime_port: int | None = None  # default: RUNTIME_PORT_BASE + client_id
    insecure: bool = False
    resident: bool = True  # keep the base model loaded in a resident worker between messages
    device: str = ""  # this node's model.device (auto | cpu | cuda | cuda:N; "" = the run config's)

    def __post_init__(self) -> None:
        if self.device:
            from fedslm.hardware import HardwareError, resolve_device

            try:  # a GPU hospital and a CPU phone in one federation: each node says what it has
                resolve_device(self.device, key="--device")
            except HardwareError as e:
                raise DeployError(str(e)) from None
        if self.profile and PROFILE_NAME.fullmatch(self.profile) is None:
            raise DeployError(f"--profile {self.profile!r}: a profile name of the run config's clients.profiles")
        if self.client_id < 0:
            raise DeployError(f"--client-id {self.client_id}: must be >= 0")
        split_address(self.superlink)

    @property
    def port(self) -> int:
        return self.runtime_port if self.runtime_port is not None else RUNTIME_PORT_BASE + self.client_id

    @property
    def state(self) -> Path:
        if self.state_dir is None:
            from fedslm.model import cache_root  # imports torch: only when the default is needed

            return (cache_root() / "node-state").resolve()
        return self.state_dir.expanduser().resolve()

    @property
    def resident_socket(self) -> Path:
        from .resident import socket_path

        return socket_path(self.port)


def client_id_from_key(key: Path) -> int:
    """``node-K.key`` (as ``fedslm certs`` names it) -> K."""
    match = re.fullmatch(r"node-(\d+)\.key", Path(key).name)
    if match is None:
        raise DeployError(f"cannot tell the client id from {Path(key).name!r}; pass --client-id K")
    return int(match.group(1))


def node_config(spec: NodeSpec) -> str:
    """The ``--node-config`` string: TOML values, space-separated (strings quoted)."""
    values = NodeConfig(
        client_id=spec.client_id,
        data_path=str(Path(spec.data).expanduser().resolve()),
        state_dir=str(spec.state),
        profile=spec.profile,
        device=spec.device,
        resident_socket=str(spec.resident_socket) if spec.resident else "",
    ).to_record()
    for key, value in values.items():
        if isinstance(value, str) and '"' in value:
            raise DeployError(f"node config {key}={value!r}: a double quote cannot be passed to Flower")
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def supernode_argv(spec: NodeSpec) -> list[str]:
    """``flower-supernode`` for ``spec``: TLS to the SuperLink, key authentication, no dependency installs."""
    argv = [tool("flower-supernode"), "--superlink", spec.superlink]
    if spec.insecure:
        log.warning(
            "INSECURE SuperNode: no TLS; this node's updates and the global adapter travel unencrypted "
            "and the SuperLink is not verified. Use only for a local test; drop --insecure otherwise."
        )
        argv.append("--insecure")
    else:
        if spec.root_certificates is None:
            raise DeployError("a SuperNode needs the CA certificate (--certs DIR), or --insecure for a local test")
        argv += ["--root-certificates", str(spec.root_certificates)]
    if spec.key is not None:
        argv += ["--auth-supernode-private-key", str(spec.key)]
    elif not spec.insecure:
        raise DeployError("a SuperNode needs its private key (--key nodes/node-K.key from `fedslm certs`)")
    # Flower's SuperNode default already leaves runtime dependency installation off; it is never enabled here.
    return [
        *argv,
        "--isolation",
        ISOLATION,
        "--host",
        "127.0.0.1",  # the Runtime API is for this node's own ClientApp processes only
        "--port",
        str(spec.port),
        "--node-config",
        node_config(spec),
    ]


def check_node_files(spec: NodeSpec) -> None:
    """Fail before starting anything when a file the node needs is missing."""
    for label, path in (("--data", spec.data), ("--key", spec.key), ("CA certificate", spec.root_certificates)):
        if path is not None and not Path(path).expanduser().is_file():
            raise DeployError(f"{label} {path}: no such file")


def resident_argv(spec: NodeSpec) -> list[str]:
    return [sys.executable, "-m", "fedslm.client.resident", "--socket", str(spec.resident_socket)]


@contextlib.contextmanager
def resident_worker(spec: NodeSpec, env: Mapping[str, str], timeout: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """The node's resident worker, listening on ``spec.resident_socket`` while the block runs."""
    from .resident import wait_until_listening

    log.info("starting the resident worker: %s", " ".join(resident_argv(spec)))
    worker = subprocess.Popen(resident_argv(spec), env=dict(env))
    try:
        wait_until_listening(spec.resident_socket, alive=lambda: worker.poll() is None, timeout=timeout)
        yield worker
    finally:
        stop_process(worker)
