"""Guidance: the top-level section, its methods and options, its stateful parts.

The mathematics is checked on a Gaussian mixture, whose noisy class posterior
p(y | x_t) and conditional denoisers E[ε | x_t, y] are known in closed form under any
process (diffkit.oracles.GaussianMixture). Bayes' rule ties them together:

    ∇ log p(y | x_t) = ∇ log p(x_t | y) − ∇ log p(x_t) = −(ε(x_t, y) − ε(x_t, ∅)) / σ_t,

so classifier guidance of the unconditional oracle with the exact classifier at γ = 1
*is* the conditional oracle, and classifier-free guidance with w equals classifier
guidance with γ = 1 + w, under every process and sampler. The pipeline, run-directory
and CLI tests use tiny networks.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import diffkit
from diffkit import BuildContext, DiffkitError, SpecError
from diffkit.cli import main
from diffkit.guidance import GuidanceParams, RewardGuidance, parse_interval
from diffkit.oracles import GaussianMixture
from diffkit.sampling import denoise_from_eps, is_step_sampler
from diffkit.sampling import run as run_loop
from diffkit.spec import to_dict, validate_spec
from diffkit.testing.guidance import check_guidance
from diffkit.train import drop_labels

REGISTRY = diffkit.get_registry()
K = 4
LABEL = 1
CTX = BuildContext(sample_shape=(2,), num_classes=K)
SAMPLERS = sorted(e.name for e in REGISTRY.all("sampler"))

# -- the exact oracle: a mixture of 4 overlapping Gaussians on a circle --------------------------
MEANS = torch.stack([torch.cos(torch.arange(K) * 2 * math.pi / K), torch.sin(torch.arange(K) * 2 * math.pi / K)], 1)
MIXTURE = GaussianMixture(MEANS, 0.6)
TABLE = REGISTRY.build("schedule", {"type": "linear", "timesteps": 100, "beta_end": 0.1})
VP = REGISTRY.build("schedule", {"type": "vp"})
PROCESSES = {"table": TABLE, "vp": VP}


def exact_logits(process, x_t, t):
    a, s = process.coefficients(t, x_t[:, :1])
    a, s = a.reshape(-1, 1).double(), s.reshape(-1, 1).double()
    var = a * a * 0.36 + s * s
    resid = x_t.double()[:, None, :] - a[:, :, None] * MEANS.double()[None]
    return torch.log_softmax(-math.log(K) - var.log() - 0.5 * resid.square().sum(-1) / var, dim=1)


def models(process):
    """The exact unconditional model (it ignores labels) and the conditional ε(x_t, y)
    (ε(x_t, ∅) where the label is −1), under ``process``."""
    uncond = MIXTURE.denoiser(process)

    def unconditional(x_t, t, cond):
        return uncond(x_t, t).eps

    def conditional(x_t, t, cond):
        if cond is None:
            return uncond(x_t, t).eps
        eps_y = MIXTURE.denoiser(process, cond.clamp_min(0))(x_t, t).eps
        return torch.where((cond >= 0)[:, None], eps_y, uncond(x_t, t).eps)

    return unconditional, conditional


def method(section: dict):
    g = REGISTRY.build("guidance", section, CTX)
    if section["type"] == "classifier":
        g.logits = exact_logits
    return g


def states(process, seed: int, n: int = 128):
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    if process.discrete:
        t = torch.randint(0, process.T, (n,), generator=g)
    else:
        t = process.t_min + (process.t_max - process.t_min) * torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    return x, t, y


def draw(sampler: str, predict, process, seed=0, n=400, steps=30):
    chosen = REGISTRY.build("sampler", {"type": sampler}, BuildContext())
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        if is_step_sampler(chosen):
            return run_loop(chosen, denoise_from_eps(predict, process), process, (n, 2), steps=steps, generator=gen)
        return chosen(predict, process, (n, 2), generator=gen, steps=steps)


# -- the mathematics on the oracle --------------------------------------------------------------
def test_the_gradient_is_the_exact_one_and_works_under_inference_mode():
    from diffkit_plugins.guidance import class_log_prob_grad

    x, t, y = states(TABLE, 0, 64)
    a = TABLE.alpha_bar(t, x)
    # ∇ log p(y | x) = ∇ log N(x; √ᾱ μ_y, v_y I) − ∇ log p_t(x), v = ᾱ s² + 1 − ᾱ
    exact = -(x - a.sqrt() * MIXTURE.means[y]) / (a * 0.36 + 1 - a) - MIXTURE.score(x, a[:, 0])
    with torch.inference_mode():
        grad = class_log_prob_grad(lambda z: exact_logits(TABLE, z, t), x, y)
        none = class_log_prob_grad(lambda z: exact_logits(TABLE, z, t), x, torch.full_like(y, -1))
    torch.testing.assert_close(grad, exact, rtol=1e-9, atol=1e-9)
    assert torch.equal(none, torch.zeros_like(x))  # a row without a label (−1) gets no push


@pytest.mark.parametrize("name", PROCESSES)
def test_classifier_guidance_at_scale_1_with_the_exact_classifier_is_the_conditional_model(name):
    process = PROCESSES[name]
    unconditional, conditional = models(process)
    x, t, y = states(process, 1, 256)
    wrapped = method({"type": "classifier", "scale": 1.0}).wrap(unconditional, process, y)
    torch.testing.assert_close(wrapped(x, t), conditional(x, t, y), rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(w=st.floats(0.0, 8.0), seed=st.integers(0, 2**16), name=st.sampled_from(sorted(PROCESSES)))
def test_cfg_at_w_is_classifier_guidance_at_1_plus_w_for_any_state_and_process(w, seed, name):
    process = PROCESSES[name]
    unconditional, conditional = models(process)
    x, t, y = states(process, seed, 64)
    cfg = method({"type": "classifier-free", "scale": w}).wrap(conditional, process, y)
    cg = method({"type": "classifier", "scale": 1 + w}).wrap(unconditional, process, y)
    torch.testing.assert_close(cfg(x, t), cg(x, t), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cfg_at_w_and_classifier_guidance_at_1_plus_w_draw_the_same_samples_under_every_sampler(sampler):
    process = TABLE if sampler in ("sgld", "pc") else VP
    unconditional, conditional = models(process)
    y = torch.full((300,), LABEL)
    cfg = draw(sampler, method({"type": "classifier-free", "scale": 2.0}).wrap(conditional, process, y), process, n=300)
    cg = draw(sampler, method({"type": "classifier", "scale": 3.0}).wrap(unconditional, process, y), process, n=300)
    torch.testing.assert_close(cfg, cg, rtol=1e-4, atol=1e-4)
    unguided = draw(sampler, lambda x_t, t: unconditional(x_t, t, y), process, n=300)
    share = lambda x: MIXTURE.class_posterior(x.double(), 1.0)[:, LABEL].mean().item()  # noqa: E731
    assert share(cfg) > share(unguided) + 0.1


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("kind", ["classifier", "classifier-free"])
def test_scale_0_is_the_unguided_model_bit_for_bit_under_every_sampler(sampler, kind):
    process = TABLE if sampler in ("sgld", "pc") else VP
    unconditional, conditional = models(process)
    model = conditional if kind == "classifier-free" else unconditional
    y = torch.full((200,), LABEL)
    steered = draw(sampler, method({"type": kind, "scale": 0.0}).wrap(model, process, y), process, seed=7, n=200)
    plain = draw(sampler, lambda x_t, t: model(x_t, t, y), process, seed=7, n=200)
    assert torch.equal(steered, plain)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    lo=st.floats(0.01, 5.0),
    width=st.floats(0.0, 20.0),
    space=st.sampled_from(["sigma", "lambda"]),
    name=st.sampled_from(sorted(PROCESSES)),
)
def test_outside_its_interval_guidance_changes_nothing(seed, lo, width, space, name):
    process = PROCESSES[name]
    _, conditional = models(process)
    x, t, y = states(process, seed, 64)
    interval = (lo, lo + width) if space == "sigma" else (-lo - width / 2, -lo + width / 2)
    g = method({"type": "classifier-free", "scale": 3.0, "interval": list(interval), "interval_in": space})
    got = g.wrap(conditional, process, y)(x, t)
    plain = conditional(x, t, y)
    level = process.sigma_tilde(t.double()) if space == "sigma" else process.log_snr(t.double())
    outside = (level < interval[0]) | (level > interval[1])
    assert torch.equal(got[outside], plain[outside])  # bit for bit
    full = method({"type": "classifier-free", "scale": 3.0}).wrap(conditional, process, y)(x, t)
    assert torch.equal(got[~outside], full[~outside])
    # a whole batch outside: Δ is not computed (ε(x, ∅) is never asked for)
    asked = []
    spy = lambda x_t, t_, c: asked.append(c) or conditional(x_t, t_, c)  # noqa: E731
    if bool(outside.any()):
        i = int(outside.nonzero()[0])
        one = g.wrap(spy, process, y[i : i + 1])(x[i : i + 1], t[i : i + 1])
        assert torch.equal(one, plain[i : i + 1]) and all(bool((c >= 0).all()) for c in asked)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), w=st.floats(0.5, 6.0), name=st.sampled_from(sorted(PROCESSES)))
def test_rescale_0_is_cfg_and_rescale_1_has_the_conditional_standard_deviation(seed, w, name):
    process = PROCESSES[name]
    _, conditional = models(process)
    x, t, y = states(process, seed, 64)
    x = x.repeat(1, 8).reshape(64, 2, 8)[:, :, :1].reshape(64, 2)
    cfg = method({"type": "classifier-free", "scale": w}).wrap(conditional, process, y)(x, t)
    phi0 = method({"type": "classifier-free", "scale": w, "rescale": 0.0}).wrap(conditional, process, y)(x, t)
    assert torch.equal(phi0, cfg)
    phi1 = method({"type": "classifier-free", "scale": w, "rescale": 1.0}).wrap(conditional, process, y)(x, t)
    torch.testing.assert_close(phi1.std(dim=1), conditional(x, t, y).std(dim=1), rtol=1e-9, atol=1e-12)
    half = method({"type": "classifier-free", "scale": w, "rescale": 0.5}).wrap(conditional, process, y)(x, t)
    torch.testing.assert_close(half, 0.5 * (phi1 + cfg), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_scale_schedules_average_the_scale_over_the_noise_level(schedule):
    from diffkit.guidance import _lambda_range, guidance_weight

    lo, hi = _lambda_range(VP)
    lam = torch.linspace(hi, lo, 20_001, dtype=torch.float64)  # uniform in u from 0 to 1
    w = guidance_weight(GuidanceParams(schedule=schedule), VP, VP.t_of_log_snr(lam), 3.0)
    assert abs(w.mean().item() - 3.0) < 1e-3
    if schedule == "linear":
        torch.testing.assert_close(w[[0, -1]], torch.tensor([6.0, 0.0], dtype=torch.float64), atol=1e-4, rtol=0)
    if schedule == "cosine":
        assert w[0].item() == pytest.approx(6.0, abs=1e-4) and w[-1].item() == pytest.approx(0.0, abs=1e-4)


def test_the_interval_is_checked_and_parsed():
    with pytest.raises(SpecError, match="lo ≤ hi"):
        validate_spec({**SPEC, "guidance": {"type": "classifier", "interval": [2.0, 1.0]}})
    assert parse_interval("0.3,5") == (0.3, 5.0)
    for bad in ("1", "a,b", "2,1", "1,inf"):
        with pytest.raises(ValueError, match="guidance interval"):
            parse_interval(bad)


def test_check_guidance_passes_for_the_built_in_methods():
    check_guidance("classifier", {"scale": 2.0})
    check_guidance("classifier-free", {"scale": 2.0})
    check_guidance("classifier-free", {"scale": 2.0, "rescale": 0.5, "interval": [0.0, 100.0]})


# -- the spec -----------------------------------------------------------------------------------
SPEC = {
    "data": {"type": "gaussians", "components": K, "n": 1024, "std": 0.3},
    # ᾱ_{T−1} ≈ e^−5: noisy enough to start from N(0, I), and no near-zero ᾱ whose 1/√ᾱ
    # would magnify a briefly trained network's errors in DDIM's x̂_0
    "schedule": {"type": "linear", "timesteps": 100, "beta_end": 0.1},
    "denoiser": {"type": "mlp", "hidden": 32, "depth": 1},
    "sampler": {"type": "ddim", "steps": 20},
    "guidance": {"type": "classifier", "scale": 3.0},
    "train": {"steps": 150, "batch_size": 256, "preview": 0, "device": "cpu", "log_every": 50},
}
OLD = {**{k: v for k, v in SPEC.items() if k != "guidance"}, "sampler": {"type": "guided", "base": SPEC["sampler"], "guidance": SPEC["guidance"]}}


def test_the_0_1_guided_sampler_is_read_as_a_guidance_section_with_a_one_line_notice(capsys):
    spec = validate_spec(OLD)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "type: guided" in err and "guidance: {type: classifier" in err
    assert to_dict(spec) == to_dict(validate_spec(SPEC))
    assert capsys.readouterr().err == ""  # the new form: no notice
    assert "guidance" not in to_dict(validate_spec({**SPEC, "guidance": None}))


def test_guidance_problems_are_reported_at_their_paths():
    with pytest.raises(SpecError) as err:
        validate_spec({**SPEC, "guidance": {"type": "classifier", "scale": -1}})
    assert "guidance.scale" in dict(err.value.problems)
    with pytest.raises(SpecError) as err:
        validate_spec({**SPEC, "guidance": {"type": "classifier-free"}})
    assert "num_classes" in dict(err.value.problems)["guidance"]
    with pytest.raises(SpecError) as err:
        validate_spec({**SPEC, "guidance": {"type": "autoguidance"}})
    assert "guide_step" in dict(err.value.problems)["guidance"]


def test_cond_drop_prob_defaults_to_0_1_and_drops_that_share_of_labels():
    assert diffkit.Pipeline(data={"type": "gaussians", "n": 64}).train_config.cond_drop_prob == 0.1
    torch.manual_seed(0)
    y = torch.randint(0, K, (20_000,))
    dropped = drop_labels(y, 0.1)
    share = (dropped == -1).float().mean().item()
    assert abs(share - 0.1) < 5 * math.sqrt(0.09 / 20_000)
    assert torch.equal(dropped[dropped >= 0], y[dropped >= 0])


def test_the_core_no_longer_mentions_classifiers():
    from pathlib import Path

    root = Path(diffkit.__file__).parent
    for name in ("pipeline.py", "train.py", "spec.py"):
        text = (root / name).read_text(encoding="utf-8").lower()
        assert "classifier" not in text, name
        assert "guided sampler" not in text and "getattr(self.sampler" not in text, name


# -- pipelines: classifier guidance --------------------------------------------------------------
@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    pipe = diffkit.Pipeline.from_spec(SPEC)
    result = pipe.fit(progress=False)
    directory = tmp_path_factory.mktemp("runs") / "cg"
    pipe.save(directory)
    return pipe, result, directory


ANGLES = torch.arange(K) * 2 * math.pi / K
CENTRES = 2.0 * torch.stack([ANGLES.cos(), ANGLES.sin()], 1)


def test_fit_trains_the_classifier_and_reports_its_accuracy_by_t(classifier_run):
    _, result, _ = classifier_run
    report = result.parts["classifier"]
    assert report.steps == 150 and report.evaluated_on == "held-out"
    bands = report.accuracy
    assert len(bands) == 10 and bands[0]["t_from"] == 0 and bands[-1]["t_to"] == 100
    assert bands[0]["accuracy"] > 0.9 and bands[-1]["accuracy"] < 0.5


@pytest.mark.parametrize("sampler", [{"type": "ddim", "steps": 20}, {"type": "heun", "steps": 10}, {"type": "dpm-solver", "steps": 10}])
def test_guided_pipeline_samples_land_in_the_asked_component_under_any_sampler(classifier_run, sampler):
    pipe, _, _ = classifier_run
    for label in range(K):
        x = pipe.sample(200, seed=0, labels=label, sampler=sampler)
        assert (torch.cdist(x, CENTRES).argmin(1) == label).float().mean() > 0.9
    unguided = torch.cdist(pipe.sample(400, seed=0, sampler=sampler), CENTRES).argmin(1)
    assert (unguided == 0).float().mean() < 0.5


def test_guidance_scale_0_is_the_unguided_pipeline_bit_for_bit(classifier_run):
    pipe, _, _ = classifier_run
    assert torch.equal(pipe.sample(100, seed=3, labels=2, guidance_scale=0.0), pipe.sample(100, seed=3))


def test_guided_sampling_leaks_no_gradient_into_any_weights(classifier_run):
    pipe, _, _ = classifier_run
    nets = [pipe.denoiser, pipe._online, pipe.guidance.classifier]
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in nets]
    pipe.sample(64, seed=1, labels=1, guidance_scale=5.0)
    for net, state in zip(nets, before):
        assert all(p.grad is None for p in net.parameters())
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_the_classifier_is_saved_as_safetensors_and_loaded_back(classifier_run):
    pipe, _, directory = classifier_run
    assert (directory / "classifier.safetensors").is_file()
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["parts"]["classifier"]["steps_trained"] == 150 and len(meta["parts"]["classifier"]["accuracy_by_t"]) == 10
    assert set(meta["components"]) >= {"sampler", "guidance"}
    loaded = diffkit.Pipeline.load(directory)
    assert torch.equal(loaded.sample(50, seed=2, labels=3), pipe.sample(50, seed=2, labels=3))


def test_a_run_of_the_0_1_form_loads_with_its_classifier(classifier_run, tmp_path, capsys):
    import yaml

    pipe, _, directory = classifier_run
    old = tmp_path / "old"
    shutil.copytree(directory, old)
    spec = yaml.safe_load((old / "spec.yaml").read_text())
    spec["sampler"] = {"type": "guided", "base": spec["sampler"], "guidance": spec.pop("guidance")}
    (old / "spec.yaml").write_text(yaml.safe_dump(spec))
    meta = json.loads((old / "meta.json").read_text())
    meta["classifier"] = meta.pop("parts")["classifier"]
    (old / "meta.json").write_text(json.dumps(meta))
    loaded = diffkit.Pipeline.load(old)
    assert "type: guided" in capsys.readouterr().err
    assert loaded.guidance.part.steps_trained == 150
    assert torch.equal(loaded.sample(40, seed=5, labels=1), pipe.sample(40, seed=5, labels=1))


def test_a_run_without_its_classifier_file_says_so(classifier_run, tmp_path):
    _, _, directory = classifier_run
    copy = tmp_path / "run"
    shutil.copytree(directory, copy)
    (copy / "classifier.safetensors").unlink()
    pipe = diffkit.Pipeline.load(copy)
    pipe.sample(10, seed=0)  # unguided sampling still works
    with pytest.raises(DiffkitError, match="needs its classifier trained"):
        pipe.sample(10, seed=0, labels=1)


def test_bad_label_requests_are_clear_errors(classifier_run):
    pipe, _, _ = classifier_run
    with pytest.raises(DiffkitError, match="out of range.*4 classes"):
        pipe.sample(10, labels=4)
    with pytest.raises(DiffkitError, match="needs labels"):
        pipe.sample(10, guidance_scale=2.0)
    plain = diffkit.Pipeline.from_spec({**SPEC, "guidance": None, "train": {**SPEC["train"], "steps": 1}})
    with pytest.raises(DiffkitError, match="cannot sample by label"):
        plain.sample(10, labels=1)
    with pytest.raises(DiffkitError, match="no guidance to scale"):
        plain.sample(10, guidance_rescale=0.5)
    with pytest.raises(DiffkitError, match="guidance option rescale"):
        pipe.sample_batches(10, labels=1, guidance_rescale=1.5)
    with pytest.raises(DiffkitError, match="guidance option interval.*lo ≤ hi"):
        pipe.sample_batches(10, labels=1, guidance_interval=(2.0, 1.0))


def test_classifier_guidance_trains_and_guides_on_a_continuous_process():
    spec = {**SPEC, "schedule": {"type": "vp"}, "sampler": {"type": "heun", "steps": 12}, "train": {**SPEC["train"], "steps": 300}}
    pipe = diffkit.Pipeline.from_spec(spec)
    report = pipe.fit(progress=False).parts["classifier"]
    assert report.accuracy[0]["t_from"] == pytest.approx(VP.t_min) and report.accuracy[0]["accuracy"] > 0.9
    x = pipe.sample(300, seed=0, labels=2)
    assert (torch.cdist(x, CENTRES).argmin(1) == 2).float().mean() > 0.9


def test_the_classifier_resumes_exactly_after_an_interruption(tmp_path, monkeypatch):
    spec = {**SPEC, "train": {**SPEC["train"], "steps": 40, "checkpoint_every": 20}}
    whole = diffkit.Pipeline.from_spec(spec)
    whole.fit(progress=False, out=tmp_path / "a")
    from diffkit_plugins.guidance import ClassifierPart

    fit = ClassifierPart.fit
    monkeypatch.setattr(ClassifierPart, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        diffkit.Pipeline.from_spec(spec).fit(progress=False, out=tmp_path / "b")
    monkeypatch.setattr(ClassifierPart, "fit", fit)
    resumed = diffkit.Pipeline.from_spec(spec)
    resumed.fit(progress=False, out=tmp_path / "b", resume=True)
    for a, b in zip(whole.guidance.classifier.state_dict().values(), resumed.guidance.classifier.state_dict().values()):
        assert torch.equal(a, b)


# -- pipelines: classifier-free guidance, options, autoguidance -----------------------------------
@pytest.fixture(scope="module")
def cfg_run(tmp_path_factory):
    spec = {
        **SPEC,
        "denoiser": {"type": "mlp", "hidden": 32, "depth": 1, "num_classes": K},
        "guidance": {"type": "classifier-free", "scale": 2.0},
        "train": {**SPEC["train"], "checkpoint_every": 50, "keep_checkpoints": 5},
    }
    pipe = diffkit.Pipeline.from_spec(spec)
    directory = tmp_path_factory.mktemp("runs") / "cfg"
    pipe.fit(progress=False, out=directory)
    pipe.save(directory)
    return pipe, directory


def test_classifier_free_guidance_at_w_0_is_the_conditional_model(cfg_run):
    pipe, _ = cfg_run
    plain = diffkit.Pipeline.from_spec({**to_dict(pipe.spec), "guidance": None})
    plain.denoiser.load_state_dict(pipe.denoiser.state_dict())
    plain.data_mean, plain.data_std, plain.data_range = pipe.data_mean, pipe.data_std, pipe.data_range
    assert torch.equal(plain.sample(100, seed=6, labels=2), pipe.sample(100, seed=6, labels=2, guidance_scale=0.0))


def test_classifier_free_guidance_moves_more_samples_into_the_asked_component(cfg_run):
    pipe, _ = cfg_run

    def share(scale, **options):
        x = pipe.sample(400, seed=1, labels=3, guidance_scale=scale, **options)
        return (torch.cdist(x, CENTRES).argmin(1) == 3).float().mean().item()

    assert share(3.0) > share(0.0) and share(3.0) > 0.97
    assert share(3.0, guidance_interval=(1e6, 1e7)) == share(0.0)  # an interval no step visits: unguided
    assert share(3.0, guidance_rescale=0.7) > share(0.0)


def test_autoguidance_with_the_guide_equal_to_the_model_changes_nothing(cfg_run, tmp_path):
    pipe, directory = cfg_run
    spec = {**to_dict(pipe.spec), "guidance": {"type": "autoguidance", "guide_step": 150, "scale": 2.0}}
    auto = diffkit.Pipeline.from_spec(spec)
    shutil.copytree(directory / "checkpoints", tmp_path / "checkpoints")
    auto.steps_trained = 150
    auto.denoiser.load_state_dict(pipe.denoiser.state_dict())
    auto.data_mean, auto.data_std, auto.data_range = pipe.data_mean, pipe.data_std, pipe.data_range
    for part in auto.parts():  # the guide is the EMA weights of the final checkpoint: the model itself
        part.fit(auto, None, None, torch.device("cpu"), tmp_path, False)
    unguided = auto.sample(100, seed=4, guidance_scale=0.0)
    assert torch.equal(auto.sample(100, seed=4), unguided)
    assert torch.equal(auto.sample(100, seed=4, labels=1), auto.sample(100, seed=4, labels=1, guidance_scale=0.0))
    # an earlier checkpoint is a weaker guide: the samples move
    earlier = diffkit.Pipeline.from_spec({**spec, "guidance": {**spec["guidance"], "guide_step": 50}})
    earlier.denoiser.load_state_dict(pipe.denoiser.state_dict())
    earlier.data_mean, earlier.data_std, earlier.data_range = pipe.data_mean, pipe.data_std, pipe.data_range
    earlier.parts()[0].fit(earlier, None, None, torch.device("cpu"), tmp_path, False)
    assert not torch.equal(earlier.sample(100, seed=4), unguided)
    earlier.save(tmp_path / "auto")
    assert (tmp_path / "auto" / "guide.safetensors").is_file()
    assert torch.equal(diffkit.Pipeline.load(tmp_path / "auto").sample(50, seed=3), earlier.sample(50, seed=3))


def test_autoguidance_by_another_run_directory(cfg_run, tmp_path):
    pipe, directory = cfg_run
    spec = {**to_dict(pipe.spec), "guidance": {"type": "autoguidance", "guide_run": str(directory), "scale": 2.0}}
    auto = diffkit.Pipeline.from_spec(spec)
    auto.denoiser.load_state_dict(pipe.denoiser.state_dict())
    auto.data_mean, auto.data_std, auto.data_range = pipe.data_mean, pipe.data_std, pipe.data_range
    assert auto.parts() == []  # nothing of its own to train or save: the guide is read from its run
    assert torch.equal(auto.sample(60, seed=2), auto.sample(60, seed=2, guidance_scale=0.0))  # the guide is the model
    missing = diffkit.Pipeline.from_spec({**spec, "guidance": {**spec["guidance"], "guide_run": str(tmp_path / "none")}})
    with pytest.raises(DiffkitError, match="guide_run .* is not a run directory"):
        missing.sample(4, seed=0)


def test_autoguidance_names_a_missing_checkpoint(cfg_run, tmp_path):
    pipe, _ = cfg_run
    spec = {**to_dict(pipe.spec), "guidance": {"type": "autoguidance", "guide_step": 77}}
    auto = diffkit.Pipeline.from_spec(spec)
    with pytest.raises(DiffkitError, match="guide_step: 77 names no checkpoint"):
        auto.fit(progress=False, out=tmp_path / "x", steps=10)


# -- guidance without labels: a test plugin steering two moons into a region ----------------------
BOX = (torch.tensor([1.2, -0.6]), torch.tensor([2.2, 0.2]))  # the right end of the lower moon


class TowardBoxParams(GuidanceParams):
    pass


def box_log_likelihood(x: torch.Tensor) -> torch.Tensor:
    """r(x̂_0): 0 inside BOX, minus the squared distance to it outside."""
    lo, hi = BOX[0].to(x), BOX[1].to(x)
    return -((lo - x).clamp_min(0).square() + (x - hi).clamp_min(0).square()).sum(-1) * 10


class TowardBox:
    @diffkit.hookimpl
    def diffkit_guidance(self):
        return [diffkit.Component("toward-box", lambda p, ctx: RewardGuidance(p, box_log_likelihood), TowardBoxParams, "Into a box.")]


def test_a_label_free_guidance_plugin_moves_two_moons_into_a_region_as_its_scale_grows():
    registry = diffkit.load_plugins(autoload=False)
    registry.register_plugin(TowardBox(), "toward-box")
    spec = {
        "data": {"type": "moons", "n": 2000, "noise": 0.05},
        "schedule": {"type": "linear", "timesteps": 100, "beta_end": 0.1},
        "denoiser": {"type": "mlp", "hidden": 64, "depth": 2},
        "sampler": {"type": "ddim", "steps": 25},
        "guidance": {"type": "toward-box", "scale": 1.0},
        "train": {"steps": 400, "batch_size": 256, "preview": 0, "lr": 0.003},
    }
    pipe = diffkit.Pipeline.from_spec(spec, registry)
    pipe.fit(progress=False)

    def inside(scale: float) -> float:
        x = pipe.sample(500, seed=0, guidance_scale=scale)
        return ((x >= BOX[0]) & (x <= BOX[1])).all(1).float().mean().item()

    shares = [inside(s) for s in (0.0, 1.0, 4.0, 16.0)]
    assert all(a < b for a, b in zip(shares, shares[1:])), shares
    assert shares[0] < 0.25 and shares[-1] > 0.6, shares


# -- the command line ---------------------------------------------------------------------------
def test_cli_samples_labels_with_the_guidance_options(classifier_run, tmp_path, capsys):
    _, _, directory = classifier_run
    out = tmp_path / "grid.npy"
    args = ["sample", str(directory), "--label", "0,3", "--n", "25", "--out", str(out), "--seed", "0", "--no-progress"]
    assert main(args + ["--guidance-scale", "4", "--guidance-interval", "0.05,100", "--guidance-rescale", "0.3"]) == 0
    grid = np.load(out)
    assert grid.shape == (50, 2)  # rows in label order: 25 of label 0, then 25 of label 3
    assert (grid[:25, 0] > 0.8).mean() > 0.9 and (grid[25:, 1] < -0.8).mean() > 0.9


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--label", "4"], "--label 4 is out of range"),
        (["--guidance-scale", "2"], "--guidance-* needs --label"),
        (["--label", "1", "--guidance-scale", "-2"], "at least 0"),
        (["--label", "1", "--guidance-interval", "3,1"], "--guidance-interval: the guidance interval must be"),
        (["--label", "1", "--guidance-rescale", "2"], "--guidance-rescale must be in [0, 1]"),
    ],
)
def test_cli_bad_guidance_requests_fail_with_one_message(classifier_run, tmp_path, capsys, extra, needle):
    _, _, directory = classifier_run
    assert main(["sample", str(directory), "--n", "4", "--out", str(tmp_path / "x.npy"), *extra]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_cli_applications_take_the_guidance_options(classifier_run, tmp_path, capsys):
    _, _, directory = classifier_run
    np.save(tmp_path / "in.npy", np.zeros((4, 2), dtype=np.float32))
    args = ["denoise", str(directory), "--input", str(tmp_path / "in.npy"), "--strength", "0.3", "--out", str(tmp_path / "o.npy")]
    assert main(args + ["--guidance-scale", "2"]) == 1
    err = capsys.readouterr().err
    assert "--guidance-* needs labels" in err and err.count("\n") == 1
    assert main(args + ["--no-progress"]) == 0
