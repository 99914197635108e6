"""Guidance: the guided sampler, classifier guidance and classifier-free guidance.

The mathematics is checked on a Gaussian mixture, whose noisy class posterior
p(y | x_t) and conditional denoisers E[ε | x_t, y] are known in closed form
(diffkit.oracles.GaussianMixture). Bayes' rule ties them together:

    ∇ log p(y | x_t) = ∇ log p(x_t | y) − ∇ log p(x_t) = −(ε(x_t, y) − ε(x_t, ∅)) / σ_t,

so classifier guidance of the unconditional oracle with the exact classifier at γ = 1
*is* the conditional oracle, and classifier-free guidance with w equals classifier
guidance with γ = 1 + w. The pipeline, run-directory and CLI tests use tiny networks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import diffkit
from diffkit import BuildContext, DiffkitError, SpecError
from diffkit.cli import main
from diffkit.interfaces import LabelledPredict
from diffkit.oracles import GaussianMixture
from diffkit.spec import json_schema, nested_sections, to_dict, validate_spec
from diffkit.train import drop_labels

REGISTRY = diffkit.get_registry()
K = 4
N = 1000
LABEL = 1
STEPS = 50


def base_samplers() -> list[str]:
    """Every registered sampler that can be guided: all but those with sections of their
    own (the guided sampler itself), so new samplers are picked up as they land."""
    return sorted(e.name for e in REGISTRY.all("sampler") if not nested_sections(e.component.params))


# -- the exact oracle: a mixture of 4 overlapping Gaussians on a circle --------------------------
MEANS = torch.stack([torch.cos(torch.arange(K) * 2 * math.pi / K), torch.sin(torch.arange(K) * 2 * math.pi / K)], 1)
MIXTURE = GaussianMixture(MEANS, 0.6)
SCHEDULE = REGISTRY.build("schedule", {"type": "linear"})
ABAR = torch.cat([torch.ones(1, dtype=torch.float64), SCHEDULE.alphas_cumprod])
CTX = BuildContext(sample_shape=(2,), num_classes=K)


class ExactClassifier(nn.Module):
    """log p(y | x_t) of the mixture as logits, differentiable in x_t (float64 inside)."""

    def forward(self, x_t, t):
        return torch.log(MIXTURE.class_posterior(x_t.double(), ABAR[t.long().cpu() + 1].to(x_t.device)))


UNCOND = MIXTURE.predict(SCHEDULE)


def unconditional(x_t, t, cond):
    """An unconditional model: it ignores the labels, as an unconditional network does."""
    return UNCOND(x_t, t)


def conditional(x_t, t, cond):
    """The conditional model ε(x_t, y), with ε(x_t, ∅) where the label is missing (−1)."""
    if cond is None:
        return UNCOND(x_t, t)
    eps_y = MIXTURE.predict(SCHEDULE, cond.clamp_min(0))(x_t, t)
    return torch.where((cond >= 0)[:, None], eps_y, UNCOND(x_t, t))


def guided(base: str, guidance: dict) -> object:
    sampler = REGISTRY.build("sampler", {"type": "guided", "base": base, "guidance": guidance}, CTX)
    if guidance["type"] == "classifier":
        sampler.guidance.classifier = ExactClassifier()
    return sampler


def draw(sampler, predict, seed=0, n=N):
    with torch.inference_mode():
        return sampler(predict, SCHEDULE, (n, 2), generator=torch.Generator().manual_seed(seed), steps=STEPS)


def posterior_of_label(x: torch.Tensor) -> torch.Tensor:
    """p(LABEL | x_0) of each sample under the clean mixture."""
    return MIXTURE.class_posterior(x.double(), 1.0)[:, LABEL]


# -- the mathematics on the oracle --------------------------------------------------------------
def test_the_gradient_is_the_exact_one_and_works_under_inference_mode():
    from diffkit_plugins.guidance import class_log_prob_grad

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.randint(0, SCHEDULE.T, (64,), generator=g)
    y = torch.randint(0, K, (64,), generator=g)
    a = ABAR[t + 1][:, None]
    # ∇ log p(y | x) = ∇ log N(x; √ᾱ μ_y, v_y I) − ∇ log p_t(x), v = ᾱ s² + 1 − ᾱ
    exact = -(x - a.sqrt() * MIXTURE.means[y]) / (a * 0.36 + 1 - a) - MIXTURE.score(x, a[:, 0])
    with torch.inference_mode():
        grad = class_log_prob_grad(ExactClassifier(), x, t, y)
    torch.testing.assert_close(grad, exact, rtol=1e-9, atol=1e-9)
    # a row without a label (−1) gets no push
    with torch.inference_mode():
        none = class_log_prob_grad(ExactClassifier(), x, t, torch.full_like(y, -1))
    assert torch.equal(none, torch.zeros_like(x))


def test_classifier_guidance_at_scale_1_with_the_exact_classifier_is_the_conditional_model():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, SCHEDULE.T, (256,), generator=g)
    y = torch.randint(0, K, (256,), generator=g)
    wrapped = guided("ddpm", {"type": "classifier", "scale": 1.0}).guidance.wrap(unconditional, SCHEDULE, y)
    torch.testing.assert_close(wrapped(x, t), conditional(x, t, y), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("w", [0.5, 2.0])
def test_classifier_free_guidance_with_w_is_classifier_guidance_with_1_plus_w(w):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 2, generator=g, dtype=torch.float64)
    t = torch.randint(1, SCHEDULE.T, (256,), generator=g)
    y = torch.randint(0, K, (256,), generator=g)
    cfg = guided("ddpm", {"type": "classifier-free", "scale": w}).guidance.wrap(conditional, SCHEDULE, y)
    cg = guided("ddpm", {"type": "classifier", "scale": 1 + w}).guidance.wrap(unconditional, SCHEDULE, y)
    torch.testing.assert_close(cfg(x, t), cg(x, t), rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(w=st.floats(0.0, 20.0), seed=st.integers(0, 2**31 - 1), t=st.integers(0, 999))
def test_the_identity_holds_for_any_scale_timestep_and_state(w, seed, t):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(16, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (16,), generator=g)
    tt = torch.full((16,), t)
    cfg = guided("ddpm", {"type": "classifier-free", "scale": w}).guidance.wrap(conditional, SCHEDULE, y)
    cg = guided("ddpm", {"type": "classifier", "scale": 1 + w}).guidance.wrap(unconditional, SCHEDULE, y)
    torch.testing.assert_close(cfg(x, tt), cg(x, tt), rtol=1e-6, atol=1e-7 * (1 + w))


@pytest.mark.parametrize("base", base_samplers())
def test_guidance_moves_samples_into_the_asked_component_more_as_the_scale_grows(base):
    y = torch.full((N,), LABEL)
    shares, posteriors = [], []
    for scale in (0.0, 1.0, 3.0):
        x = draw(guided(base, {"type": "classifier", "scale": scale}), LabelledPredict(unconditional, y))
        p = posterior_of_label(x)
        shares.append((MIXTURE.class_posterior(x.double(), 1.0).argmax(1) == LABEL).float().mean().item())
        posteriors.append(p.mean().item())
    # unguided, the asked component gets its prior share 1/4 (±5 SE of a binomial share over N draws)
    assert abs(shares[0] - 1 / K) < 5 * math.sqrt(3 / 16 / N), shares
    assert shares[0] < shares[1] < shares[2] and posteriors[0] < posteriors[1] < posteriors[2], (shares, posteriors)
    assert shares[2] > 0.9, shares


@pytest.mark.parametrize("base", base_samplers())
@pytest.mark.parametrize("kind", ["classifier", "classifier-free"])
def test_scale_0_reproduces_the_unguided_samples_bit_for_bit(base, kind):
    y = torch.randint(0, K, (200,), generator=torch.Generator().manual_seed(3))
    model = unconditional if kind == "classifier" else conditional
    plain = draw(REGISTRY.build("sampler", base), lambda x, t: model(x, t, y), seed=7, n=200)
    steered = draw(guided(base, {"type": kind, "scale": 0.0}), LabelledPredict(model, y), seed=7, n=200)
    assert torch.equal(plain, steered)


def test_classifier_free_guidance_with_w_0_equals_the_conditional_model():
    y = torch.randint(0, K, (300,), generator=torch.Generator().manual_seed(4))
    conditional_samples = draw(REGISTRY.build("sampler", "ddim"), lambda x, t: conditional(x, t, y), seed=5, n=300)
    cfg = draw(guided("ddim", {"type": "classifier-free", "scale": 0.0}), LabelledPredict(conditional, y), seed=5, n=300)
    assert torch.equal(cfg, conditional_samples)


def test_a_guided_sampler_without_labels_runs_its_base_unguided():
    plain = draw(REGISTRY.build("sampler", "ddpm"), UNCOND, seed=9, n=100)
    assert torch.equal(draw(guided("ddpm", {"type": "classifier", "scale": 5.0}), UNCOND, seed=9, n=100), plain)


def test_rows_without_a_label_are_left_unguided():
    y = torch.tensor([LABEL, -1] * 50)
    for spec in ({"type": "classifier", "scale": 3.0}, {"type": "classifier-free", "scale": 3.0}):
        model = unconditional if spec["type"] == "classifier" else conditional
        wrapped = guided("ddpm", spec).guidance.wrap(model, SCHEDULE, y)
        x = torch.randn(100, 2, dtype=torch.float64)
        t = torch.full((100,), 500)
        torch.testing.assert_close(wrapped(x, t)[1::2], UNCOND(x, t)[1::2])
        assert not torch.allclose(wrapped(x, t)[::2], UNCOND(x, t)[::2])


def test_the_guided_sampler_passes_steps_and_everything_else_to_its_base():
    seen = {}

    def base(predict, schedule, shape, **kwargs):
        seen.update(kwargs)
        return torch.zeros(shape)

    from diffkit_plugins.guidance import GuidedSampler

    sampler = GuidedSampler(base, guided("ddpm", {"type": "classifier-free"}).guidance)
    sampler(UNCOND, SCHEDULE, (3, 2), steps=17, t_start=40, progress=True)
    assert seen["steps"] == 17 and seen["t_start"] == 40 and seen["progress"] is True


# -- the spec -----------------------------------------------------------------------------------
SPEC = {
    "data": {"type": "gaussians", "components": K, "n": 1024, "std": 0.3},
    # ᾱ_{T−1} ≈ e^−5: noisy enough to start from N(0, I), and no near-zero ᾱ whose 1/√ᾱ
    # would magnify a briefly trained network's errors in DDIM's x̂_0
    "schedule": {"type": "linear", "timesteps": 100, "beta_end": 0.1},
    "denoiser": {"type": "mlp", "hidden": 32, "depth": 1},
    "sampler": {"type": "guided", "base": {"type": "ddim", "steps": 20}, "guidance": {"type": "classifier", "scale": 3.0}},
    "train": {"steps": 150, "batch_size": 256, "preview": 0, "device": "cpu", "log_every": 50},
}


def problems(data) -> dict[str, str]:
    with pytest.raises(SpecError) as err:
        validate_spec(data)
    return dict(err.value.problems)


def with_sampler(**sampler) -> dict:
    return {**SPEC, "sampler": {**SPEC["sampler"], **sampler}}


def test_nested_sections_are_validated_with_their_full_paths():
    assert problems(with_sampler(base={"type": "ddim", "steps": "many"})) == {
        "sampler.base.steps": "Input should be a valid integer, unable to parse string as an integer"
    }
    assert "unknown key" in problems(with_sampler(base={"type": "ddim", "stepz": 3}))["sampler.base.stepz"]
    assert "Did you mean 'ddim'" in problems(with_sampler(base="ddimm"))["sampler.base"]
    assert "greater than or equal to 0" in problems(with_sampler(guidance={"type": "classifier", "scale": -1}))[
        "sampler.guidance.scale"
    ]
    assert "unknown guidance" in problems(with_sampler(guidance="classifer"))["sampler.guidance"]
    assert problems({**SPEC, "sampler": {"type": "guided"}}) == {"sampler.guidance": "required; add it"}


def test_building_a_guided_sampler_in_python_reports_nested_problems_at_their_paths():
    sampler = diffkit.build("sampler", {"type": "guided", "base": {"type": "ddim", "steps": 5}, "guidance": "classifier-free"})
    assert type(sampler.base).__name__ == "DDIM" and sampler.guidance.scale == 1.0
    with pytest.raises(SpecError) as err:
        diffkit.build("sampler", {"type": "guided", "base": {"type": "ddim", "steps": 0}, "guidance": "classifier-free"})
    assert list(dict(err.value.problems)) == ["sampler.base.steps"]
    with pytest.raises(SpecError) as err:
        diffkit.build("sampler", {"type": "guided", "guidance": {"type": "classifier"}})  # no data: no classifier
    assert "sample shape" in dict(err.value.problems)["sampler.guidance"]


def test_a_nested_samplers_steps_are_checked_against_T():
    found = problems(with_sampler(base={"type": "ddpm", "steps": 500}))
    assert list(found) == ["sampler.base.steps"] and "T = 100" in found["sampler.base.steps"]


def test_a_guided_sampler_cannot_be_the_base_of_another():
    found = problems(with_sampler(base={"type": "guided", "guidance": "classifier"}))
    assert "cannot be nested" in found["sampler.base"]


def test_classifier_free_guidance_needs_a_conditional_denoiser():
    found = problems(with_sampler(guidance={"type": "classifier-free"}))
    assert "denoiser.num_classes" in found["sampler.guidance"]
    spec = {**with_sampler(guidance={"type": "classifier-free"}), "denoiser": {"type": "mlp", "num_classes": K}}
    assert validate_spec(spec).sampler.guidance.type == "classifier-free"


def test_nested_sections_take_defaults_and_round_trip():
    spec = validate_spec({**SPEC, "sampler": {"type": "guided", "guidance": "classifier-free"}, "denoiser": {"type": "mlp", "num_classes": K}})
    assert spec.sampler.base.type == "ddpm"  # the default base, with its own defaults filled in
    plain = to_dict(spec)
    assert list(plain["sampler"]) == ["type", "base", "guidance"]
    assert next(iter(plain["sampler"]["base"])) == "type" and next(iter(plain["sampler"]["guidance"])) == "type"
    assert validate_spec(plain) == spec


def test_the_json_schema_offers_the_samplers_and_guidance_inside_the_guided_sampler():
    schema = json_schema()
    defs = schema["$defs"]
    guided_def = next(v for k, v in defs.items() if k.endswith("Guided"))
    base = guided_def["properties"]["base"]
    union = base["anyOf"][0]
    assert {"ddpm", "ddim"} <= set(union["discriminator"]["mapping"]) and "guided" not in union["discriminator"]["mapping"]
    assert {"classifier", "classifier-free"} <= set(guided_def["properties"]["guidance"]["anyOf"][0]["discriminator"]["mapping"])
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(SPEC)) == []
    assert list(validator.iter_errors(with_sampler(base={"type": "ddim", "steps": "many"}))) != []


# -- training: label dropping -------------------------------------------------------------------
def test_cond_drop_prob_defaults_to_0_1_and_drops_that_share_of_labels():
    assert diffkit.Pipeline(data={"type": "gaussians", "n": 64}).train_config.cond_drop_prob == 0.1
    torch.manual_seed(0)
    y = torch.randint(0, K, (20_000,))
    dropped = drop_labels(y, 0.1)
    share = (dropped == -1).float().mean().item()
    assert abs(share - 0.1) < 5 * math.sqrt(0.09 / 20_000)
    assert torch.equal(dropped[dropped >= 0], y[dropped >= 0])
    assert drop_labels(y, 0.0) is y


def test_a_conditional_denoiser_is_trained_with_and_without_labels():
    import copy

    train = {**SPEC["train"], "steps": 20, "cond_drop_prob": 0.5}
    denoiser = {"type": "mlp", "hidden": 16, "depth": 1, "num_classes": K}
    pipe = diffkit.Pipeline.from_spec({**SPEC, "denoiser": denoiser, "sampler": "ddpm", "train": train})
    seen: list[torch.Tensor] = []
    pipe._online = copy.deepcopy(pipe.denoiser)  # the network fit() trains; record the labels it is shown
    pipe._online.register_forward_pre_hook(lambda module, args: seen.append(args[2].clone()))
    pipe.fit(progress=False)
    labels = torch.cat(seen)
    assert labels.numel() == 20 * 256
    assert 0.4 < (labels == -1).float().mean().item() < 0.6


# -- pipelines: classifier guidance --------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    pipe = diffkit.Pipeline.from_spec(SPEC)
    result = pipe.fit(progress=False)
    directory = tmp_path_factory.mktemp("runs") / "cg"
    pipe.save(directory)
    return pipe, result, directory


def test_fit_trains_the_classifier_and_reports_its_accuracy_by_t(classifier_run):
    pipe, result, _ = classifier_run
    report = result.classifier
    assert report is not None and report.steps == 150 and report.evaluated_on == "held-out"
    bands = report.accuracy
    assert len(bands) == 10 and bands[0]["t_from"] == 0 and bands[-1]["t_to"] == 100
    assert all(b["t_to"] == c["t_from"] for b, c in zip(bands, bands[1:]))
    # nearly clean points are classified well; pure noise is at chance
    assert bands[0]["accuracy"] > 0.9 and bands[-1]["accuracy"] < 0.5
    assert "acc" in report.table() and "0–9" in report.table()


def test_guided_pipeline_samples_land_in_the_asked_component(classifier_run):
    pipe, _, _ = classifier_run
    angles = torch.arange(K) * 2 * math.pi / K
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)
    for label in range(K):
        x = pipe.sample(200, seed=0, labels=label)
        assert (torch.cdist(x, means).argmin(1) == label).float().mean() > 0.9
    unguided = torch.cdist(pipe.sample(400, seed=0), means).argmin(1)
    assert (unguided == 0).float().mean() < 0.5


def test_guidance_scale_0_is_the_unguided_pipeline_bit_for_bit(classifier_run):
    pipe, _, _ = classifier_run
    assert torch.equal(pipe.sample(100, seed=3, labels=2, guidance_scale=0.0), pipe.sample(100, seed=3))


def test_guided_sampling_leaks_no_gradient_into_any_weights(classifier_run):
    pipe, _, _ = classifier_run
    nets = [pipe.denoiser, pipe._online, pipe.classifier]
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    pipe.sample(64, seed=1, labels=1, guidance_scale=5.0)
    for net, state in zip(nets, before):
        assert all(p.grad is None for p in net.parameters())
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_the_classifier_is_saved_as_safetensors_and_loaded_back(classifier_run):
    pipe, _, directory = classifier_run
    assert (directory / "classifier.safetensors").is_file()
    import json

    meta = json.loads((directory / "meta.json").read_text())
    assert meta["classifier"]["steps_trained"] == 150 and len(meta["classifier"]["accuracy_by_t"]) == 10
    assert set(meta["components"]) >= {"sampler", "sampler.base", "sampler.guidance"}
    loaded = diffkit.Pipeline.load(directory)
    assert torch.equal(loaded.sample(50, seed=2, labels=3), pipe.sample(50, seed=2, labels=3))


def test_another_sampler_is_steered_by_the_runs_guidance(classifier_run):
    pipe, _, _ = classifier_run
    by_name = pipe.sample(80, seed=4, labels=0, sampler={"type": "ddim", "steps": 20})
    spelled_out = pipe.sample(80, seed=4, labels=0, sampler=pipe.spec.sampler.model_dump())
    assert torch.equal(by_name, spelled_out)
    assert torch.equal(by_name, pipe.sample(80, seed=4, labels=0))


def test_a_run_without_its_classifier_file_says_so(classifier_run, tmp_path):
    import shutil

    _, _, directory = classifier_run
    copy = tmp_path / "run"
    shutil.copytree(directory, copy)
    (copy / "classifier.safetensors").unlink()
    pipe = diffkit.Pipeline.load(copy)
    pipe.sample(10, seed=0)  # unguided sampling still works
    with pytest.raises(DiffkitError, match="trained classifier"):
        pipe.sample(10, seed=0, labels=1)


def test_bad_label_requests_are_clear_errors(classifier_run):
    pipe, _, _ = classifier_run
    with pytest.raises(DiffkitError, match="out of range.*4 classes"):
        pipe.sample(10, labels=4)
    with pytest.raises(DiffkitError, match="one per sample"):
        pipe.sample(10, labels=[0, 1])
    with pytest.raises(DiffkitError, match="needs labels"):
        pipe.sample(10, guidance_scale=2.0)
    unconditional_pipe = diffkit.Pipeline.from_spec({**SPEC, "sampler": "ddpm", "train": {**SPEC["train"], "steps": 1}})
    with pytest.raises(DiffkitError, match="cannot sample by label"):
        unconditional_pipe.sample(10, labels=1)
    moons = diffkit.Pipeline.from_spec({**SPEC, "data": {"type": "moons", "n": 64}, "sampler": "ddpm"})
    with pytest.raises(DiffkitError, match="no labels"):
        moons.sample(10, labels=0)


def test_classifier_guidance_on_unlabelled_data_is_a_spec_error():
    with pytest.raises(SpecError) as err:
        diffkit.Pipeline.from_spec({**SPEC, "data": {"type": "moons", "n": 64}})
    assert "labelled" in dict(err.value.problems)["sampler.guidance"]


# -- pipelines: classifier-free guidance ---------------------------------------------------------
@pytest.fixture(scope="module")
def cfg_pipe():
    spec = {
        **SPEC,
        "denoiser": {"type": "mlp", "hidden": 32, "depth": 1, "num_classes": K},
        "sampler": {"type": "guided", "base": {"type": "ddim", "steps": 20}, "guidance": {"type": "classifier-free", "scale": 2.0}},
    }
    pipe = diffkit.Pipeline.from_spec(spec)
    pipe.fit(progress=False)
    return pipe


def test_classifier_free_guidance_at_w_0_is_the_conditional_model(cfg_pipe):
    conditional_samples = cfg_pipe.sample(100, seed=6, labels=2, sampler={"type": "ddim", "steps": 20}, guidance_scale=0.0)
    plain = diffkit.Pipeline.from_spec({**cfg_pipe.spec.model_dump(), "sampler": {"type": "ddim", "steps": 20}})
    plain.denoiser.load_state_dict(cfg_pipe.denoiser.state_dict())
    plain.data_mean, plain.data_std, plain.data_range = cfg_pipe.data_mean, cfg_pipe.data_std, cfg_pipe.data_range
    assert torch.equal(plain.sample(100, seed=6, labels=2), conditional_samples)
    assert torch.equal(cfg_pipe.sample(100, seed=6, labels=2, guidance_scale=0.0), conditional_samples)


def test_classifier_free_guidance_moves_more_samples_into_the_asked_component(cfg_pipe):
    angles = torch.arange(K) * 2 * math.pi / K
    means = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)

    def share(scale):
        x = cfg_pipe.sample(400, seed=8, labels=1, guidance_scale=scale)
        return (torch.cdist(x, means).argmin(1) == 1).float().mean().item()

    unguided, guided_share = share(0.0), share(3.0)
    assert guided_share > unguided and guided_share > 0.97


def test_classifier_free_guidance_of_an_unconditional_denoiser_is_an_error():
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 100},
        denoiser={"type": "mlp", "hidden": 16, "depth": 1},
        sampler={"type": "guided", "guidance": "classifier-free"},
        data={"type": "gaussians", "components": K, "n": 64},
    )
    with pytest.raises(DiffkitError, match="unconditional"):
        pipe.sample(4, labels=1)


# -- the command line ---------------------------------------------------------------------------
def test_cli_samples_one_label_and_a_grid_of_labels(classifier_run, tmp_path, capsys):
    _, _, directory = classifier_run
    assert main(["sample", str(directory), "--label", "2", "--n", "30", "--out", str(tmp_path / "two.npy"), "--seed", "0", "--no-progress"]) == 0
    assert "30 samples of label 2" in capsys.readouterr().out
    two = np.load(tmp_path / "two.npy")
    assert two.shape == (30, 2)
    out = tmp_path / "grid.npy"
    args = ["sample", str(directory), "--label", "0,3", "--n", "25", "--out", str(out), "--seed", "0", "--no-progress"]
    assert main(args + ["--guidance-scale", "4"]) == 0
    grid = np.load(out)
    assert grid.shape == (50, 2)  # rows in label order: 25 of label 0, then 25 of label 3
    assert (grid[:25, 0] > 0.8).mean() > 0.9 and (grid[25:, 1] < -0.8).mean() > 0.9
    assert main(args[:-3] + ["--out", str(tmp_path / "grid.png"), "--no-progress"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--label", "4"], "--label 4 is out of range"),
        (["--label", "x"], "--label takes class numbers"),
        (["--label", "-1"], "--label takes class numbers from 0"),
        (["--guidance-scale", "2"], "--guidance-scale needs --label"),
        (["--label", "1", "--guidance-scale", "-2"], "at least 0"),
    ],
)
def test_cli_bad_label_requests_fail_with_one_message(classifier_run, tmp_path, capsys, extra, needle):
    _, _, directory = classifier_run
    assert main(["sample", str(directory), "--n", "4", "--out", str(tmp_path / "x.npy"), *extra]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_cli_guidance_asked_of_a_run_that_cannot_guide(tmp_path, capsys):
    pipe = diffkit.Pipeline.from_spec({**SPEC, "sampler": "ddpm", "train": {**SPEC["train"], "steps": 2}})
    pipe.fit(progress=False)
    pipe.save(tmp_path / "plain")
    assert main(["sample", str(tmp_path / "plain"), "--label", "1", "--out", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err
    assert "cannot sample by label" in err and err.count("\n") == 1
