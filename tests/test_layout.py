"""The package's shape: backends behind runtime.py, neither importing the other, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "deploy_agent"


def imports_of(path: Path) -> set[str]:
    """The deploy_agent modules a file imports (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deploy_agent"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("deploy_agent"))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


class TestBoundaries:
    """Each rule of the layout, checked on the source."""

    def test_nothing_above_the_runtime_imports_a_backend(self) -> None:
        for module, imported in MODULES.items():
            if module.startswith("deploy_agent.backends"):
                continue
            reached = {name for name in imported if name.startswith("deploy_agent.backends")}
            wiring = module == "deploy_agent.app"
            allowed = {"deploy_agent.backends", "deploy_agent.backends.build"} if wiring else set()
            assert reached <= allowed, (module, reached)

    def test_no_backend_imports_the_other(self) -> None:
        for mine, other in (("docker", "swarm"), ("swarm", "docker")):
            for module, imported in MODULES.items():
                if module.startswith(f"deploy_agent.backends.{mine}"):
                    assert not {n for n in imported if n.startswith(f"deploy_agent.backends.{other}")}, module

    def test_no_private_names_cross_modules(self) -> None:
        for module, imported in MODULES.items():
            private = {name for name in imported if name.rsplit(".", 1)[-1].startswith("_")
                       and not name.endswith("__version__")}
            assert not private, (module, private)

    def test_no_import_cycles(self) -> None:
        graph = {m: {i for i in imported if i in MODULES and i != m} for m, imported in MODULES.items()}
        done: set[str] = set()

        def visit(module: str, path: tuple[str, ...]) -> None:
            assert module not in path, " -> ".join((*path, module))
            if module in done:
                return
            for target in graph[module]:
                visit(target, (*path, module))
            done.add(module)

        for module in graph:
            visit(module, ())
