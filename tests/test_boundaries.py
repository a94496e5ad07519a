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
