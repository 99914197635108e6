"""Shared test setup: isolate each test from the user's environment and from the
process-wide registry, build throwaway plugin distributions (``make_dist``), and keep
torch to one thread (the tests' models are tiny, and
on a busy machine torch's worker threads spin far longer than the work takes)."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import diffkit

# Variables that change which plugins load; a developer's shell must not change the tests.
for _name in [k for k in os.environ if k.startswith("DIFFKIT_")]:
    del os.environ[_name]

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_global_registry():
    """Code under test (the CLI, for one) may replace the process-wide registry; put
    the previous one back so that one test's plugins never leak into the next."""
    import diffkit.plugins

    before = diffkit.plugins._registry
    yield
    diffkit.set_registry(before)


class DistFactory:
    """Writes installed-looking distributions -- a package plus ``NAME-VERSION.dist-info``
    with METADATA and an ``entry_points.txt`` ``[diffkit]`` group -- into one folder on
    ``sys.path``, where ``importlib.metadata`` finds them as it finds any installed one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def __call__(self, dist: str, version: str, plugins: dict[str, tuple[str, str]]) -> None:
        """``plugins`` maps an entry-point name to (module name, module source)."""
        lines = ["[diffkit]"]
        for ep_name, (module, source) in plugins.items():
            pkg = self.root / module
            pkg.mkdir()
            (pkg / "__init__.py").write_text(textwrap.dedent(source), encoding="utf-8")
            self.modules.append(module)
            lines.append(f"{ep_name} = {module}")
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        importlib.invalidate_caches()


@pytest.fixture
def make_dist(tmp_path, monkeypatch):
    """``make_dist(dist, version, {entry_point_name: (module, source)})``; the folder leaves
    ``sys.path`` and the modules leave ``sys.modules`` after the test."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    factory = DistFactory(site)
    yield factory
    for module in factory.modules:
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
    importlib.invalidate_caches()
