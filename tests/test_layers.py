"""The layers, from the source: who may import whom, and no import cycles (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "engines", "export", "calibration")
# What each layer may import of the project (besides itself): the runtime is the bottom, needed by everyone.
ALLOWED = {"runtime": set(), "engines": {"runtime"}, "export": {"runtime"}, "calibration": {"runtime", "export"}}
NEVER_IN_RUNTIME = {"torch", "transformers", "export", "engines", "calibration"}
# Inside the runtime, three rooms, each importing only the rooms below it: the bundle contract, the inference core,
# the front-ends. `python -m runtime` (runtime.__main__) is the front door, so it sits with the front-ends.
ROOMS = {"runtime.contract": set(), "runtime.core": {"runtime.contract"},
         "runtime.frontends": {"runtime.contract", "runtime.core"}}


def room(module: str) -> str:
    if module in ("runtime", "runtime.__main__"):
        return "runtime.frontends"
    return ".".join(module.split(".")[:2])


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it, absolute names (relative imports resolved)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return out


def project_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {i for i in imports(name, path) if i in mods and i != name} for name, path in mods.items()}


def test_runtime_imports_no_higher_layer_and_no_torch():
    bad = {}
    for name, path in modules().items():
        if name.split(".")[0] == "runtime":
            if hits := {i for i in imports(name, path) if i.split(".")[0] in NEVER_IN_RUNTIME}:
                bad[name] = sorted(hits)
    assert bad == {}, bad


def test_no_import_against_the_layers():
    bad = {}
    for name, deps in project_graph().items():
        layer = name.split(".")[0]
        if wrong := {d for d in deps if d.split(".")[0] not in ALLOWED[layer] | {layer}}:
            bad[name] = sorted(wrong)
    assert bad == {}, bad


def test_runtime_rooms_import_only_the_rooms_below():
    bad = {}
    for name, deps in project_graph().items():
        if name.split(".")[0] == "runtime":
            allowed = ROOMS[room(name)] | {room(name)}
            if wrong := {d for d in deps if d.split(".")[0] == "runtime" and room(d) not in allowed}:
                bad[name] = sorted(wrong)
    assert bad == {}, bad


def test_every_runtime_module_is_in_a_room():
    assert {room(name) for name in modules() if name.split(".")[0] == "runtime"} == set(ROOMS)


def test_no_import_cycles():
    graph, cycles, state = project_graph(), [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == [], cycles


def test_the_checker_sees_lazy_imports():
    """The checks above would pass vacuously if function-level imports were missed: one is known to exist."""
    assert "runtime.core.backend_trt" in project_graph()["runtime.core.backend"]
