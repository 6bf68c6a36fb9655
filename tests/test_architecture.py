"""The package's shape, measured from its own imports (docs/architecture.md): no import cycle, not even one
hidden in a function; imports run one way (cli -> scale -> run -> model -> geometry -> io -> errors); io/
and geometry/ import without torch; no private name crosses a module; command modules stay thin."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lotus_cli"
# a module's layer: its first subpackage; a higher layer may import a lower one, never the reverse
LAYERS = {"errors": 0, "io": 1, "geometry": 2, "model": 3, "run": 4, "evaluate": 4, "train": 4, "scale": 5, "cli": 6}
LAYERS["app"] = 5  # `lotus app`'s library (app/): beside scale/, under cli/


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def type_checking_only(tree: ast.AST) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (annotations only: never executed)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, ast.ImportFrom | ast.Import)}
    return lines


def imports(name: str) -> list[tuple[str, int, list[str]]]:
    """(imported module of this package, line, names taken) for every import of module ``name``, at any depth."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    skip = type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if node.lineno in skip if hasattr(node, "lineno") else False:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, []) for a in node.names if a.name.startswith("lotus_cli")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lotus_cli"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(m, node.lineno, []) for m in submodules]
            if len(submodules) < len(names):
                found.append((target, node.lineno, [n for n in names if f"{target}.{n}" not in MODULES]))
    return found


GRAPH = {name: {t for t, _, _ in imports(name) if t in MODULES and t != name} for name in MODULES}


def layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] == "__main__":  # the package's facade and the entry points stand outside
        return None
    return LAYERS[parts[1]]


def test_no_import_cycle_even_inside_functions():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            strong(v)
    assert cycles == []


def test_imports_run_one_way():
    upward = [
        f"{a} -> {b}"
        for a, targets in GRAPH.items()
        for b in targets
        if layer(a) is not None and layer(b) is not None and layer(a) < layer(b)
    ]
    assert upward == []


def test_the_layer_rule_would_see_an_upward_import():
    """The two tests above read the imports this test relies on: a module of each layer is found importing
    the one below it, so an empty list above means something."""
    assert "lotus_cli.run.predict" in GRAPH["lotus_cli.scale.dispatch"]
    assert "lotus_cli.model.predictor" in GRAPH["lotus_cli.run.images"]
    assert "lotus_cli.io.atomic" in GRAPH["lotus_cli.geometry.ply"]
    assert any(t.startswith("lotus_cli.run.") for t in GRAPH["lotus_cli.cli.predict"])  # imported in a function


def test_io_and_geometry_import_without_torch():
    blocked = [m for m in MODULES if m.split(".")[1:2] in (["io"], ["geometry"])]
    code = (
        "import importlib, sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not to be imported here')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        f"for m in {blocked!r}:\n"
        "    importlib.import_module(m)\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert len(blocked) >= 14  # every io/ and geometry/ module was imported


def test_no_private_name_crosses_a_module():
    crossing = [
        f"{name}:{line} takes {n} from {target}"
        for name in MODULES
        for target, line, names in imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert crossing == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "cli").glob("*.py")), ids=lambda p: p.name)
def test_command_modules_stay_thin(path):
    assert len(path.read_text().splitlines()) <= 300


if __name__ == "__main__":  # python tests/test_architecture.py: the package's imports, by layer
    for name in sorted(MODULES, key=lambda m: (-(layer(m) if layer(m) is not None else 9), m)):
        targets = sorted(t.removeprefix("lotus_cli.") for t in GRAPH[name])
        print(
            f"{layer(name) if layer(name) is not None else '-'}  {name.removeprefix('lotus_cli.') or 'lotus_cli'}"
            f"  ->  {', '.join(targets) or '(nothing of the package)'}"
        )
