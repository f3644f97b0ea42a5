"""``fedslm simulate --ray-address``: a tiny federation attached to a Ray cluster started here on loopback
(``ray start --head``), as one would across machines; only that cluster is stopped afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedslm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A 2-CPU Ray head on 127.0.0.1 in its own session and temp dir; killed (that group only) at the end."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fr", dir="/tmp")  # Ray's socket paths must stay short
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # workers import this tree
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=pythonpath)
    cmd = [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}",
           "--disable-usage-stats"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not come up: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the head's own process group: no other Ray on the machine
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_attaches_to_a_running_ray_cluster(tmp_path: Path, ray_cluster: str) -> None:
    import ray
    from fedslm.simulation.run import ray_backend_config, simulate

    overrides = [f"federation.ray_address={ray_cluster}", "federation.backend=ray", "federation.num_rounds=1"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    assert ray_backend_config(cfg)["init_args"]["address"] == ray_cluster
    rows = simulate(cfg, tmp_path / "run", progress=False)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 4
    assert (tmp_path / "run" / "summary.json").is_file()
    # the cluster's own record: the federation was a driver (job) of this head, now finished
    ray.init(address=ray_cluster, logging_level="warning")
    try:
        jobs = ray._private.state.state.job_table()
        resources = ray.cluster_resources()
    finally:
        ray.shutdown()
    assert resources.get("CPU") == 2.0  # the head started above (--num-cpus=2) is still the one answering
    finished = [j for j in jobs if j["IsDead"]]
    assert len(finished) >= 1, jobs  # the simulation's driver, which ran the 4 clients on this cluster
