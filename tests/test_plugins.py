"""Plugin loading through real entry points.

Each test builds a throwaway distribution in ``tmp_path`` -- a package plus a
``NAME-VERSION.dist-info`` folder whose ``entry_points.txt`` has a ``[diffkit]``
group -- puts it on ``sys.path`` and loads a fresh registry with
``diffkit.load_plugins``, exactly as an installed third-party package is found.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
from pydantic import BaseModel, Field

import diffkit
from diffkit import Component, ComponentLookupError, Params, PluginError, Schedule, SpecError, hookimpl
from diffkit.spec import validate_spec

# The built-ins are the entry points of diffkit's own distribution (at least these five).
BUILTIN_PLUGINS = {
    ep.name for ep in entry_points(group="diffkit") if ep.dist and ep.dist.metadata["Name"] == "diffkit"
}
assert {"diffkit.datasets", "diffkit.denoisers", "diffkit.objectives", "diffkit.samplers", "diffkit.schedules"} <= (
    BUILTIN_PLUGINS
)

# A spec that needs only built-in components; tests add or replace sections.
BASE_SPEC = {"data": {"type": "moons", "n": 64}, "denoiser": {"type": "mlp", "hidden": 8, "depth": 1}}

# A third-party schedule: a sigmoid-shaped ᾱ_t, contributed by the distribution acme-diffusion.
ACME_PLUGIN = '''
import torch
from pydantic import Field
from diffkit import Component, Params, Schedule, hookimpl

class SigmoidParams(Params):
    """ᾱ_t = 1 - sigmoid(linspace(-6, 6, T)), squeezed into (0, 1)."""

    timesteps: int = Field(10, ge=2, description="Number of diffusion steps T.")

def sigmoid(params, ctx):
    x = torch.linspace(-6, 6, params.timesteps, dtype=torch.float64)
    return Schedule(0.98 * (1 - torch.sigmoid(x)) + 0.01)

@hookimpl
def diffkit_schedules():
    return [Component("acme-sigmoid", sigmoid, SigmoidParams, "Sigmoid schedule from ACME.")]
'''

# A third-party schedule that takes the built-in's name.
RIVAL_LINEAR_PLUGIN = '''
import torch
from pydantic import Field
from diffkit import Component, Params, Schedule, hookimpl

class RivalParams(Params):
    timesteps: int = Field(7, ge=2, description="Number of diffusion steps T.")

def linear(params, ctx):
    return Schedule.from_betas(torch.full((params.timesteps,), 0.1, dtype=torch.float64))

@hookimpl
def diffkit_schedules():
    return [Component("linear", linear, RivalParams, "A rival linear schedule.")]
'''

BROKEN_ON_IMPORT = '''
raise RuntimeError("boom: this plugin cannot be imported")
'''

# Its dataset hook works; its sampler hook fails. None of its components may register.
HOOK_RAISES = '''
from diffkit import Component, Params, TensorData, hookimpl
import torch

@hookimpl
def diffkit_datasets():
    return [Component("half-made", lambda p, ctx: TensorData(torch.zeros(4, 2)), Params, "")]

@hookimpl
def diffkit_samplers():
    raise ValueError("hook exploded while listing samplers")
'''

NO_FORBID = '''
from pydantic import BaseModel, Field
from diffkit import Component, hookimpl

class LaxParams(BaseModel):
    scale: float = Field(1.0, description="Accepts unknown keys: not allowed.")

@hookimpl
def diffkit_objectives():
    return [Component("lax", lambda p, ctx: None, LaxParams, "")]
'''


@pytest.fixture
def acme(make_dist):
    make_dist("acme-diffusion", "2.3.4", {"acme": ("acme_diffusion_plugin", ACME_PLUGIN)})


@pytest.fixture
def rival(make_dist):
    make_dist("rival-schedules", "0.9", {"rival": ("rival_schedules_plugin", RIVAL_LINEAR_PLUGIN)})


def _rows(registry, **match):
    return [r for r in registry.rows() if all(r.get(k) == v for k, v in match.items())]


def _info(registry, name):
    [info] = [p for p in registry.plugins if p.name == name]
    return info


# -- provenance ------------------------------------------------------------------------------
def test_builtins_are_plugins_from_the_diffkit_distribution():
    registry = diffkit.load_plugins()
    loaded = {p.name for p in registry.plugins if p.status == "loaded" and p.builtin}
    assert loaded == BUILTIN_PLUGINS
    [row] = _rows(registry, kind="schedule", name="cosine")
    assert row["plugin"] == "diffkit.schedules"
    assert row["distribution"] == "diffkit"
    assert row["version"] == diffkit.__version__
    assert row["qualified_name"] == "diffkit.schedules:cosine"
    assert row["status"] == "ok"


def test_load_plugins_gives_a_fresh_registry_and_leaves_the_global_one_alone(acme):
    before = diffkit.get_registry()
    a, b = diffkit.load_plugins(), diffkit.load_plugins()
    assert a is not b and a is not before
    assert diffkit.get_registry() is before


def test_third_party_component_is_listed_with_plugin_distribution_and_version(acme):
    registry = diffkit.load_plugins()
    [row] = _rows(registry, name="acme-sigmoid")
    assert row["kind"] == "schedule"
    assert row["plugin"] == "acme"
    assert row["distribution"] == "acme-diffusion"
    assert row["version"] == "2.3.4"
    assert row["qualified_name"] == "acme:acme-sigmoid"
    assert row["status"] == "ok"
    assert row["description"] == "Sigmoid schedule from ACME."
    info = _info(registry, "acme")
    assert (info.status, info.builtin, info.distribution, info.version) == ("loaded", False, "acme-diffusion", "2.3.4")
    # the built-ins load beside it
    assert {p.name for p in registry.plugins if p.status == "loaded"} == BUILTIN_PLUGINS | {"acme"}


def test_third_party_component_builds_and_is_usable_in_a_spec(acme):
    registry = diffkit.load_plugins()
    schedule = registry.build("schedule", {"type": "acme-sigmoid", "timesteps": 12})
    assert isinstance(schedule, Schedule)
    assert schedule.T == 12
    assert schedule.__diffkit_spec__ == {"type": "acme-sigmoid", "timesteps": 12}
    spec = validate_spec({**BASE_SPEC, "schedule": {"type": "acme-sigmoid", "timesteps": 12}}, registry)
    assert spec.schedule.type == "acme-sigmoid" and spec.schedule.timesteps == 12
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE_SPEC, "schedule": {"type": "acme-sigmoid", "timesteps": 1}}, registry)
    assert [path for path, _ in err.value.problems] == ["schedule.timesteps"]


# -- isolation of failures -------------------------------------------------------------------
@pytest.fixture
def broken(make_dist, acme):
    make_dist("broken-plugin", "0.0.1", {"broken": ("broken_diffkit_plugin", BROKEN_ON_IMPORT)})


def test_plugin_that_fails_to_import_is_reported_and_the_rest_load(broken):
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert failed.name == "broken"
    assert failed.distribution == "broken-plugin"
    assert failed.version == "0.0.1"
    assert failed.status == "failed"
    assert "RuntimeError" in failed.error and "boom: this plugin cannot be imported" in failed.error
    # the built-ins and the other third-party plugin still load
    assert registry.get("schedule", "cosine").plugin == "diffkit.schedules"
    assert registry.get("schedule", "acme-sigmoid").plugin == "acme"
    # and the failure shows in the rows `diffkit plugins` prints
    [row] = _rows(registry, plugin="broken")
    assert row["status"] == "failed" and row["distribution"] == "broken-plugin" and "boom" in row["error"]


def test_entry_point_naming_a_missing_module_is_reported(make_dist):
    make_dist("ghost", "1.0", {})
    info = next(make_dist.root.glob("ghost-*.dist-info"))
    (info / "entry_points.txt").write_text("[diffkit]\nghost = no_such_module_for_diffkit_tests\n")
    importlib.invalidate_caches()
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert (failed.name, failed.distribution) == ("ghost", "ghost")
    assert "ModuleNotFoundError" in failed.error and "no_such_module_for_diffkit_tests" in failed.error
    assert registry.get("sampler", "ddpm")


def test_strict_mode_makes_a_failing_plugin_fatal(broken):
    with pytest.raises(PluginError, match=r"plugin 'broken' from broken-plugin 0\.0\.1 failed.*strict.*boom"):
        diffkit.load_plugins(strict=True)


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_strict_mode_from_the_environment(broken, monkeypatch, value):
    monkeypatch.setenv("DIFFKIT_STRICT_PLUGINS", value)
    with pytest.raises(PluginError, match="plugin 'broken'"):
        diffkit.load_plugins()
    # an explicit argument wins over the environment
    assert [p.name for p in diffkit.load_plugins(strict=False).failed()] == ["broken"]


def test_strict_off_in_the_environment_is_not_strict(broken, monkeypatch):
    monkeypatch.setenv("DIFFKIT_STRICT_PLUGINS", "0")
    assert [p.name for p in diffkit.load_plugins().failed()] == ["broken"]


def test_plugin_whose_hook_raises_is_isolated_and_contributes_nothing(make_dist, acme):
    make_dist("hooky", "3.1", {"hooky": ("hooky_diffkit_plugin", HOOK_RAISES)})
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert (failed.name, failed.distribution, failed.version) == ("hooky", "hooky", "3.1")
    assert "failed in its hook" in failed.error
    assert "ValueError" in failed.error and "hook exploded while listing samplers" in failed.error
    # all or nothing per plugin: the dataset its working hook returned is not registered
    assert "half-made" not in {e.name for e in registry.all("data")}
    assert not registry.pm.has_plugin("hooky")
    assert registry.get("schedule", "acme-sigmoid").plugin == "acme"
    assert registry.get("sampler", "ddpm").plugin == "diffkit.samplers"
    with pytest.raises(PluginError, match="plugin 'hooky'.*hook exploded"):
        diffkit.load_plugins(strict=True)


def test_a_third_party_plugin_cannot_take_a_builtins_name(make_dist):
    make_dist("shadow", "6.6.6", {"diffkit.schedules": ("shadow_schedules_plugin", RIVAL_LINEAR_PLUGIN)})
    registry = diffkit.load_plugins()
    infos = {p.distribution: p for p in registry.plugins if p.name == "diffkit.schedules"}
    assert infos["diffkit"].status == "loaded"
    assert infos["shadow"].status == "failed" and "already registered" in infos["shadow"].error
    assert registry.get("schedule", "linear").distribution == "diffkit"
    assert registry.get("schedule", "linear").component.params().timesteps == 1000


# -- same kind and name from two plugins -----------------------------------------------------
def test_duplicate_name_is_an_error_naming_both_sources(rival):
    registry = diffkit.load_plugins()
    with pytest.raises(ComponentLookupError) as err:
        registry.get("schedule", "linear")
    msg = str(err.value)
    assert "more than one plugin" in msg
    assert "plugin 'diffkit.schedules' from diffkit" in msg
    assert "plugin 'rival' from rival-schedules 0.9" in msg
    assert "'diffkit.schedules:linear'" in msg and "'rival:linear'" in msg
    assert "qualified" in msg
    assert {r["plugin"] for r in _rows(registry, kind="schedule", name="linear", status="duplicate")} == {
        "diffkit.schedules",
        "rival",
    }


def test_qualified_names_choose_one_of_the_duplicates(rival):
    registry = diffkit.load_plugins()
    assert registry.get("schedule", "diffkit.schedules:linear").plugin == "diffkit.schedules"
    assert registry.get("schedule", "rival:linear").distribution == "rival-schedules"
    builtin = registry.build("schedule", "diffkit.schedules:linear")
    theirs = registry.build("schedule", "rival:linear")
    assert (builtin.T, theirs.T) == (1000, 7)
    # what gets written back keeps the qualification, so it reloads unambiguously
    assert builtin.__diffkit_spec__["type"] == "diffkit.schedules:linear"
    assert theirs.__diffkit_spec__ == {"type": "rival:linear", "timesteps": 7}
    # names that are not duplicated stay usable plainly
    assert registry.get("schedule", "cosine").plugin == "diffkit.schedules"


def test_spec_with_an_ambiguous_name_fails_and_a_qualified_one_validates(rival):
    registry = diffkit.load_plugins()
    with pytest.raises(SpecError) as err:
        validate_spec({**BASE_SPEC, "schedule": {"type": "linear", "timesteps": 10}}, registry)
    [(path, msg)] = err.value.problems
    assert path == "schedule"
    assert "more than one plugin" in msg and "'diffkit.schedules:linear'" in msg and "'rival:linear'" in msg
    spec = validate_spec({**BASE_SPEC, "schedule": {"type": "diffkit.schedules:linear", "timesteps": 10}}, registry)
    assert spec.schedule.type == "diffkit.schedules:linear" and spec.schedule.timesteps == 10
    spec = validate_spec({**BASE_SPEC, "schedule": "rival:linear"}, registry)
    assert spec.schedule.type == "rival:linear" and spec.schedule.timesteps == 7
    # the default schedule is `linear`; with two of them the spec must say which, never last-one-wins
    with pytest.raises(SpecError) as err:
        validate_spec(BASE_SPEC, registry)
    assert [p for p, _ in err.value.problems] == ["schedule"]


def test_qualified_name_of_the_wrong_plugin_is_unknown(rival):
    registry = diffkit.load_plugins()
    with pytest.raises(ComponentLookupError, match="unknown schedule 'rival:cosine'"):
        registry.get("schedule", "rival:cosine")


# -- unknown names ---------------------------------------------------------------------------
def test_unknown_name_lists_what_is_available_and_the_closest_match():
    registry = diffkit.load_plugins()
    with pytest.raises(ComponentLookupError) as err:
        registry.get("schedule", "cosin")
    msg = str(err.value)
    assert "unknown schedule 'cosin'" in msg
    assert "Did you mean 'cosine'" in msg
    schedules = ", ".join(sorted({e.name for e in registry.all("schedule")}))
    assert f"Available: {schedules}." in msg and "cosine" in schedules and "linear" in schedules
    with pytest.raises(ComponentLookupError, match="Did you mean 'ddpm'"):
        registry.get("sampler", "ddpn")
    with pytest.raises(ComponentLookupError) as err:
        registry.get("data", "moonz")
    datasets = sorted({e.name for e in registry.all("data")})
    assert f"Available: {', '.join(datasets)}." in str(err.value)
    assert "Did you mean 'moons'" in str(err.value)


def test_unknown_kind_names_the_kinds():
    registry = diffkit.load_plugins()
    with pytest.raises(ComponentLookupError, match="unknown kind of component 'scheduler'.*schedule"):
        registry.get("scheduler", "linear")


def test_lookup_errors_are_diffkit_errors_and_lookup_errors():
    registry = diffkit.load_plugins()
    with pytest.raises(LookupError):
        registry.get("schedule", "nope")
    with pytest.raises(diffkit.DiffkitError):
        registry.get("schedule", "nope")


# -- autoload, include, block ---------------------------------------------------------------
def test_autoload_off_loads_only_the_builtins(acme):
    registry = diffkit.load_plugins(autoload=False)
    assert {p.name for p in registry.plugins if p.status == "loaded"} == BUILTIN_PLUGINS
    info = _info(registry, "acme")
    assert info.status == "not-loaded" and info.distribution == "acme-diffusion"
    assert [r["status"] for r in _rows(registry, plugin="acme")] == ["not-loaded"]
    with pytest.raises(ComponentLookupError):
        registry.get("schedule", "acme-sigmoid")


def test_autoload_off_from_the_environment(acme, monkeypatch):
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = diffkit.load_plugins()
    assert _info(registry, "acme").status == "not-loaded"
    assert registry.get("schedule", "cosine")
    # an explicit argument wins over the environment
    assert _info(diffkit.load_plugins(autoload=True), "acme").status == "loaded"


def test_include_loads_a_named_plugin_with_autoload_off(acme, make_dist):
    make_dist("other", "1.0", {"other": ("other_diffkit_plugin", RIVAL_LINEAR_PLUGIN)})
    registry = diffkit.load_plugins(autoload=False, include=["acme"])
    assert _info(registry, "acme").status == "loaded"
    assert _info(registry, "other").status == "not-loaded"
    assert registry.get("schedule", "acme-sigmoid").distribution == "acme-diffusion"
    assert registry.get("schedule", "linear").plugin == "diffkit.schedules"  # no rival: not ambiguous


def test_include_from_the_environment(acme, monkeypatch):
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("DIFFKIT_PLUGINS", "something-else, acme")
    registry = diffkit.load_plugins()
    assert _info(registry, "acme").status == "loaded"
    assert registry.get("schedule", "acme-sigmoid")


def test_block_a_third_party_plugin(acme):
    registry = diffkit.load_plugins(block=["acme"])
    info = _info(registry, "acme")
    assert info.status == "blocked" and info.distribution == "acme-diffusion"
    assert [r["status"] for r in _rows(registry, plugin="acme")] == ["blocked"]
    with pytest.raises(ComponentLookupError):
        registry.get("schedule", "acme-sigmoid")
    assert {p.name for p in registry.plugins if p.status == "loaded"} == BUILTIN_PLUGINS


def test_block_wins_over_include(acme):
    registry = diffkit.load_plugins(autoload=False, include=["acme"], block=["acme"])
    assert _info(registry, "acme").status == "blocked"


def test_block_from_the_environment_resolves_a_duplicate(rival, monkeypatch):
    monkeypatch.setenv("DIFFKIT_BLOCK_PLUGINS", "rival")
    registry = diffkit.load_plugins()
    assert _info(registry, "rival").status == "blocked"
    assert registry.get("schedule", "linear").plugin == "diffkit.schedules"


def test_blocking_a_builtin_by_the_ordinary_block_list_is_refused():
    with pytest.raises(PluginError) as err:
        diffkit.load_plugins(block=["diffkit.samplers"])
    msg = str(err.value)
    assert "diffkit.samplers" in msg and "built-in" in msg
    assert "DIFFKIT_BLOCK_BUILTIN_PLUGINS" in msg and "block_builtins" in msg


def test_blocking_a_builtin_from_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("DIFFKIT_BLOCK_PLUGINS", "diffkit.schedules")
    with pytest.raises(PluginError, match="DIFFKIT_BLOCK_BUILTIN_PLUGINS"):
        diffkit.load_plugins()


def test_block_builtins_blocks_a_builtin_deliberately(rival):
    registry = diffkit.load_plugins(block_builtins=["diffkit.schedules"])
    info = _info(registry, "diffkit.schedules")
    assert info.status == "blocked" and info.builtin
    # with the built-in schedules gone, the rival's `linear` is the only one
    assert registry.get("schedule", "linear").plugin == "rival"
    assert "diffkit.schedules" not in {e.plugin for e in registry.all("schedule")}
    assert registry.get("sampler", "ddpm")  # other built-ins are untouched


def test_block_builtins_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFKIT_BLOCK_BUILTIN_PLUGINS", "diffkit.samplers")
    registry = diffkit.load_plugins()
    assert "diffkit.samplers" not in {e.plugin for e in registry.all("sampler")}
    assert not any(e.name == "ddpm" for e in registry.all("sampler"))
    assert _info(registry, "diffkit.samplers").status == "blocked"


# -- what a plugin may contribute ------------------------------------------------------------
def test_params_without_extra_forbid_are_rejected_through_entry_points(make_dist):
    make_dist("lax-plugin", "1.0", {"lax": ("lax_diffkit_plugin", NO_FORBID)})
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert failed.name == "lax" and failed.distribution == "lax-plugin"
    assert "objective 'lax' of plugin 'lax'" in failed.error
    assert "must reject unknown keys" in failed.error and "diffkit.Params" in failed.error
    with pytest.raises(ComponentLookupError):
        registry.get("objective", "lax")


class _Lax(BaseModel):
    scale: float = Field(1.0, description="A parameter.")


class _WithType(Params):
    type: str = Field("x", description="Clashes with the spec's tag.")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (Component("lax", lambda p, c: None, _Lax), "must reject unknown keys"),
        ({"name": "dict-record"}, "must return a list of diffkit.Component records"),
        (Component("a:b", lambda p, c: None, Params), "invalid name"),
        (Component("", lambda p, c: None, Params), "invalid name"),
        (Component("typed", lambda p, c: None, _WithType), "'type' is reserved"),
        (Component("not-a-model", lambda p, c: None, dict), "params must be a pydantic model"),  # type: ignore[arg-type]
    ],
)
def test_invalid_records_are_rejected_with_a_clear_message(record, message):
    class Plugin:
        @hookimpl
        def diffkit_objectives(self):
            return [record]

    registry = diffkit.load_plugins(autoload=False)
    generation, objectives = registry.generation, registry.all("objective")
    with pytest.raises(PluginError, match="'bad'") as err:
        registry.register_plugin(Plugin(), "bad")
    assert message in str(err.value)
    assert not registry.pm.has_plugin("bad")
    assert registry.generation == generation
    assert registry.all("objective") == objectives


def test_a_plugin_may_not_give_one_name_twice():
    class Plugin:
        @hookimpl
        def diffkit_samplers(self):
            return [Component("twin", lambda p, c: 1, Params), Component("twin", lambda p, c: 2, Params)]

    registry = diffkit.load_plugins(autoload=False)
    with pytest.raises(PluginError, match="plugin 'twins' gives more than one sampler named 'twin'"):
        registry.register_plugin(Plugin(), "twins")
    assert "twin" not in {e.name for e in registry.all("sampler")}


def test_a_misspelt_hook_is_an_error_not_silence(make_dist):
    make_dist(
        "typo-plugin",
        "1.0",
        {"typo": ("typo_diffkit_plugin", "from diffkit import hookimpl\n\n@hookimpl\ndef diffkit_schedule():\n    return []\n")},
    )
    registry = diffkit.load_plugins()
    [failed] = registry.failed()
    assert failed.name == "typo"
    assert "unknown hook 'diffkit_schedule'" in failed.error and "did you mean 'diffkit_schedules'" in failed.error
    with pytest.raises(PluginError, match="unknown hook 'diffkit_schedule'"):
        diffkit.load_plugins(strict=True)


def test_an_optional_hook_from_a_newer_api_is_allowed():
    class Plugin:
        @hookimpl(optionalhook=True)
        def diffkit_schedulers_v2(self):
            return []

        @hookimpl
        def diffkit_samplers(self):
            return [Component("future-proof", lambda p, c: None, Params)]

    registry = diffkit.load_plugins(autoload=False)
    assert registry.register_plugin(Plugin(), "forward").status == "loaded"
    assert registry.get("sampler", "future-proof").plugin == "forward"


def test_hook_with_a_wrong_signature_is_rejected():
    class Plugin:
        @hookimpl
        def diffkit_samplers(self, unexpected):
            return []

    registry = diffkit.load_plugins(autoload=False)
    with pytest.raises(PluginError, match="plugin 'wrong-sig' could not be registered"):
        registry.register_plugin(Plugin(), "wrong-sig")


# -- registering plugins by hand --------------------------------------------------------------
class HalvingParams(Params):
    """Halve ε̂ (a useless sampler that only exists for this test)."""

    factor: float = Field(0.5, gt=0, description="What ε̂ is multiplied by.")


class HandPlugin:
    @hookimpl
    def diffkit_samplers(self):
        return [Component("halving", lambda p, ctx: ("halving", p.factor), HalvingParams, "Test sampler.")]


def test_register_and_unregister_a_plain_python_object():
    registry = diffkit.load_plugins(autoload=False)
    g0 = registry.generation
    info = registry.register_plugin(HandPlugin())
    assert info.name == "HandPlugin" and info.status == "loaded"
    assert (info.distribution, info.version, info.builtin) == (None, None, False)
    assert registry.generation > g0
    entry = registry.get("sampler", "halving")
    assert (entry.plugin, entry.distribution, entry.qualified) == ("HandPlugin", None, "HandPlugin:halving")
    assert entry.source == "plugin 'HandPlugin'"
    assert registry.build("sampler", {"type": "halving", "factor": 2.0}) == ("halving", 2.0)
    # the spec model follows the registry
    spec = validate_spec({**BASE_SPEC, "sampler": {"type": "halving"}}, registry)
    assert spec.sampler.type == "halving" and spec.sampler.factor == 0.5

    with pytest.raises(PluginError, match="already registered"):
        registry.register_plugin(HandPlugin(), "HandPlugin")

    g1 = registry.generation
    registry.unregister_plugin("HandPlugin")
    assert registry.generation > g1
    assert "HandPlugin" not in {p.name for p in registry.plugins}
    assert not registry.pm.has_plugin("HandPlugin")
    with pytest.raises(ComponentLookupError, match="unknown sampler 'halving'"):
        registry.get("sampler", "halving")
    with pytest.raises(SpecError, match="unknown sampler 'halving'"):
        validate_spec({**BASE_SPEC, "sampler": {"type": "halving"}}, registry)
    # and it can be registered again under a name of our choosing
    registry.register_plugin(HandPlugin(), "again", distribution="hand-made", version="0.1")
    assert registry.get("sampler", "again:halving").version == "0.1"


def test_register_a_module_object(tmp_path, monkeypatch):
    (tmp_path / "hand_module_plugin.py").write_text(textwrap.dedent(ACME_PLUGIN), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        module = importlib.import_module("hand_module_plugin")
        registry = diffkit.load_plugins(autoload=False)
        info = registry.register_plugin(module)
        assert info.name == "hand_module_plugin"
        assert registry.get("schedule", "acme-sigmoid").plugin == "hand_module_plugin"
    finally:
        sys.modules.pop("hand_module_plugin", None)


def test_an_unregistered_builtin_takes_its_components_with_it():
    registry = diffkit.load_plugins()
    registry.unregister_plugin("diffkit.schedules")
    registry.unregister_plugin("diffkit.processes")
    assert registry.all("schedule") == []
    with pytest.raises(ComponentLookupError, match=r"Available: none \(is a plugin missing\?\)"):
        registry.get("schedule", "linear")
