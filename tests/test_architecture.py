"""The package tree is the architecture: each sub-package sits on a layer and imports only from layers below.

The layers, bottom to top, as docs/architecture.md draws them. A module may import from its own
package and from packages on lower layers; never from a higher one, so no two packages import
each other. Checked on the source (static imports, lazy ones inside functions included).
"""

from __future__ import annotations

import ast
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"
LAYERS = [  # bottom first
    {"errors", "settings", "logs", "vocabulary", "files"},
    {"taxonomy", "documents"},
    {"engines"},
    {"labelling"},
    {"store"},
    {"quality", "induction", "distill"},
    {"work"},
    {"api"},
    {"console"},
    {"serve"},
    {"cli"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports() -> list[tuple[str, str, str]]:
    """(module, its top-level part, imported top-level part) for every import of another part of the service."""
    found = []
    for path in SERVICE.rglob("*.py"):
        parts = path.relative_to(SERVICE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service."):
                found.append(("/".join(parts), parts[0], node.module.split(".")[1]))
    return found


def test_every_part_of_the_service_has_a_layer():
    """A new package or top-level module must be placed on a layer (and in docs/architecture.md)."""
    names = {path.stem if path.is_file() else path.name for path in SERVICE.iterdir()
             if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()}
    assert names == set(RANK), f"unplaced: {sorted(names - set(RANK))}; gone: {sorted(set(RANK) - names)}"


def test_nothing_imports_upward():
    """Imports go down the layers (or stay within a package), so the packages form no cycle."""
    upward = [f"{module} imports service.{target} (layer {RANK[target]} > {RANK[source]})"
              for module, source, target in _imports() if source != target and RANK[target] > RANK[source]]
    assert not upward, "\n".join(upward)


def test_the_packages_form_no_cycle():
    """Packages of one layer may use each other one way only (distill uses quality's metrics, not back)."""
    edges: dict[str, set[str]] = {}
    for _, source, target in _imports():
        if source != target:
            edges.setdefault(source, set()).add(target)

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert not [name for name in edges if name in reachable(name)]


def test_the_layers_are_documented_in_order():
    """docs/architecture.md lists the same layers, bottom first."""
    page = (SERVICE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    positions = [min(page.index(f"`{name}`") for name in layer) for layer in LAYERS]
    assert positions == sorted(positions), "docs/architecture.md names the layers in another order"
