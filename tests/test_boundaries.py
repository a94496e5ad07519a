"""The house's package boundaries, checked by importing every module (docs/design.md, "Packages and
boundaries"): ``climax`` imports neither Ray nor ``pipelines``; ``pipelines`` imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

CODE = """
import importlib, pkgutil, sys
import {pkg}
mods = [m.name for m in pkgutil.walk_packages({pkg}.__path__, "{pkg}.")]
for m in mods:
    importlib.import_module(m)
print(len(mods), *sorted(f for f in {forbidden!r} if f in sys.modules))
"""


@pytest.mark.parametrize("pkg, forbidden", [("climax", ["ray", "pipelines"]), ("pipelines", ["torch"])])
def test_every_module_keeps_out_of_what_its_package_must_not_import(pkg, forbidden):
    out = subprocess.run([sys.executable, "-c", CODE.format(pkg=pkg, forbidden=forbidden)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    count, *loaded = out.stdout.split()
    assert int(count) >= 10 and loaded == [], f"importing {pkg} loads {loaded}"


def _imports(pkgs: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules of ``pkgs`` it imports anywhere (top level or inside functions)."""
    import ast

    mods = {}
    for pkg in pkgs:
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        base_parts = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = base_parts[:len(base_parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in names:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m and t not in pkgs:  # a package's lazy __init__ is no edge
                    edges[m].add(t)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[str]:
    """Every import circle found by a depth-first walk of ``edges``."""
    circles = []

    def visit(m, path):
        for t in sorted(edges[m]):
            if t in path:
                circles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in done:
                visit(t, path + [t])
        done.add(m)

    done: set[str] = set()
    for m in sorted(edges):
        if m not in done:
            visit(m, [m])
    return circles


def test_no_import_circle_in_climax_or_jobs():
    """No module of climax/ or jobs/ reaches itself through imports (those inside functions count)."""
    edges = _imports(("climax", "jobs"))
    circles = _circles(edges)
    assert not circles, circles
    assert "climax.tasks.forecast" in edges and "climax.loop" in edges["climax.tasks"]  # the walk is not vacuous


def test_no_import_circle_in_pipelines():
    """The build's stages import downwards only: build -> scan, plan, shard_task, publish -> output."""
    edges = _imports(("pipelines",))
    circles = _circles(edges)
    assert not circles, circles
    assert {"pipelines.shard_task", "pipelines.publish", "pipelines.plan"} <= edges["pipelines.build"]
