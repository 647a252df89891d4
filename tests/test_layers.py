"""The packages' arrows point one way: cli → services (bridge, consumer) → core (gitfaas).

Read from the source with `ast`, so an import inside a function counts as much as one at the top:
a lazy import still makes the module depend on what it imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"gitfaas": 0, "bridge": 1, "consumer": 1, "cli": 2}


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in LAYERS for path in (ROOT / package).rglob("*.py")}


def test_no_package_imports_a_layer_above_or_beside_it() -> None:
    wrong = []
    for module, path in project_modules().items():
        own = module.split(".")[0]
        for imported in imports_of(path):
            other = imported.split(".")[0]
            if other in LAYERS and other != own and LAYERS[other] >= LAYERS[own]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_no_import_cycles_between_project_modules() -> None:
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = {name for name in imports_of(path) if name in modules and name != module}
        # Importing a module runs its package's __init__ first, so that counts as an edge too.
        targets |= {parent for parent in (".".join(name.split(".")[:i]) for name in targets
                                           for i in range(1, name.count(".") + 1))
                    if parent in modules and parent != module and not module.startswith(parent + ".")}
        graph[module] = targets

    cycles = []
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(" → ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
