"""The house rules, kept true: one import namespace, layers that point one way, no import cycles.

Every ``import`` in the package counts, lazy ones inside functions too: a cycle that only closes at
run time is still a cycle a newcomer has to untangle.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder -> the subpackage it is installed as
FOLDERS = {
    "fedslm": "fedslm",
    "strategies": "fedslm.strategies",
    "server": "fedslm.server",
    "client": "fedslm.client",
    "simulation": "fedslm.simulation",
}
# layer -> the layers it may import
ALLOWED = {
    "core": {"core"},
    "strategies": {"core", "strategies"},
    "server": {"core", "strategies", "server"},
    "client": {"core", "client"},
    "simulation": {"core", "strategies", "server", "client", "simulation"},
}
OLD_TOP_LEVEL = ("slm", "server", "client", "strategies", "simulation")


def _modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((root / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


MODULES = _modules()


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else "core"


def _imports(module: str, path: Path, modules: dict[str, Path] = MODULES) -> set[str]:
    """Modules of ours that ``module`` imports (absolute and relative, at any depth of the file)."""
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for name in names:
            # the longest known module the name starts with (``from fedslm import config`` -> fedslm.config)
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module and name != "fedslm":
                found.add(name)
    return found


def graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def violations(graph: dict[str, set[str]], module: str) -> list[str]:
    return sorted(m for m in graph[module] if layer(m) not in ALLOWED[layer(module)])


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


GRAPH = graph(MODULES)


def test_the_package_is_found() -> None:
    assert len(MODULES) > 50 and "fedslm.server.federation" in MODULES and "fedslm.config" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_point_one_way(module: str) -> None:
    bad = violations(GRAPH, module)
    may = sorted(ALLOWED[layer(module)])
    assert not bad, f"{module} ({layer(module)}) imports {bad}; {layer(module)} may import {may}"


def test_no_module_imports_the_old_top_level_names() -> None:
    offenders = []
    for path in [*MODULES.values(), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                tops = [node.module.split(".")[0]]
            else:
                continue
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {t}" for t in tops if t in OLD_TOP_LEVEL]
    assert not offenders, offenders


def test_no_import_cycles() -> None:
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_finds_a_planted_violation_and_cycle(tmp_path: Path) -> None:
    """The same checker on a synthetic tree: a client importing the server, a lazy core cycle."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "fedslm" / "a.py").write_text("def f():\n    from . import b\n")
    (tmp_path / "fedslm" / "b.py").write_text("from fedslm.a import f\n")
    (tmp_path / "server" / "deploy.py").write_text("from fedslm import a\n")
    (tmp_path / "client" / "node.py").write_text("from fedslm.server.deploy import x\nfrom fedslm import b\n")
    (tmp_path / "strategies" / "s.py").write_text("from .. import config\nfrom fedslm.a import f\n")
    g = graph(_modules(tmp_path))
    assert g["fedslm.client.node"] == {"fedslm.server.deploy", "fedslm.b"}
    assert violations(g, "fedslm.client.node") == ["fedslm.server.deploy"]
    assert violations(g, "fedslm.server.deploy") == [] and violations(g, "fedslm.strategies.s") == []
    assert find_cycles(g) == [["fedslm.a", "fedslm.b", "fedslm.a"]]


def test_the_distribution_installs_one_import_package() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"fedslm"}
    assert set(project["tool"]["setuptools"]["package-dir"].values()) == set(FOLDERS)
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedslm.server.app:app", "clientapp": "fedslm.client.app:app"}
    assert project["project"]["scripts"]["fedslm"] == "fedslm.simulation.cli:console_main"


CLIENT_READS_ITS_CONFIG = """
import json, sys
from pathlib import Path
from fedslm.client import app, runner, secagg  # the ClientApps and what they run
from fedslm.config import load_config
from fedslm.protocol import TrainInstructions
cfg = load_config(Path(sys.argv[1]) / "configs" / "tiny.yaml")
config = TrainInstructions(cfg.to_yaml(), "run", 3).to_record()
client = runner.ClientRunner.from_config(config, {"partition-id": 1, "num-partitions": 4, "state-dir": sys.argv[2]})
ours = sorted(m for m in sys.modules if m.startswith(("fedslm.strategies", "fedslm.server", "fedslm.simulation")))
print(json.dumps({"client": client.client_id, "round": client.server_round, "imported": ours}))
"""


def test_a_client_reads_its_config_without_importing_server_strategies(tmp_path: Path) -> None:
    """A client process builds its runner from the server's train config without importing any
    strategy or server module (checked in a fresh interpreter, through ``sys.modules``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_READS_ITS_CONFIG, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"client": 1, "round": 3, "imported": []}
