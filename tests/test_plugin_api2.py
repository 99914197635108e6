"""Plugin API version 2, tested as a plugin author meets it.

Each plugin of tests/broken_plugins/ is written into a throwaway distribution on
``sys.path`` (``make_dist``), found through its entry point as any installed plugin is,
and is named by ``diffkit plugins --check``, refused with a message naming it, or works
where it should; no traceback reaches the user of the command line.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit import BuildContext, PluginError, SpecError
from diffkit.cli import main
from diffkit.hookspecs import MIGRATION_PAGE
from diffkit.pipeline import Pipeline
from diffkit.sampling import is_step_sampler
from diffkit.spec import validate_spec
from diffkit.testing import ConformanceError, check_dataset, check_sampler, check_schedule, reference_schedule

BROKEN = Path(__file__).resolve().parent / "broken_plugins"
ROOT = Path(__file__).resolve().parents[1]
POINTS = {"data": {"type": "moons", "n": 64}, "denoiser": {"type": "mlp", "hidden": 8, "depth": 1}}
TINY_TRAIN = {"steps": 3, "batch_size": 16, "preview": 0, "ema_decay": 0}


def install(make_dist, case: str, dist: str | None = None, version: str = "1.0", ep: str | None = None) -> str:
    """The plugin ``tests/broken_plugins/CASE.py`` installed as distribution ``dist``; returns the entry-point name."""
    dist = dist or f"acme-{case.replace('_', '-')}"
    ep = ep or case.replace("_", "-")
    module = f"{dist.replace('-', '_')}_{version.replace('.', '_')}_plugin"
    make_dist(dist, version, {ep: (module, (BROKEN / f"{case}.py").read_text(encoding="utf-8"))})
    return ep


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def check(capsys) -> tuple[int, list[str]]:
    code, out, _ = cli(capsys, "plugins", "--check", "--json")
    return code, json.loads(out)["problems"]


def write_spec(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


# -- plugins --check names the broken ones ---------------------------------------------------------
@pytest.mark.parametrize(
    "case, expected",
    [
        ("wrong_hook", "plugin 'wrong-hook' (acme-wrong-hook 1.0) failed to load: plugin 'wrong-hook' implements an"
         " unknown hook 'diffkit_schedule'; did you mean 'diffkit_schedules'?"),
        ("import_failure", "plugin 'import-failure' (acme-import-failure 1.0) failed to load: ModuleNotFoundError: No"
         " module named 'diffkit_missing_dependency'"),
        ("duplicate_name", "schedule 'linear' is provided by more than one plugin: plugin 'diffkit.schedules' from"
         " diffkit"),
        ("v1_sampler", "sampler 'reverse-sde-v1' of plugin 'v1-sampler' (acme-v1-sampler 1.0) is a plugin API version 1"
         " sampler (ReverseSDE, a whole loop over a discrete table's integer timesteps)"),
    ],
)
def test_check_names_each_broken_plugin(make_dist, capsys, case, expected):
    install(make_dist, case)
    code, problems = check(capsys)
    assert code == 1
    assert [p for p in problems if expected in p], problems
    code, out, err = cli(capsys, "plugins", "--check")
    assert code == 1 and expected in out and "Traceback" not in out + err


def test_check_points_a_version_1_sampler_at_the_migration_page(make_dist, capsys):
    install(make_dist, "v1_sampler")
    [problem] = [p for p in check(capsys)[1] if "reverse-sde-v1" in p]
    assert problem.endswith(f"rewrite it as a step of the core's loop ({MIGRATION_PAGE})")


@pytest.mark.parametrize("case", ["v1_schedule", "unbounded_parameter", "non_valueerror_factory", "wrong_output_shape", "global_rng"])
def test_plugins_whose_faults_only_show_when_used_pass_check(make_dist, capsys, case):
    """What --check cannot see without running the components: these load cleanly."""
    install(make_dist, case)
    code, problems = check(capsys)
    assert (code, problems) == (0, [])


# -- version-1 plugins keep loading ------------------------------------------------------------------
def test_a_version_1_schedule_plugin_loads_conforms_trains_and_samples(make_dist):
    install(make_dist, "v1_schedule")
    registry = diffkit.load_plugins()
    entry = registry.get("schedule", "old-cosine")
    assert (entry.api, entry.distribution) == (1, "acme-v1-schedule")
    rows = {(r["kind"], r["name"]): r for r in registry.rows()}
    assert rows["schedule", "old-cosine"]["api"] == 1 and rows["schedule", "linear"]["api"] == diffkit.API_VERSION
    diffkit.set_registry(registry)
    check_schedule("old-cosine")
    check_schedule("old-linear", {"timesteps": 50})
    for sampler in ("ddpm", "ddim", "euler"):
        pipe = Pipeline.from_spec(
            {**POINTS, "schedule": {"type": "old-linear", "timesteps": 50}, "sampler": {"type": sampler, "steps": 10},
             "train": TINY_TRAIN},
            registry,
        )
        pipe.fit(progress=False)
        x = pipe.sample(32, seed=0)
        assert x.shape == (32, 2) and torch.isfinite(x).all()
        assert torch.equal(x, pipe.sample(32, seed=0))


def _template_step_sampler():
    import importlib.util

    path = ROOT / "examples" / "plugin-template" / "src" / "diffkit_sigmoid" / "sampler.py"
    spec = importlib.util.spec_from_file_location("template_sampler_v2", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic resolves the Params' annotations in it
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_version_1_sampler_runs_unchanged_on_a_table_and_its_step_rewrite_draws_the_same_numbers(make_dist):
    """The adapter for a version-1 sampler is exact: on a discrete table the pipeline calls
    the loop itself with the model's ε̂; and the migration page's rewrite of it as a step
    draws the same samples from the same seed (to float32 rounding)."""
    install(make_dist, "v1_sampler")
    registry = diffkit.load_plugins()
    diffkit.set_registry(registry)
    old = registry.build("sampler", {"type": "reverse-sde-v1", "steps": 40})
    assert not is_step_sampler(old) and registry.get("sampler", "reverse-sde-v1").api == 1
    step = _template_step_sampler()
    new = step.ReverseSDE(step.ReverseSDEParams(steps=40, clip_denoised=None))
    assert is_step_sampler(new)
    schedule = reference_schedule(200)
    from diffkit.oracles import GaussianData

    oracle = GaussianData(torch.tensor([1.0, -0.5], dtype=torch.float64), torch.eye(2, dtype=torch.float64) * 0.3)
    predict = oracle.predict(schedule)
    draws = [
        sampler(predict, schedule, (500, 2), generator=torch.Generator().manual_seed(3), steps=40)
        for sampler in (old, new)
    ]
    torch.testing.assert_close(draws[0], draws[1], rtol=1e-4, atol=1e-4)
    # and through a pipeline on a table, trained with it
    pipe = Pipeline.from_spec(
        {**POINTS, "schedule": {"type": "linear", "timesteps": 50}, "sampler": {"type": "reverse-sde-v1", "steps": 10},
         "train": TINY_TRAIN},
        registry,
    )
    pipe.fit(progress=False)
    assert torch.equal(pipe.sample(16, seed=1), pipe.sample(16, seed=1))


def test_a_version_1_sampler_on_a_continuous_process_is_refused_naming_plugin_api_version_and_migration(make_dist, tmp_path, capsys):
    install(make_dist, "v1_sampler")
    registry = diffkit.load_plugins()
    body = {**POINTS, "schedule": {"type": "edm"}, "sampler": {"type": "reverse-sde-v1", "steps": 10}}
    with pytest.raises(SpecError) as err:
        validate_spec(body, registry)
    [(path, message)] = err.value.problems
    assert path == "sampler"
    assert message.startswith(
        "sampler 'reverse-sde-v1' of plugin 'v1-sampler' (acme-v1-sampler 1.0) is a plugin API version 1 sampler"
    )
    assert "continuous process" in message and message.endswith(MIGRATION_PAGE)
    with pytest.raises(diffkit.DiffkitError, match=r"plugin 'v1-sampler' \(acme-v1-sampler 1.0\) is a plugin API version 1"):
        Pipeline(schedule="edm", sampler={"type": "reverse-sde-v1"}, data={"type": "moons", "n": 64}, registry=registry)
    code, _, err_text = cli(capsys, "validate", str(write_spec(tmp_path, body)))
    assert code == 1 and "Traceback" not in err_text and MIGRATION_PAGE in err_text


def test_a_plugin_declaring_api_2_with_a_whole_loop_sampler_is_told_what_version_2_means(make_dist):
    source = (BROKEN / "v1_sampler.py").read_text(encoding="utf-8").replace("DIFFKIT_API_VERSION = 1", "DIFFKIT_API_VERSION = 2")
    make_dist("acme-mislabelled", "2.0", {"mislabelled": ("acme_mislabelled_plugin", source)})
    registry = diffkit.load_plugins()
    with pytest.raises(PluginError) as err:
        registry.build("sampler", "reverse-sde-v1")
    assert str(err.value).startswith(
        "sampler 'reverse-sde-v1' of plugin 'mislabelled' (acme-mislabelled 2.0) declares plugin API version 2, but its"
        " sampler ReverseSDE (spec section 'sampler') is a whole sampling loop"
    )
    assert MIGRATION_PAGE in str(err.value) and "declare DIFFKIT_API_VERSION = 1" in str(err.value)


# -- 1. build takes the build context -----------------------------------------------------------------
def test_build_takes_the_data_shape_through_ctx():
    net = diffkit.build("denoiser", "mlp", BuildContext(sample_shape=(3,)), hidden=8, depth=1)
    assert net(torch.zeros(5, 3), torch.zeros(5)).shape == (5, 3)
    images = diffkit.build("denoiser", {"type": "unet", "channels": 8}, ctx=BuildContext(sample_shape=(1, 8, 8), data_kind="images"))
    assert images(torch.zeros(2, 1, 8, 8), torch.zeros(2)).shape == (2, 1, 8, 8)
    with pytest.raises(SpecError, match="denoiser: the mlp denoiser needs the data's sample shape"):
        diffkit.build("denoiser", "mlp")
    with pytest.raises(TypeError, match="ctx must be a diffkit.BuildContext, got dict"):
        diffkit.build("denoiser", "mlp", {"sample_shape": (2,)})


# -- 2. validate builds every section ------------------------------------------------------------------
def test_validate_refuses_a_points_only_denoiser_on_images_at_its_path(make_dist, tmp_path, capsys):
    install(make_dist, "non_valueerror_factory")
    registry = diffkit.load_plugins()
    body = {"data": {"type": "digits"}, "denoiser": {"type": "fourier-mlp"}}
    with pytest.raises(SpecError) as err:
        validate_spec(body, registry)
    assert err.value.problems == [
        ("denoiser", "fourier-mlp serves points [D] only, and this data has samples of shape (1, 8, 8)")
    ]
    code, _, text = cli(capsys, "validate", str(write_spec(tmp_path, body)))
    assert code == 1 and "denoiser: fourier-mlp serves points [D] only" in text and "Traceback" not in text
    assert validate_spec({"data": {"type": "moons"}, "denoiser": {"type": "fourier-mlp"}}, registry)


def test_validate_builds_a_large_network_on_the_meta_device(monkeypatch):
    """A U-Net of ~600 M parameters validates without allocating it."""
    built = []
    from diffkit import spec as spec_module

    original = spec_module._build_cheaply

    def spy(registry, kind, section, ctx, path):
        out = original(registry, kind, section, ctx, path)
        built.append((kind, out))
        return out

    monkeypatch.setattr(spec_module, "_build_cheaply", spy)
    body = {"data": {"type": "digits"}, "denoiser": {"type": "unet", "channels": 1024, "channel_mult": [1, 2, 4]}}
    validate_spec(body)
    [net] = [obj for kind, obj in built if kind == "denoiser"]
    params = list(net.parameters())
    assert sum(p.numel() for p in params) > 10**8 and {p.device.type for p in params} == {"meta"}


# -- 3. an exception from a plugin's code is one clean error ---------------------------------------------
def test_a_plugins_exception_in_validate_is_one_message_naming_plugin_component_and_section(make_dist, tmp_path, capsys):
    install(make_dist, "unbounded_parameter")
    path = write_spec(tmp_path, {**POINTS, "schedule": {"type": "rho-table", "rho": 0}})
    code, out, err = cli(capsys, "validate", str(path))
    assert code == 1 and "Traceback" not in out + err
    assert (
        "schedule: schedule 'rho-table' of plugin 'unbounded-parameter' (acme-unbounded-parameter 1.0) raised"
        " ZeroDivisionError in the spec section 'schedule': float division by zero. This is a fault in the plugin's"
        " code"
    ) in err
    assert err.count("\n") == 2  # "diffkit: error: 1 problem in …:" and the problem
    code, out, err = cli(capsys, "validate", str(path), "--debug")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err


def test_a_non_valueerror_factory_names_its_plugin_in_validate_and_in_python(make_dist, tmp_path, capsys):
    install(make_dist, "non_valueerror_factory")
    registry = diffkit.load_plugins()
    body = {"data": {"type": "gaussians", "n": 64}, "denoiser": {"type": "fourier-mlp"}}
    validate_spec(body, registry)  # 2-D points: fine
    body["data"] = {"type": "swiss-roll", "n": 64}
    from diffkit.interfaces import TensorData

    with pytest.raises(PluginError) as err:
        Pipeline(denoiser="fourier-mlp", data=TensorData(torch.zeros(8, 5)), registry=registry)
    assert str(err.value).startswith(
        "denoiser 'fourier-mlp' of plugin 'non-valueerror-factory' (acme-non-valueerror-factory 1.0) raised IndexError"
        " in the spec section 'denoiser': list index out of range."
    )
    assert isinstance(err.value.__cause__, IndexError)


# -- 4. a denoiser of the wrong output shape ----------------------------------------------------------------
def test_a_denoiser_of_the_wrong_shape_is_refused_at_the_first_step_of_training_and_of_sampling(make_dist, tmp_path, capsys):
    install(make_dist, "wrong_output_shape")
    registry = diffkit.load_plugins()
    body = {**POINTS, "denoiser": {"type": "narrow"}, "train": TINY_TRAIN}
    message = (
        "denoiser 'narrow' of plugin 'wrong-output-shape' (acme-wrong-output-shape 1.0) returned a tensor of shape"
        " [2, 1] for x_t of shape [2, 2]; a denoiser must return a tensor of x_t's shape"
    )
    pipe = Pipeline.from_spec(body, registry)
    with pytest.raises(diffkit.DiffkitError, match=re.escape(message.replace("[2, ", "[16, "))):
        pipe.fit(progress=False)  # at the first step
    assert pipe.steps_trained == 0
    with pytest.raises(diffkit.DiffkitError, match=re.escape(message.replace("[2, ", "[4, "))):
        pipe.sample(4, seed=0)
    code, _, err = cli(capsys, "train", str(write_spec(tmp_path, body)), "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 1 and message.replace("[2, ", "[16, ") in err and "Traceback" not in err


# -- global RNG: the conformance kit names it, and seeded sampling refuses it ----------------------------------
def test_the_kit_names_a_sampler_drawing_from_the_global_generator(make_dist):
    install(make_dist, "global_rng")
    diffkit.set_registry(diffkit.load_plugins())
    with pytest.raises(ConformanceError, match=r"sampler 'global-ddpm': two runs with the same seed differ"):
        check_sampler("global-ddpm", {"steps": 50}, n=1000)


def test_seeded_sampling_refuses_a_sampler_drawing_from_the_global_generator(make_dist):
    install(make_dist, "global_rng")
    registry = diffkit.load_plugins()
    body = {**POINTS, "schedule": {"type": "linear", "timesteps": 50}, "train": TINY_TRAIN}
    pipe = Pipeline.from_spec({**body, "sampler": {"type": "global-ddpm", "steps": 10}}, registry)
    with pytest.raises(diffkit.DiffkitError) as err:
        pipe.sample(8, seed=0)
    assert str(err.value).startswith(
        "sampling drew random numbers from torch's global generator, so seed=0 does not reproduce these samples;"
        " sampler 'global-ddpm' of plugin 'global-rng' (acme-global-rng 1.0) must draw its noise from the sampling loop"
    )
    assert pipe.sample(8).shape == (8, 2)  # without a seed nothing is promised
    builtin = Pipeline.from_spec({**body, "sampler": {"type": "ddpm", "steps": 10}}, registry)
    assert torch.equal(builtin.sample(8, seed=0), builtin.sample(8, seed=0))


# -- the dataset check ---------------------------------------------------------------------------------------
def test_check_dataset_passes_the_builtins_and_names_a_broken_dataset(diffkit_plugin):
    for name in ("moons", "gaussians", "swiss-roll", "digits"):
        check_dataset(name)
    from diffkit import Component, Params, TensorData, hookimpl

    class Broken:
        @hookimpl
        def diffkit_datasets(self):
            return [
                Component("unscaled", lambda p, ctx: TensorData(torch.full((4, 1, 2, 2), 3.0), kind="images"), Params),
                Component("seedless", lambda p, ctx: TensorData(torch.randn(8, 2)), Params),
                Component("misdeclared", lambda p, ctx: TensorData(torch.zeros(8, 3)), Params, data_shape=lambda p: (2,)),
                Component("bad-label", lambda p, ctx: TensorData(torch.zeros(4, 2), torch.tensor([0, 1, 2, 5]), num_classes=3), Params),
            ]

    with diffkit_plugin(Broken(), "broken-data"):
        for name, needle in [
            ("unscaled", "images must lie in [-1, 1] (model space), dataset[0] spans [3, 3]"),
            ("seedless", "built twice with seed 0, item 0 differs"),
            ("misdeclared", "its component's data_shape(params) says (2,), but the built dataset's sample_shape is (3,)"),
            ("bad-label", "dataset[3]'s label 5 is outside [0, num_classes = 3)"),
        ]:
            with pytest.raises(ConformanceError) as err:
                check_dataset(name)
            assert str(err.value).startswith(f"data '{name}': ") and needle in str(err.value), str(err.value)


# -- 5. run directories load each component from the plugin that trained it ------------------------------------
RUN_SPEC = {**POINTS, "schedule": {"type": "old-linear", "timesteps": 50}, "sampler": {"type": "ddim", "steps": 10}, "train": TINY_TRAIN}


@pytest.fixture
def trained_run(make_dist, tmp_path):
    install(make_dist, "v1_schedule", dist="acme-tables", ep="tables")
    registry = diffkit.load_plugins()
    pipe = Pipeline.from_spec(RUN_SPEC, registry)
    pipe.fit(progress=False)
    run = pipe.save(tmp_path / "run")
    return run, pipe.sample(64, seed=5)


def test_a_duplicate_installed_after_training_changes_nothing(trained_run, make_dist, capsys, tmp_path):
    run, before = trained_run
    install(make_dist, "v1_schedule", dist="acme-impostor", ep="impostor")  # old-linear again, from another plugin
    registry = diffkit.load_plugins()
    assert registry.is_duplicate(registry.get("schedule", "tables:old-linear"))
    loaded = Pipeline.load(run, registry)
    assert torch.equal(loaded.sample(64, seed=5), before)
    assert loaded.spec.schedule.type == "tables:old-linear"
    code, _, err = cli(capsys, "sample", str(run), "--n", "64", "--seed", "5", "--out", str(tmp_path / "x.npy"), "--no-progress")
    assert code == 0, err
    import numpy as np

    assert torch.equal(torch.from_numpy(np.load(tmp_path / "x.npy")), before)


def test_a_run_whose_plugin_is_gone_names_it_with_its_version(trained_run, make_dist):
    run, _ = trained_run
    import sys

    for entry in list(sys.path):
        if entry.endswith("site-packages") and (Path(entry) / "acme_tables-1.0.dist-info").is_dir():
            import shutil

            shutil.rmtree(Path(entry) / "acme_tables-1.0.dist-info")
    import importlib

    importlib.invalidate_caches()
    with pytest.raises(diffkit.DiffkitError) as err:
        Pipeline.load(run, diffkit.load_plugins())
    assert str(err.value) == (
        f"{run}: the run's schedule is schedule 'old-linear' of plugin 'tables' (acme-tables 1.0), which is not"
        " installed; install it with: pip install 'acme-tables==1.0'"
    )


# -- 6. weights that do not fit list every tensor ------------------------------------------------------------
def test_a_new_release_that_adds_a_layer_lists_the_tensors_and_names_both_versions(make_dist, tmp_path):
    install(make_dist, "non_valueerror_factory", dist="acme-fourier", ep="fourier")
    registry = diffkit.load_plugins()
    body = {"data": {"type": "moons", "n": 64}, "denoiser": {"type": "fourier-mlp", "hidden": 8}, "train": TINY_TRAIN}
    pipe = Pipeline.from_spec(body, registry)
    pipe.fit(progress=False)
    run = pipe.save(tmp_path / "run")
    # release 1.1 adds a layer and widens the features of the same component
    import shutil
    import sys

    site = next(Path(p) for p in sys.path if (Path(p) / "acme_fourier-1.0.dist-info").is_dir())
    shutil.rmtree(site / "acme_fourier-1.0.dist-info")
    source = (BROKEN / "non_valueerror_factory.py").read_text(encoding="utf-8")
    source = source.replace("nn.SiLU(), nn.Linear(p.hidden, dim))", "nn.SiLU(), nn.Linear(p.hidden, p.hidden), nn.SiLU(), nn.Linear(p.hidden, dim))")
    source = source.replace("torch.randn(dim, p.features,", "torch.randn(dim, p.features + 1,").replace("2 * p.features + 1", "2 * p.features + 3")
    make_dist("acme-fourier", "1.1", {"fourier": ("acme_fourier_1_1_plugin", source)})
    with pytest.raises(diffkit.DiffkitError) as err:
        Pipeline.load(run, diffkit.load_plugins())
    text = str(err.value)
    assert "do not fit the denoiser its spec describes (denoiser 'fourier-mlp' of plugin 'fourier' (acme-fourier 1.1))" in text
    assert "1 missing: net.4.bias" in text or "2 missing: net.4.bias, net.4.weight" in text
    assert "mis-shaped: freq (saved [2, 16], expected [2, 17]), net.0.weight (saved [8, 33], expected [8, 35]), net.2.bias (saved [2], expected [8]), net.2.weight (saved [2, 8], expected [8, 8])" in text
    assert "denoiser: denoiser 'fourier-mlp' was trained with plugin 'fourier' (acme-fourier 1.0), and acme-fourier 1.1 is installed" in text


RAISING_NET = '''
import torch
from torch import nn
from diffkit import Component, Params, hookimpl

DIFFKIT_API_VERSION = 2


class Raising(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x, c, cond=None):
        if not self.training:
            return {}["eval-mode branch"]  # the planted bug: a KeyError outside training
        return self.w * x


@hookimpl
def diffkit_denoisers():
    return [Component("raising", lambda p, ctx: Raising(), Params, "Fails in eval mode.")]
'''


def test_an_exception_in_a_plugins_code_while_sampling_names_the_plugin(make_dist, tmp_path, capsys):
    make_dist("acme-raising", "0.3", {"raising": ("acme_raising_plugin", RAISING_NET)})
    registry = diffkit.load_plugins()
    pipe = Pipeline.from_spec({**POINTS, "denoiser": {"type": "raising"}, "train": TINY_TRAIN}, registry)
    pipe.fit(progress=False)
    with pytest.raises(PluginError) as err:
        pipe.sample(4, seed=0)
    assert str(err.value).startswith(
        "denoiser 'raising' of plugin 'raising' (acme-raising 0.3) raised KeyError while sampling (spec section"
        " 'denoiser'): 'eval-mode branch'. This is a fault in the plugin's code"
    )
    assert isinstance(err.value.__cause__, KeyError)
    run = pipe.save(tmp_path / "run")
    code, _, text = cli(capsys, "sample", str(run), "--n", "4", "--out", str(tmp_path / "x.npy"), "--no-progress")
    assert code == 1 and "Traceback" not in text and "denoiser 'raising' of plugin 'raising' (acme-raising 0.3)" in text


# -- a label-free guidance, installed as a third party's distribution -------------------------------
def test_a_label_free_guidance_plugin_installs_validates_trains_and_steers_unlabelled_samples(
    make_dist, capsys, tmp_path
):
    ep = install(make_dist, "label_free_guidance", dist="acme-box", version="0.3")
    assert ep not in {p.split(":")[0] for p in check(capsys)[1]}
    code, out, _ = cli(capsys, "plugins", "--json")
    rows = [r for r in json.loads(out) if r.get("name") == "toward-box"]
    assert rows and rows[0]["kind"] == "guidance" and rows[0]["distribution"] == "acme-box", rows
    spec = {
        "data": {"type": "moons", "n": 2000, "noise": 0.05},
        "schedule": {"type": "linear", "timesteps": 100, "beta_end": 0.1},
        "denoiser": {"type": "mlp", "hidden": 64, "depth": 2},
        "sampler": {"type": "ddim", "steps": 25},
        "guidance": {"type": "toward-box", "scale": 1.0},
        "train": {"steps": 400, "batch_size": 256, "preview": 0, "lr": 0.003, "device": "cpu"},
    }
    path = write_spec(tmp_path, spec)
    assert cli(capsys, "validate", str(path))[0] == 0
    (tmp_path / "bad").mkdir()
    bad = write_spec(tmp_path / "bad", {**spec, "guidance": {"type": "toward-box", "low": "left"}})
    code, _, err = cli(capsys, "validate", str(bad))
    assert code == 1 and "guidance.low" in err
    run = tmp_path / "run"
    assert cli(capsys, "train", str(path), "--out", str(run), "--no-progress")[0] == 0
    meta = json.loads((run / "meta.json").read_text())
    assert "acme-box" in json.dumps(meta) and "0.3" in json.dumps(meta)

    def inside(scale: str) -> float:
        out = tmp_path / f"x{scale}.npy"
        argv = ["sample", str(run), "--n", "500", "--seed", "0", "--out", str(out), "--no-progress"]
        code, _, err = cli(capsys, *argv, "--guidance-scale", scale)
        assert code == 0, err
        import numpy as np

        x = np.load(out)
        return float(((x >= [1.2, -0.6]) & (x <= [2.2, 0.2])).all(1).mean())

    shares = [inside(s) for s in ("0", "4", "16")]
    assert shares[0] < shares[1] < shares[2] and shares[0] < 0.25 and shares[2] > 0.6, shares
