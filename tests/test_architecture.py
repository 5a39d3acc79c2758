"""The house's dependency rule, read from the code's own imports: CLI -> composition root -> Ray shells
(``actors/``, ``learners/``) -> the Ray-free library, with no cycles anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("afil_ray", "actors", "learners")
CLI, ROOT = "afil_ray.cli", "afil_ray.driver"  # the only library modules that may know the shells and Ray
SHELLS = ("actors", "learners")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports(path: Path, name: str, known: set[str] = frozenset()) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (lazy imports inside functions count too).
    ``from pkg import sub`` counts as importing ``pkg.sub`` alone when that is one of the ``known`` modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def internal_graph() -> nx.DiGraph:
    """Module -> module edges among the project's own modules."""
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        for target in imports(path, name, set(mods)):
            while target and target not in mods:  # ``ray.exceptions`` -> nothing; ``afil_ray.x.y`` -> its module
                target = target.rpartition(".")[0]
            if target and target != name:
                graph.add_edge(name, target)
    return graph


def test_import_graph_has_no_cycle():
    cycles = list(nx.simple_cycles(internal_graph()))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_only_the_cli_and_the_composition_root_import_the_shells_or_ray():
    mods = modules()
    wrong_shell, wrong_ray = [], []
    for name, path in mods.items():
        if not name.startswith("afil_ray") or name in (CLI, ROOT):
            continue
        found = imports(path, name)
        wrong_shell += [f"{name} -> {t}" for t in found if t.split(".")[0] in SHELLS]
        wrong_ray += [name for t in found if t == "ray" or t.startswith("ray.")]
    assert not wrong_shell, f"library modules importing the Ray shells: {wrong_shell}"
    assert not sorted(set(wrong_ray)), f"library modules importing ray: {sorted(set(wrong_ray))}"


def test_the_shells_import_no_cli_or_composition_root():
    graph = internal_graph()
    up = [(a, b) for a, b in graph.edges if a.split(".")[0] in SHELLS and b in (CLI, ROOT)]
    assert not up, f"shells importing upwards: {up}"


@pytest.mark.parametrize("bad", ["cycle", "shell"])
def test_the_checks_see_what_they_forbid(bad, tmp_path, monkeypatch):
    """The walker finds a planted cycle and a planted shell import (so the checks above can fail)."""
    pkg = tmp_path / "afil_ray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    if bad == "cycle":
        (pkg / "a.py").write_text("from afil_ray import b\n")
        (pkg / "b.py").write_text("def f():\n    from afil_ray.a import x\n")
    else:
        (pkg / "a.py").write_text("def f():\n    from actors.rollout import RolloutActor\n")
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGES", ("afil_ray",))
    if bad == "cycle":
        assert list(nx.simple_cycles(internal_graph()))
    else:
        assert any(t.startswith("actors") for t in imports(pkg / "a.py", "afil_ray.a"))
