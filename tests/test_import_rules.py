"""The package's import rules (see the README's "Architecture"), checked on the source itself.

Every `import` and `from ... import` in every module counts, including those inside functions:
a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package name (pyproject's package-dir)
FOLDERS = {"edgesplit": "edgesplit", "runtime": "edgesplit.runtime", "device": "edgesplit.device",
           "cloud": "edgesplit.cloud", "transport": "edgesplit.transport", "profiles": "edgesplit.profiles",
           "firmware_configs": "edgesplit.firmware_configs"}
# what each layer may import from the package (prefixes); anything else of edgesplit is refused
ALLOWED = {
    "edgesplit.runtime": ("edgesplit.runtime",),
    "edgesplit.profiles": ("edgesplit.runtime", "edgesplit.profiles"),
    "edgesplit.firmware_configs": ("edgesplit.runtime", "edgesplit.profiles", "edgesplit.firmware_configs"),
    "edgesplit.transport": ("edgesplit.runtime", "edgesplit.profiles", "edgesplit.transport"),
    "edgesplit.device.planning": ("edgesplit.runtime", "edgesplit.profiles", "edgesplit.transport.link",
                                  "edgesplit.device.planning"),
    "edgesplit.device": ("edgesplit.runtime", "edgesplit.profiles", "edgesplit.transport", "edgesplit.device",
                         "edgesplit.firmware_configs"),
    "edgesplit.cloud": ("edgesplit.runtime", "edgesplit.profiles", "edgesplit.transport", "edgesplit.cloud"),
    "edgesplit.harness": ("edgesplit",),
    "edgesplit": ("edgesplit",),
}
HARNESS_USERS = ("edgesplit.harness", "edgesplit.cli", "edgesplit.__main__")


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, pkg in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """The edgesplit modules `name` (defined in `path`) imports, relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    known = modules()
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> str:
    """The most specific key of ALLOWED that `name` belongs to."""
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    raise AssertionError(f"{name} belongs to no layer")


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in modules().items()}


def test_every_module_is_found():
    mods = modules()
    for must in ("edgesplit.runtime.engine", "edgesplit.device.remote", "edgesplit.device.planning.planner",
                 "edgesplit.device.flash.store", "edgesplit.cloud.worker", "edgesplit.harness.simulate"):
        assert must in mods


@pytest.mark.parametrize("name", sorted(modules()))
def test_layer_rules(name):
    layer = layer_of(name)
    bad = sorted(m for m in graph()[name] if not any(m == a or m.startswith(a + ".") for a in ALLOWED[layer]))
    assert not bad, f"{name} ({layer}) imports {bad}; allowed: {ALLOWED[layer]}"


def test_only_the_cli_imports_the_harness():
    bad = sorted((a, b) for a, deps in graph().items() for b in deps
                 if b.startswith("edgesplit.harness") and not a.startswith(HARNESS_USERS))
    assert not bad, f"only the CLI (and the harness itself) may import the harness: {bad}"


def test_planning_never_imports_the_split_client():
    g = graph()
    for name, deps in g.items():
        if name.startswith("edgesplit.device.planning"):
            assert "edgesplit.device.remote" not in deps and not any(d.startswith("edgesplit.device.flash") for d in deps)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def test_the_rules_catch_a_violation(tmp_path):
    """The checker itself: a cloud module importing the device is found."""
    p = tmp_path / "x.py"
    p.write_text("from edgesplit.device.remote import RemoteSegment\ndef f():\n    from ..device import remote\n")
    found = imports_of("edgesplit.cloud.x", p)
    assert "edgesplit.device.remote" in found
    assert not any(found_m.startswith(a) for a in ALLOWED["edgesplit.cloud"] for found_m in found)
