"""Publishing a plugin: the plugin API version, ``diffkit plugins --check``, a spec's
``requires:``, the template distribution in examples/plugin-template installed for real,
and the authoring guide covering every hook.

The template is installed once per session with ``pip install --no-deps
--no-build-isolation --target DIR`` from a copy of its folder (the build writes into the
source tree): offline, a few seconds, and nothing of the test environment changes. Each
test that needs it puts DIR on ``sys.path`` for its own duration, where
``importlib.metadata`` finds the distribution and its entry point as it finds any
installed one; the template's own test suite runs in a subprocess with DIR on
``PYTHONPATH``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit import PluginError, SpecError, hookspecs, testing
from diffkit.cli import main
from diffkit.spec import dump_spec, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin-template"
GUIDE = ROOT / "docs" / "plugins.md"
BASE_SPEC = {"data": {"type": "moons", "n": 64}, "denoiser": {"type": "mlp", "hidden": 8, "depth": 1}}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def schedule_plugin(name: str = "steps10", header: str = "") -> str:
    """The source of a plugin module with one schedule, ``header`` placed above it."""
    return f'''
{header}
import torch
from diffkit import Component, Params, Schedule, hookimpl

@hookimpl
def diffkit_schedules():
    betas = torch.full((10,), 0.1, dtype=torch.float64)
    return [Component("{name}", lambda p, ctx: Schedule.from_betas(betas), Params, "Ten steps.")]
'''


# -- the plugin API version ----------------------------------------------------------------------
@pytest.mark.parametrize("declared", ["", "DIFFKIT_API_VERSION = 1", "DIFFKIT_API_VERSION = 2"])
def test_a_plugin_for_this_api_version_or_declaring_none_loads(make_dist, declared):
    make_dist("acme-ok", "1.0", {"acme": ("acme_ok_plugin", schedule_plugin(header=declared))})
    registry = diffkit.load_plugins()
    assert registry.get("schedule", "steps10").distribution == "acme-ok"


def test_a_plugin_for_a_newer_api_gets_a_clear_message_not_a_crash(make_dist):
    future = diffkit.API_VERSION + 1
    make_dist("acme-future", "3.0", {"future": ("acme_future_plugin", schedule_plugin(header=f"DIFFKIT_API_VERSION = {future}"))})
    registry = diffkit.load_plugins()
    [info] = [p for p in registry.plugins if p.name == "future"]
    assert info.status == "failed"
    assert f"plugin 'future' (acme-future 3.0) was written for diffkit plugin API version {future}" in info.error
    assert "loads plugins of API version 1, 2" in info.error and "upgrade diffkit" in info.error
    assert "steps10" not in registry.tags("schedule")
    with pytest.raises(PluginError, match=f"API version {future}"):
        diffkit.load_plugins(strict=True)


def test_a_plugin_for_an_older_api_is_told_to_upgrade_itself():
    old = type("OldPlugin", (), {"DIFFKIT_API_VERSION": 0})()
    with pytest.raises(PluginError, match="API version 0.*install a release of the plugin written for the current API"):
        diffkit.load_plugins(autoload=False).register_plugin(old, "old")


def test_an_api_version_that_is_not_an_integer_is_refused():
    odd = type("Odd", (), {"DIFFKIT_API_VERSION": "1"})()
    with pytest.raises(PluginError, match="DIFFKIT_API_VERSION = '1'; it must be an integer"):
        diffkit.load_plugins(autoload=False).register_plugin(odd, "odd")


def test_a_plugin_importing_what_this_diffkit_lacks_is_told_why(make_dist):
    source = "from diffkit import SomethingFromTheFuture\n"
    make_dist("acme-new", "1.0", {"new": ("acme_new_plugin", source)})
    [info] = [p for p in diffkit.load_plugins().plugins if p.name == "new"]
    assert "ImportError" in info.error and "it may have been written for a newer diffkit" in info.error


# -- diffkit plugins --check ---------------------------------------------------------------------
def test_check_passes_for_the_builtins(capsys):
    code, out, _ = run(capsys, "plugins", "--check", "--no-autoload")
    assert code == 0 and out.startswith("ok: ") and "the spec schema builds" in out


SCHEMALESS = '''
import torch
from pydantic import ConfigDict, Field
from diffkit import Component, Params, Schedule, hookimpl

class TensorParams(Params):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    betas: torch.Tensor | None = Field(None, description="A tensor: no JSON Schema can describe it.")

@hookimpl
def diffkit_schedules():
    return [Component("tensor-betas", lambda p, ctx: None, TensorParams, "")]
'''


@pytest.mark.parametrize(
    "dist, source, expected",
    [
        ("acme-broken", "raise RuntimeError('boom')\n", "plugin 'p' (acme-broken 1.0) failed to load: RuntimeError: boom"),
        ("acme-typo", schedule_plugin().replace("diffkit_schedules", "diffkit_schedule"), "unknown hook 'diffkit_schedule'"),
        ("acme-linear", schedule_plugin("linear"), "schedule 'linear' is provided by more than one plugin"),
        ("acme-tensor", SCHEMALESS, "schedule 'tensor-betas' of plugin 'p' from acme-tensor 1.0: the JSON Schema"),
    ],
    ids=["import-failure", "unknown-hook", "duplicate-name", "schema"],
)
def test_check_fails_and_names_the_problem(make_dist, capsys, dist, source, expected):
    make_dist(dist, "1.0", {"p": (dist.replace("-", "_") + "_plugin", source)})
    code, out, _ = run(capsys, "plugins", "--check")
    assert code == 1, out
    assert expected in out
    assert out.rstrip().endswith("found")
    code, out, _ = run(capsys, "plugins", "--check", "--json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False and any(expected in p for p in report["problems"])


def test_check_reports_a_spec_schema_that_cannot_be_built(make_dist, capsys):
    make_dist("acme-tensor", "1.0", {"p": ("acme_tensor_plugin", SCHEMALESS)})
    _, out, _ = run(capsys, "plugins", "--check")
    assert "the spec schema of the installed components cannot be built" in out


# -- requires: ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "requirement, message",
    [
        ("diffkit-nonexistent-plugin>=0.2", "diffkit-nonexistent-plugin is not installed; the spec requires"),
        ("torch<1", f"torch {torch.__version__.split('+')[0]}"),
        ("not a requirement!", "'not a requirement!' is not a requirement such as 'diffkit-sigmoid>=0.2'"),
    ],
)
def test_unmet_requirements_are_spec_errors_at_their_index(requirement, message):
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE_SPEC, "requires": ["numpy", requirement]})
    [(path, msg)] = err.value.problems
    assert path == "requires.1" and message in msg
    assert "pip install" in msg or "not a requirement" in msg


def test_met_requirements_validate_and_are_written_back_first():
    spec = validate_spec({**BASE_SPEC, "requires": ["numpy>=1", "torch", "nothing-here; sys_platform == 'os2'"]})
    text = dump_spec(spec)
    assert text.startswith("requires:\n- numpy>=1\n")
    assert "requires" not in dump_spec(validate_spec(BASE_SPEC))


def test_a_pipeline_checks_its_requirements_in_python():
    with pytest.raises(SpecError, match="requires.0: diffkit-nonexistent-plugin is not installed"):
        diffkit.Pipeline(shape=(2,), requires=["diffkit-nonexistent-plugin"])
    pipe = diffkit.Pipeline(data={"type": "moons", "n": 64}, denoiser={"type": "mlp", "hidden": 8}, requires=["torch"])
    assert pipe.spec.requires == ["torch"]


def test_validate_reports_an_unmet_requirement_with_the_install_command(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text("requires: ['diffkit-nonexistent-plugin>=0.2']\ndata: moons\ndenoiser: mlp\n", encoding="utf-8")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 1
    assert "requires.0: diffkit-nonexistent-plugin is not installed" in err
    assert "pip install 'diffkit-nonexistent-plugin>=0.2'" in err


# -- the template, installed -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def template_site(tmp_path_factory) -> Path:
    """The template distribution installed into a folder of its own."""
    root = tmp_path_factory.mktemp("plugin-template")
    source, site = root / "source", root / "site"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".hypothesis"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return site


@pytest.fixture
def template(template_site, monkeypatch):
    """The installed template on ``sys.path`` for one test; its modules are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(template_site))
    importlib.invalidate_caches()
    yield template_site
    for name in [m for m in sys.modules if m == "diffkit_sigmoid" or m.startswith("diffkit_sigmoid.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def test_the_template_appears_in_diffkit_plugins_with_its_distribution_and_version(template, capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    rows = {(r["kind"], r["name"]): r for r in json.loads(out)}
    for key in [("schedule", "sigmoid"), ("sampler", "reverse-sde")]:
        row = rows[key]
        assert (row["plugin"], row["distribution"], row["version"], row["status"]) == (
            "sigmoid",
            "diffkit-sigmoid",
            "0.2.0",
            "ok",
        )
    assert run(capsys, "plugins", "--check")[0] == 0


def test_a_spec_using_the_template_validates_trains_and_samples(template, capsys):
    spec_file = TEMPLATE / "examples" / "moons-sigmoid.yaml"
    code, out, _ = run(capsys, "validate", str(spec_file))
    assert code == 0 and "schedule: sigmoid" in out and "sampler: reverse-sde" in out
    registry = diffkit.load_plugins()
    spec = load_spec(spec_file, registry).model_dump()
    spec.update(data={"type": "moons", "n": 256}, denoiser={"type": "mlp", "hidden": 16, "depth": 1})
    spec["sampler"]["steps"] = 20
    spec["train"] = {"steps": 20, "batch_size": 64, "preview": 0}
    pipe = diffkit.Pipeline.from_spec(spec, registry)
    result = pipe.fit(progress=False)
    assert result.steps == 20 and torch.isfinite(torch.tensor(result.final_loss))
    x = pipe.sample(100, seed=0)
    assert x.shape == (100, 2) and torch.isfinite(x).all()
    assert pipe.spec.requires == ["diffkit-sigmoid>=0.2"]
    with pytest.raises(SpecError, match=r"diffkit-sigmoid 0.2.0 is installed, but the spec requires diffkit-sigmoid>=0.3"):
        validate_spec({**spec, "requires": ["diffkit-sigmoid>=0.3"]}, registry)


def test_the_templates_own_tests_pass(template_site, tmp_path):
    work = tmp_path / "template"
    shutil.copytree(TEMPLATE, work, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".hypothesis"))
    shutil.rmtree(work / "src")  # the tests must exercise the installed distribution
    env = {**os.environ, "PYTHONPATH": str(template_site), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("DIFFKIT_")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


# -- the authoring guide ---------------------------------------------------------------------------
def test_the_guide_documents_every_hook_and_every_check():
    guide = GUIDE.read_text(encoding="utf-8")
    hooks = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("diffkit_")]
    assert sorted(hooks) == sorted(hookspecs.HOOKS.values())
    missing = [h for h in hooks if f"### `{h}`" not in guide]
    assert not missing, f"docs/plugins.md has no section for the hook(s) {missing}"
    checks = [name for name in testing.__all__ if name.startswith("check_")]
    assert not [c for c in checks if f"`{c}" not in guide], "docs/plugins.md must describe every conformance check"
    for term in ("DIFFKIT_API_VERSION", "plugins --check", "requires:", "diffkit_registry", "diffkit_plugin", "pytest11"):
        assert term in guide, term
