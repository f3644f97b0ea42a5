"""Device and compute-dtype resolution: a table of machines, faked where the hardware is absent."""

from __future__ import annotations

import time

import pytest
import torch

from fedslm.config import ConfigError, ModelConfig, load_config
from fedslm.hardware import CpuInfo, CudaInfo, HardwareError, resolve_compute_dtype, resolve_device
from fedslm.model import check_run_hardware, resolve_hardware

AVX2 = CpuInfo("AVX2", frozenset({"avx2", "fma"}))
AVX512_NO_BF16 = CpuInfo("AVX512", frozenset({"avx2", "avx512f", "avx512bw"}))
AVX512_BF16 = CpuInfo("AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE = CpuInfo("AVX512", frozenset({"avx512f", "amx_bf16", "amx_tile"}))
SAPPHIRE_CAPPED = CpuInfo("AVX2", SAPPHIRE.flags)  # ATEN_CPU_CAPABILITY=avx2: torch's AVX2 kernels, bf16 emulated
NO_CUDA = CudaInfo(False)
T4 = CudaInfo(True, 1, (7, 5), "Tesla T4")
A100 = CudaInfo(True, 1, (8, 0), "A100")
H200 = CudaInfo(True, 2, (9, 0), "H200")


@pytest.mark.parametrize(
    ("requested", "device", "cpu", "cuda", "expected"),
    [
        # auto: bf16 only where the hardware computes it natively
        ("auto", "cpu", AVX2, NO_CUDA, "float32"),
        ("auto", "cpu", AVX512_NO_BF16, NO_CUDA, "float32"),
        ("auto", "cpu", AVX512_BF16, NO_CUDA, "bfloat16"),
        ("auto", "cpu", SAPPHIRE, NO_CUDA, "bfloat16"),
        ("auto", "cpu", SAPPHIRE_CAPPED, NO_CUDA, "float32"),
        ("auto", "cuda", AVX2, T4, "float16"),
        ("auto", "cuda", AVX2, A100, "bfloat16"),
        ("auto", "cuda:1", AVX2, H200, "bfloat16"),
        # an explicit value wins
        ("bfloat16", "cpu", AVX2, NO_CUDA, "bfloat16"),
        ("float32", "cpu", SAPPHIRE, NO_CUDA, "float32"),
        ("float32", "cuda", AVX2, A100, "float32"),
        ("float16", "cuda", AVX2, A100, "float16"),
        ("bfloat16", "cuda", AVX2, T4, "bfloat16"),
    ],
)
def test_compute_dtype_resolution(requested: str, device: str, cpu: CpuInfo, cuda: CudaInfo, expected: str) -> None:
    assert resolve_compute_dtype(requested, device, cpu=cpu, cuda=cuda) == expected


def test_float16_on_a_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(HardwareError, match=r"model.compute_dtype: float16 on a CPU is refused \(no native fp16"):
        resolve_compute_dtype("float16", "cpu", cpu=SAPPHIRE, cuda=NO_CUDA)


@pytest.mark.parametrize(
    ("requested", "cuda", "expected"),
    [
        ("auto", NO_CUDA, "cpu"),
        ("auto", A100, "cuda"),
        ("cpu", A100, "cpu"),
        ("cuda", A100, "cuda"),
        ("cuda:1", H200, "cuda:1"),
    ],
)
def test_device_resolution(requested: str, cuda: CudaInfo, expected: str) -> None:
    assert resolve_device(requested, cuda=cuda) == expected


@pytest.mark.parametrize(
    ("requested", "cuda", "message"),
    [
        ("cuda", NO_CUDA, "model.device: 'cuda' asked for, but torch finds no CUDA device"),
        ("cuda:2", H200, "model.device: 'cuda:2' asked for, but this machine has 2 CUDA device"),
        ("gpu", A100, "model.device: 'gpu' is not one of auto | cpu | cuda | cuda:N"),
    ],
)
def test_unavailable_device_names_the_key(requested: str, cuda: CudaInfo, message: str) -> None:
    with pytest.raises(HardwareError, match=message):
        resolve_device(requested, cuda=cuda)


def test_this_machine_resolves_to_what_its_cpu_has() -> None:
    from fedslm.hardware import probe_cpu

    resolved = resolve_hardware(ModelConfig())
    if torch.cuda.is_available():
        assert resolved.device == "cuda"
    else:
        assert resolved.device == "cpu"
        assert resolved.compute_dtype == ("bfloat16" if probe_cpu().native_bf16 else "float32")
    assert resolve_hardware(ModelConfig(compute_dtype="float32", device="cpu")).compute_dtype == "float32"


def test_model_device_is_checked_at_load_of_the_config() -> None:
    with pytest.raises(ConfigError, match=r"model.device: 'tpu' not one of auto \| cpu \| cuda \| cuda:N"):
        ModelConfig(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.device=cuda", "model.device: 'cuda' asked for, but torch finds no CUDA device"),
        ("federation.client_gpus=0.25", "federation.client_gpus: 0.25 needs a CUDA device"),
        ("model.compute_dtype=float16", "model.compute_dtype: float16 on a CPU is refused"),
    ],
)
def test_check_refuses_hardware_this_machine_lacks(override: str, message: str) -> None:
    cfg = load_config("configs/tiny.yaml", [override, "federation.backend=ray"])
    with pytest.raises(ConfigError, match=message):
        check_run_hardware(cfg)


def test_unreachable_ray_address_fails_within_seconds() -> None:
    import socket

    from fedslm.simulation.run import SimulationError, ray_backend_config

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config("configs/tiny.yaml", [f"federation.ray_address=127.0.0.1:{port}", "federation.backend=ray"])
    t0 = time.perf_counter()
    with pytest.raises(SimulationError, match=rf"federation.ray_address: nothing answers at 127.0.0.1:{port}"):
        ray_backend_config(cfg)
    assert time.perf_counter() - t0 < 5.0


def test_client_resources_follow_the_config() -> None:
    from fedslm.simulation.run import ray_backend_config

    cfg = load_config(
        "configs/tiny.yaml", ["federation.client_cpus=1", "federation.client_gpus=0.25", "federation.backend=ray"]
    )
    backend = ray_backend_config(cfg)
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}
    assert "address" not in backend["init_args"]


@pytest.mark.parametrize(
    ("requested", "device", "at_once", "cuda", "expected"),
    [
        ("auto", "cpu", 4, NO_CUDA, 0.0),  # nothing to share
        ("auto", "cuda", 4, A100, 0.25),  # four clients at once on one GPU
        ("auto", "cuda", 1, A100, 1.0),
        ("auto", "cuda", 4, H200, 0.5),  # two GPUs: Ray packs two clients on each
        ("auto", "cuda", 1, H200, 1.0),  # never more than one GPU per client
        ("auto", "cuda", 3, H200, 0.5),  # not 0.667: that fits one client per GPU, and the third waits its turn
        ("auto", "cuda", 6, A100, 0.1666),  # not 0.1667: six of those would exceed one GPU
        ("auto", "cuda", 3, A100, 0.3333),
        (0.125, "cuda", 4, A100, 0.125),  # an explicit share is used as given
        (0.0, "cpu", 4, A100, 0.0),
    ],
)
def test_client_gpu_share_resolution(
    requested: float | str, device: str, at_once: int, cuda: CudaInfo, expected: float
) -> None:
    from fedslm.hardware import resolve_client_gpus

    assert resolve_client_gpus(requested, device, at_once, cuda=cuda) == expected


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8])
def test_auto_gpu_shares_fit_every_client_that_runs_at_once(gpus: int) -> None:
    """Ray packs shares in units of 1e-4 per GPU: every client of a wave must find room, or its actor
    stays pending and the round never ends."""
    from fedslm.hardware import resolve_client_gpus

    for at_once in range(1, 33):
        share = resolve_client_gpus("auto", "cuda", at_once, cuda=CudaInfo(True, gpus, (9, 0), "H100"))
        units = round(share * 1e4)
        assert abs(units - share * 1e4) < 1e-6, (at_once, share)  # no rounding left to Ray
        assert gpus * (10_000 // units) >= at_once, (at_once, share)


def test_a_numbered_gpu_is_refused_for_ray_clients_on_several_gpus() -> None:
    from fedslm.hardware import check_ray_device

    for device in ("cuda:0", "cuda:1"):  # a Ray worker sees only its GPU, as cuda:0
        with pytest.raises(HardwareError, match=rf"model.device: '{device}' cannot hold for clients in Ray workers"):
            check_ray_device(device, cuda=H200)
    check_ray_device("cuda", cuda=H200)
    check_ray_device("cuda:0", cuda=A100)  # the only GPU: cuda:0 in every worker too


def test_a_gpu_share_on_a_ray_cluster_does_not_need_a_gpu_on_the_head() -> None:
    """The cluster's workers may hold GPUs the head (where `fedslm simulate` runs) lacks."""
    from fedslm.hardware import resolve_client_gpus

    assert resolve_client_gpus(0.25, "cpu", 4, cuda=NO_CUDA, cluster=True) == 0.25
    assert resolve_client_gpus("auto", "cpu", 4, cuda=NO_CUDA, cluster=True) == 0.0  # auto counts the head's
    for cluster in (False, True):  # a head with a GPU, its clients on CUDA: the share as given
        assert resolve_client_gpus(0.5, "cuda", 4, cuda=A100, cluster=cluster) == 0.5
    if not torch.cuda.is_available():
        share = ["federation.backend=ray", "federation.client_gpus=0.25"]
        check_run_hardware(load_config("configs/tiny.yaml", [*share, "federation.ray_address=10.0.0.1:6379"]))
        with pytest.raises(ConfigError, match="federation.client_gpus: 0.25 needs a CUDA device"):
            check_run_hardware(load_config("configs/tiny.yaml", share))  # Ray started here: this machine's GPUs


def test_auto_dtype_on_a_ray_cluster_warns_that_workers_resolve_their_own(fedslm_log: pytest.LogCaptureFixture) -> None:
    """Each worker of a cluster resolves ``auto`` on its own machine; the server (and an export) use
    this machine's: one explicit dtype gives them all one base."""
    cluster = [
        "federation.backend=ray",
        "federation.ray_address=10.0.0.1:6379",
        "model.device=cpu",
        "model.compute_dtype=auto",
    ]
    here = resolve_compute_dtype("auto", "cpu")
    check_run_hardware(load_config("configs/tiny.yaml", cluster))
    # a set: the record comes twice where the fedslm logger still propagates to caplog's own handler
    warned = {r.getMessage() for r in fedslm_log.records if "model.compute_dtype: auto" in r.getMessage()}
    assert len(warned) == 1 and f"({here} here," in warned.pop(), warned
    fedslm_log.clear()
    check_run_hardware(load_config("configs/tiny.yaml", [*cluster, "model.compute_dtype=float32"]))
    check_run_hardware(load_config("configs/tiny.yaml", [*cluster[:1], *cluster[2:]]))  # Ray started here
    assert not [r for r in fedslm_log.records if "compute_dtype" in r.getMessage()]


def test_zero_gpu_share_with_a_cuda_device_is_refused() -> None:
    """Ray hides the GPU from a worker that reserved none: the clients would find no CUDA device."""
    from fedslm.hardware import resolve_client_gpus

    with pytest.raises(HardwareError, match=r"federation.client_gpus: 0 hides the GPU .* model.device 'cuda'"):
        resolve_client_gpus(0.0, "cuda", 4, cuda=A100)
    with pytest.raises(HardwareError, match=r"federation.client_gpus: 0.5 needs a CUDA device"):
        resolve_client_gpus(0.5, "cpu", 4, cuda=NO_CUDA)


def test_clients_at_once_follow_cpus_and_sampling() -> None:
    fed = load_config("configs/tiny.yaml", ["federation.client_cpus=1"]).federation
    assert fed.clients_per_round == 4
    assert fed.clients_at_once(2) == 2  # two 1-CPU clients on 2 cores
    assert fed.clients_at_once(16) == 4  # never more than a round samples
    assert fed.clients_at_once(0.5) == 1


@pytest.mark.parametrize(
    ("overrides", "cpus", "expected"),
    [
        (["federation.backend=auto", "federation.client_cpus=2"], 2, "inprocess"),  # one client at a time
        (["federation.backend=auto", "federation.client_cpus=1"], 2, "ray"),  # two at once on 2 cores
        (["federation.backend=auto", "federation.client_cpus=2"], 16, "ray"),  # four at once
        (["federation.backend=auto", "federation.client_cpus=2", "federation.fraction_train=0.25"], 16, "inprocess"),
        (["federation.backend=auto", "federation.client_cpus=4", "federation.client_gpus=0.5"], 2, "ray"),
        (["federation.backend=auto", "federation.client_cpus=4", "federation.ray_address=10.0.0.1:6379"], 2, "ray"),
        (["federation.backend=ray", "federation.client_cpus=2"], 2, "ray"),  # an explicit choice wins
        (["federation.backend=inprocess", "federation.client_cpus=1"], 16, "inprocess"),
    ],
)
def test_backend_resolution(overrides: list[str], cpus: int, expected: str) -> None:
    fed = load_config("configs/tiny.yaml", ["federation.min_train_clients=1", *overrides]).federation
    assert fed.resolve_backend(cpus) == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "federation.ray_address=10.0.0.1:6379",
            "federation.backend: inprocess runs no Ray: clear federation.ray_address",
        ),
        (
            "federation.client_gpus=0.5",
            r"federation.backend: inprocess clients use model.device whole: clear .*\(0.5\)",
        ),
    ],
)
def test_inprocess_backend_refuses_ray_settings(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", ["federation.backend=inprocess", override])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the scopes on a machine without CUDA")
def test_a_submitting_workstation_does_not_need_the_nodes_gpu() -> None:
    """``fedslm run`` (scope config) only submits: the nodes and the ServerApp resolve their own device."""
    cfg = load_config("configs/tiny.yaml", ["model.device=cuda"])
    check_run_hardware(cfg, "config")  # no CUDA here, and that is fine
    for scope in ("server", "simulation"):  # these evaluate or train here
        with pytest.raises(ConfigError, match="model.device: 'cuda' asked for"):
            check_run_hardware(cfg, scope)
    fp16_cpu = load_config("configs/tiny.yaml", ["model.device=cpu", "model.compute_dtype=float16"])
    with pytest.raises(ConfigError, match="float16 on a CPU is refused"):  # on no machine
        check_run_hardware(fp16_cpu, "config")


def test_auto_gpu_share_is_zero_on_this_cpu_machine() -> None:
    from fedslm.simulation.run import ray_backend_config

    cfg = load_config("configs/tiny.yaml", ["federation.client_cpus=1"])
    assert cfg.federation.client_gpus == "auto"
    expected = 0.0 if not torch.cuda.is_available() else min(1.0, torch.cuda.device_count() / 2)
    assert ray_backend_config(cfg)["client_resources"]["num_gpus"] == expected
