"""The layers of the library import only downwards, and nothing imports in a cycle.

reference, _math, _compat ← kernels ← backends ← autograd, masked ← functional ← modules ←
variants, tools, distributed ← lab ← cli (design.md §3). Every ``import`` and ``from … import``
in every source file counts, including the ones inside functions (a lazy import is still an
arrow). The package root (``batchnorm/__init__.py``) and ``__main__`` sit above everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "batchnorm"

#: First component below ``batchnorm`` → its layer (higher imports lower, never the reverse).
LAYERS: dict[str, int] = {
    "reference": 0,
    "_math": 0,
    "_compat": 0,
    "kernels": 1,
    "backends": 2,
    "autograd": 3,
    "masked": 3,
    "functional": 4,
    "modules": 5,
    "variants": 6,
    "tools": 6,
    "distributed": 6,
    "lab": 7,
    "cli": 8,
    "__main__": 9,
}
#: Modules of the bottom layer, which import no other part of the library.
BOTTOM = {"reference", "_math", "_compat"}


def module_name(path: Path, root: Path) -> str:
    """``batchnorm.backends.base`` for ``<root>/backends/base.py`` (packages without __init__)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["batchnorm", *parts])


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The ``batchnorm`` modules ``path`` (module ``name``) imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from batchnorm import functional`` imports the submodule batchnorm.functional
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != "batchnorm" and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the library modules it imports, for every ``.py`` file under ``root``."""
    files = {module_name(path, root): path for path in root.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def layer_of(name: str) -> int | None:
    """The layer of a module, by its first component below ``batchnorm`` (None: the root)."""
    parts = name.split(".")
    return None if len(parts) == 1 else LAYERS[parts[1]]


def back_arrows(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a higher layer by a lower one, and any import out of the bottom layer."""
    problems = []
    for name, targets in sorted(graph.items()):
        own = layer_of(name)
        if own is None:
            continue
        for target in sorted(targets):
            other = layer_of(target)
            if other is None or other > own:
                problems.append(f"{name} imports {target} (layer {other} above {own})")
            elif name.split(".")[1] in BOTTOM and target.split(".")[1] != name.split(".")[1]:
                problems.append(f"{name} (bottom layer) imports {target}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (each as a path that returns to its start)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer() -> None:
    """A new top-level module or package must be placed in the layer table first."""
    graph = import_graph(SOURCE)
    unknown = sorted({name.split(".")[1] for name in graph if "." in name} - set(LAYERS))
    assert not unknown, f"modules with no layer in LAYERS: {unknown}"


def test_imports_only_go_downwards() -> None:
    """No module imports a layer above its own (lazy imports included)."""
    assert back_arrows(import_graph(SOURCE)) == []


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or through others."""
    assert cycles(import_graph(SOURCE)) == []


def test_the_functional_imports_no_specific_backend() -> None:
    """The functional resolves a backend by name; it never imports one backend's module."""
    specific = {
        target
        for target in import_graph(SOURCE)["batchnorm.functional"]
        if target.startswith("batchnorm.backends.") and target != "batchnorm.backends.base"
    }
    assert specific == set()


def test_backends_never_import_autograd_or_the_functional() -> None:
    """A backend owns its whole call with what lies below it."""
    graph = import_graph(SOURCE)
    upward = {
        (name, target)
        for name, targets in graph.items()
        if name.startswith("batchnorm.backends")
        for target in targets
        if target in ("batchnorm.autograd", "batchnorm.functional")
    }
    assert upward == set()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a backend importing autograd, lazily inside a function
        (
            {
                "backends/x.py": "def f():\n    from batchnorm.autograd import train\n",
                "autograd.py": "",
            },
            "arrow",
        ),
        # the functional importing a variant, as a relative import
        ({"functional.py": "from .variants import masked\n", "variants/masked.py": ""}, "arrow"),
        # two modules of one layer importing each other
        (
            {
                "tools/a.py": "import batchnorm.tools.b\n",
                "tools/b.py": "import batchnorm.tools.a\n",
            },
            "cycle",
        ),
        # a correct tree
        ({"modules.py": "from batchnorm import functional\n", "functional.py": ""}, None),
    ],
)
def test_the_checks_catch_a_broken_rule(tmp_path: Path, files: dict[str, str], expected) -> None:
    """The checker itself, on small trees: it reports back-arrows and cycles, and only those."""
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    graph = import_graph(tmp_path)
    assert bool(back_arrows(graph)) == (expected == "arrow")
    assert bool(cycles(graph)) == (expected == "cycle")
