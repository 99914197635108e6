"""The conformance kit (diffkit.testing): every built-in component passes it, and it
catches deliberately broken components with a message that says what is wrong.

The built-ins are taken from the registry, so a component added later is checked
without touching this file (denoisers need a line in ``DENOISER_SHAPES``).
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field
from torch import nn

import diffkit
from diffkit import BuildContext, Component, Params, Schedule, SpecError, hookimpl
from diffkit.interfaces import CondPredict
from diffkit.testing import (
    ConformanceError,
    check_denoiser,
    check_guidance,
    check_objective,
    check_params,
    check_sampler,
    check_schedule,
    reference_schedule,
)
from diffkit.plugins import load_plugins
from diffkit.testing import strategies as dks

# The built-ins only, whatever else is installed or set in DIFFKIT_* variables.
REGISTRY = load_plugins(autoload=False, include=(), block=(), block_builtins=(), strict=True)

# Parameters a component needs beyond its defaults to be built at all.
REQUIRED_PARAMS = {
    ("guidance", "autoguidance"): {"guide_step": 1},
    # Ancestral steps at the default 50 on T = 1000 shrink this Gaussian's variance from 0.5
    # to 0.415 (the discretisation's own bias: 50-step ddpm and ddim with η = 1 give the
    # same 0.415 bit for bit); 200 steps bring it within the kit's tolerance.
    ("sampler", "euler-ancestral"): {"steps": 200},
}
# The sample shapes each built-in denoiser serves (points, images, or both).
DENOISER_SHAPES = {"mlp": [(2,), (1, 8, 8)], "unet": [(1, 8, 8), (3, 8, 8)]}


def names(kind: str) -> list[str]:
    return sorted(e.name for e in REGISTRY.all(kind))


def builtin(kind: str, name: str, **params: object) -> object:
    return REGISTRY.build(kind, {"type": name, **params})


# -- every built-in passes ---------------------------------------------------------------------
@pytest.mark.parametrize("name", names("schedule"))
def test_builtin_schedules_conform(name):
    check_schedule(name)
    if "timesteps" in diffkit.get_registry().get("schedule", name).component.params.model_fields:  # a discrete table
        check_schedule(name, {"timesteps": 50})


@pytest.mark.parametrize("name", names("schedule"))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_every_valid_parameter_set_gives_a_conforming_schedule_or_a_clear_error(name, data):
    section = data.draw(dks.schedule_params(name, max_timesteps=300))
    try:
        sch = REGISTRY.build("schedule", section, BuildContext(data_diameter=10.0))  # ve's sigma_max: null reads it
    except SpecError as exc:  # parameters that validate one by one but give no valid ᾱ
        assert "ᾱ" in str(exc), exc
        return
    check_schedule(sch)


@pytest.mark.parametrize("name", names("sampler"))
def test_builtin_samplers_conform(name):
    # pc's default corrector step couples the batch (Song et al.'s batch norms), as its docs say
    check_sampler(name, REQUIRED_PARAMS.get(("sampler", name)), per_sample=name not in ("pc", "diffkit.langevin:pc"))


def test_every_builtin_denoiser_has_its_shapes_listed():
    assert set(names("denoiser")) <= set(DENOISER_SHAPES), "add the new denoiser's sample shapes to DENOISER_SHAPES"


@pytest.mark.parametrize(
    "name, shape", [(n, s) for n in names("denoiser") for s in DENOISER_SHAPES.get(n, [])], ids=str
)
@pytest.mark.parametrize("num_classes", [None, 3])
def test_builtin_denoisers_conform(name, shape, num_classes):
    check_denoiser(name, {"num_classes": num_classes}, sample_shape=shape, num_classes=num_classes)


@pytest.mark.parametrize("name", names("objective"))
def test_builtin_objectives_conform(name):
    check_objective(name)


@pytest.mark.parametrize("name", ["epsilon", "x0", "v"])
def test_objectives_with_min_snr_weighting_conform(name):
    check_objective(name, {"min_snr_gamma": 5.0})


@pytest.mark.parametrize("name", names("guidance"))
def test_builtin_guidance_conforms(name):
    check_guidance(name, REQUIRED_PARAMS.get(("guidance", name)))


@pytest.mark.parametrize("kind", ["data", "schedule", "denoiser", "objective", "sampler", "guidance"])
def test_builtin_params_models_conform(kind):
    for entry in REGISTRY.all(kind):
        check_params(entry.component.params, f"{kind} '{entry.name}'")


# -- broken schedules ----------------------------------------------------------------------------
class BumpySchedule(Schedule):
    """ᾱ rises once in the middle: noise is taken away at one step."""

    def __init__(self) -> None:
        super().__init__(reference_schedule(20).alphas_cumprod)
        bumped = self.alphas_cumprod.clone()
        bumped[10] = bumped[9] * 1.01
        self.alphas_cumprod = bumped


class OffBetas(Schedule):
    """β off by a factor from what ᾱ implies."""

    @property
    def betas(self) -> torch.Tensor:
        return 1.1 * super().betas


class VarianceExplodingQSample(Schedule):
    """q_sample with ᾱ where √ᾱ belongs."""

    def q_sample(self, x0, t, noise):
        a = self.alpha_bar(t, x0).to(x0.dtype)
        return a * x0 + (1 - a).sqrt() * noise


def test_a_non_monotone_alpha_bar_is_caught():
    with pytest.raises(ConformanceError, match=r"schedule BumpySchedule: ᾱ_t must be strictly decreasing.*ᾱ_10"):
        check_schedule(BumpySchedule())


def test_a_plugin_whose_factory_gives_a_non_monotone_alpha_bar_is_caught(diffkit_plugin):
    class ZigzagParams(Params):
        timesteps: int = Field(10, ge=2, description="Number of diffusion steps T.")

    def zigzag(params, ctx):
        abar = torch.linspace(0.9, 0.1, params.timesteps, dtype=torch.float64)
        abar[3] = 0.95
        return Schedule(abar)

    plugin = types.SimpleNamespace(
        diffkit_schedules=hookimpl(lambda: [Component("zigzag", zigzag, ZigzagParams, "Broken on purpose.")])
    )
    with diffkit_plugin(plugin, "zigzag-plugin"):
        with pytest.raises(ConformanceError, match=r"schedule 'zigzag': could not be built.*strictly decreasing"):
            check_schedule("zigzag")


def test_betas_inconsistent_with_alpha_bar_are_caught():
    with pytest.raises(ConformanceError, match="β is inconsistent with ᾱ"):
        check_schedule(OffBetas(reference_schedule(30).alphas_cumprod))


def test_a_wrong_q_sample_is_caught():
    with pytest.raises(ConformanceError, match=r"q_sample\(x_0, t, ε\) must be √ᾱ_t x_0"):
        check_schedule(VarianceExplodingQSample(reference_schedule(30).alphas_cumprod))


def test_a_non_schedule_is_caught():
    with pytest.raises(ConformanceError, match="must be a diffkit.Process"):
        check_schedule(torch.linspace(0.9, 0.1, 10))  # type: ignore[arg-type]


# -- broken samplers -----------------------------------------------------------------------------
class GlobalRandomDDPM:
    """DDPM that draws its noise from torch's global generator: it ignores the seed."""

    def __init__(self) -> None:
        self.ddpm = builtin("sampler", "ddpm", steps=50)

    def __call__(self, predict, schedule, shape, *, generator=None, **kwargs):
        return self.ddpm(predict, schedule, shape, generator=None, **kwargs)


class FixedSeedDDPM(GlobalRandomDDPM):
    """DDPM with a seed of its own: deterministic, but every seed gives the same samples."""

    def __call__(self, predict, schedule, shape, *, generator=None, **kwargs):
        return self.ddpm(predict, schedule, shape, generator=torch.Generator().manual_seed(0), **kwargs)


class NoiselessDDPM(GlobalRandomDDPM):
    """Ancestral sampling that forgets the noise of each step: it collapses toward the mean."""

    def __call__(self, predict, schedule, shape, *, generator=None, **kwargs):
        ddim = builtin("sampler", "ddim", steps=50, eta=0.0)
        x = ddim(predict, schedule, shape, generator=generator, **kwargs)
        return 0.5 * x + 0.5 * x.mean(0)


class Float64Sampler(GlobalRandomDDPM):
    """Ignores the asked dtype."""

    def __call__(self, predict, schedule, shape, *, generator=None, dtype=torch.float32, **kwargs):
        return self.ddpm(predict, schedule, shape, generator=generator, dtype=torch.float64, **kwargs)


def test_a_sampler_that_ignores_the_seed_is_caught():
    with pytest.raises(ConformanceError, match="two runs with the same seed differ.*`generator` argument"):
        check_sampler(GlobalRandomDDPM(), n=1000)


def test_a_sampler_with_a_seed_of_its_own_is_caught():
    with pytest.raises(ConformanceError, match="different seeds gave identical samples"):
        check_sampler(FixedSeedDDPM(), n=1000)


def test_a_sampler_that_does_not_recover_the_data_is_caught():
    with pytest.raises(ConformanceError, match=r"do not recover the data: mean .* covariance"):
        check_sampler(NoiselessDDPM(), n=1000)


def test_a_sampler_that_ignores_the_dtype_is_caught():
    with pytest.raises(ConformanceError, match=r"asked for \(1000, 2\) torch.float32 samples.*torch.float64"):
        check_sampler(Float64Sampler(), n=1000)


def test_a_sampler_that_calls_predict_out_of_range_is_caught():
    ddpm = builtin("sampler", "ddpm", steps=20)

    def off_by_one(predict, schedule, shape, **kwargs):
        return ddpm(lambda x, t: predict(x, t + 1), schedule, shape, **kwargs)

    with pytest.raises(ConformanceError, match=r"predict was called with t in \[\d+, 1000\], outside \[0, T − 1 = 999\]"):
        check_sampler(off_by_one, n=500)


# -- broken denoisers ----------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x_t, t, cond=None):
        return self.lin(x_t)


class BatchMixer(Tiny):
    """Centres each batch on its own mean: every output depends on the whole batch."""

    def forward(self, x_t, t, cond=None):
        return self.lin(x_t - x_t.mean(0, keepdim=True))


class UnusedLayer(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten = nn.Linear(2, 2)


class Flattens(Tiny):
    def forward(self, x_t, t, cond=None):
        return self.lin(x_t).flatten()


def test_a_denoiser_that_mixes_the_batch_is_caught():
    with pytest.raises(ConformanceError, match="denoiser BatchMixer: changing sample 0 of a batch changed the outputs"):
        check_denoiser(BatchMixer())


def test_batchnorm_is_fine_in_eval_mode():
    class Normed(Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(2)

        def forward(self, x_t, t, cond=None):
            return self.lin(self.norm(x_t))

    check_denoiser(Normed())


def test_a_denoiser_with_an_unused_layer_is_caught():
    with pytest.raises(ConformanceError, match=r"forgotten\.weight, forgotten\.bias receive no gradient"):
        check_denoiser(UnusedLayer())


def test_a_denoiser_that_changes_the_shape_is_caught():
    with pytest.raises(ConformanceError, match=r"must have x_t's shape.*got \(8,\)"):
        check_denoiser(Flattens())


def test_a_denoiser_that_rejects_labels_is_caught():
    with pytest.raises(ConformanceError, match="raised .* with labels"):
        check_denoiser(_LabelHater(), num_classes=3)


class _LabelHater(Tiny):
    def forward(self, x_t, t, cond=None):
        if cond is not None:
            raise ValueError("no labels here")
        return self.lin(x_t)


# -- broken objectives ---------------------------------------------------------------------------
def test_an_objective_whose_conversion_is_wrong_is_caught():
    v = builtin("objective", "v")

    class SignSlip(type(v)):  # type: ignore[misc]
        def to_eps(self, output, x_t, t, schedule):
            return -super().to_eps(output, x_t, t, schedule)

    with pytest.raises(ConformanceError, match=r"to_eps\(target, x_t, t\) must give back the true ε"):
        check_objective(SignSlip())


def test_an_objective_that_is_not_an_objective_is_caught():
    with pytest.raises(ConformanceError, match="must subclass diffkit.Objective"):
        check_objective(lambda net, sch, x0: 0.0)


# -- broken guidance -----------------------------------------------------------------------------
class ScaleOrDefault:
    """Classifier-free guidance that reads ``scale or self.scale``: scale 0 guides anyway."""

    requires_conditional_denoiser = True

    def __init__(self) -> None:
        self.scale = 3.0
        self.inner = builtin("guidance", "classifier-free")

    def wrap(self, predict: CondPredict, schedule, cond, *, scale=None):
        return self.inner.wrap(predict, schedule, cond, scale=scale or self.scale)


class Repelling(ScaleOrDefault):
    """Guidance with the sign of its term flipped: it pushes samples away from the label."""

    def wrap(self, predict: CondPredict, schedule, cond, *, scale=None):
        w = self.scale if scale is None else scale
        if w == 0:
            return lambda x, t: predict(x, t, cond)
        guided = self.inner.wrap(predict, schedule, cond, scale=w)
        return lambda x, t: 2 * predict(x, t, cond) - guided(x, t)


def test_guidance_that_moves_samples_at_scale_0_is_caught():
    with pytest.raises(ConformanceError, match="at scale 0 the guided prediction must be predict.*unchanged"):
        check_guidance(ScaleOrDefault())


def test_guidance_that_pushes_away_from_the_label_is_caught():
    with pytest.raises(ConformanceError, match=r"must move samples toward the asked label.*mean p\(y \| x_0\)"):
        check_guidance(Repelling(), n=500)


# -- the Params model, and the kit's own plumbing -------------------------------------------------
def test_a_params_field_without_description_is_caught():
    class Terse(Params):
        width: int = 3

    with pytest.raises(ConformanceError, match="field.*width have no description"):
        check_params(Terse, "denoiser 'terse'")


def test_an_unknown_name_is_reported():
    with pytest.raises(ConformanceError, match=r"sampler 'ddpn': not in the registry.*Did you mean 'ddpm'"):
        check_sampler("ddpn")


def test_the_registry_fixture_holds_only_builtins_and_becomes_the_process_wide_one(diffkit_registry, diffkit_plugin):
    assert diffkit.get_registry() is diffkit_registry
    assert all(p.builtin for p in diffkit_registry.plugins if p.status == "loaded")
    plugin = types.SimpleNamespace(
        diffkit_schedules=hookimpl(
            lambda: [Component("flat10", lambda p, ctx: reference_schedule(10), Params, "Ten linear steps.")]
        )
    )
    with diffkit_plugin(plugin, "flat") as entries:
        assert [e.qualified for e in entries] == ["flat:flat10"]
        check_schedule("flat10")
    assert "flat10" not in diffkit_registry.tags("schedule")
    assert not diffkit_registry.pm.has_plugin("flat")


@settings(max_examples=20, deadline=None)
@given(shape=dks.shapes(), dtype=dks.dtypes(), seed=dks.seeds())
def test_shape_dtype_and_seed_strategies_draw_usable_values(shape, dtype, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    assert x.ndim in (2, 4) and x.dtype == dtype


@settings(max_examples=20, deadline=None)
@given(section=dks.component_params("sampler", "ddpm"), ts=dks.timestep_batches(100, 5))
def test_params_strategy_draws_valid_sections(section, ts):
    assert REGISTRY.build("sampler", section) is not None
    assert ts.shape == (5,) and ts.dtype == torch.long and 0 <= int(ts.min()) and int(ts.max()) < 100
