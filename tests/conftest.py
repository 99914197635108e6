"""Shared test setup: isolate each test from the user's environment and from the
process-wide registry, build throwaway plugin distributions (``make_dist``), keep
torch to one thread (the tests' models are tiny, and
on a busy machine torch's worker threads spin far longer than the work takes), and fail
a run in which a test was skipped for a reason not in ``ALLOWED_SKIPS``."""

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

# pytester runs a pytest session inside a test (tests/test_plugin_safety.py checks the
# skip policy below that way)
pytest_plugins = ["pytester"]


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


# -- skips ------------------------------------------------------------------------------------
# A test skipped in a fresh clone is a test that does not exist: what a test needs is
# installed by the test extra (pip install -e '.[test]'), so a skip for any other reason
# (an importorskip whose package is missing, above all) fails the run. These are the
# reasons a test may give; use one of them, word for word, or add it here with why.
ALLOWED_SKIPS: dict[str, str] = {
    # hardware a machine may not have
    "needs CUDA": "a test of GPU code, on a machine without one",
    "needs several GPUs": "a test of multi-GPU code, on a machine with fewer",
    # tests/test_training.py: the error checked exists only where CUDA does not
    "this machine has CUDA": "fp16 without CUDA is an error; with CUDA it trains, as tests of GPU code check",
    # tests/test_examples.py: one case of the parametrised example spec tests
    "CIFAR-10's files are checksummed; tests/test_image_datasets.py covers reading them": (
        "the example cannot be given fake CIFAR-10 files; its reading is tested apart"
    ),
}

_unexpected_skips: list[tuple[str, str]] = []


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if reason not in ALLOWED_SKIPS:
            _unexpected_skips.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not _unexpected_skips:
        return
    n = len(_unexpected_skips)
    terminalreporter.section("unexpected skips", sep="=", red=True, bold=True)
    terminalreporter.line(
        f"{n} test{' was' if n == 1 else 's were'} skipped for a reason not allowed in tests/conftest.py's"
        " ALLOWED_SKIPS; install what they need (pip install -e '.[test]') or fix the test:"
    )
    for nodeid, reason in _unexpected_skips:
        terminalreporter.line(f"  {nodeid}: {reason}")
