"""Per-sample noise: a seed fixes each sample whatever the batch, the device or the thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

import diffkit
from diffkit import applications as A
from diffkit.noise import APPLICATION, SampleNoise, sample_seed
from diffkit.plugins import get_registry
from diffkit.sampling import StepSamplerBase
from diffkit.testing import ConformanceError
from diffkit.testing.noise import check_sampler_noise

SLOW_OK = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the source ---------------------------------------------------------------------------------
@SLOW_OK
@given(
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**63 - 1),
)
def test_torch_normal_sequence_is_the_same_however_it_is_cut(cuts, dtype, seed) -> None:
    """What SampleNoise relies on: draws of whole multiples of 16 values continue one sequence."""
    g = torch.Generator().manual_seed(seed)
    pieces = torch.cat([torch.randn(16 * c, generator=g, dtype=dtype) for c in cuts])
    whole = torch.randn(16 * sum(cuts), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    assert torch.equal(pieces, whole)


@SLOW_OK
@given(
    n=st.integers(1, 12),
    first=st.integers(0, 11),
    count=st.integers(1, 12),
    shape=st.sampled_from([(2,), (3,), (1, 4, 4), (5, 3)]),
    positions=st.sampled_from([None, 1, 7, 100]),
    seed=st.integers(0, 2**63 - 1),
)
def test_noise_of_a_sample_depends_only_on_seed_index_slot_and_position(n, first, count, shape, positions, seed) -> None:
    whole = SampleNoise(seed, 0, first + count)
    part = SampleNoise(seed, first, count, positions=positions)
    for position in range(0, 40, 3):
        for slot in (0, 2, APPLICATION):
            a = whole.normal(slot, position, (first + count, *shape))[first:]
            b = part.normal(slot, position, (count, *shape))
            assert torch.equal(a, b)


def test_noise_statistics_mean_variance_independence_and_normality() -> None:
    noise = SampleNoise(11, 0, 400)
    z = torch.stack([noise.normal(0, p, (400, 3)) for p in range(100)]).double()  # [position, sample, element]
    flat = z.flatten()
    n = flat.numel()
    assert abs(float(flat.mean())) < 5 / n**0.5
    assert abs(float(flat.var()) - 1) < 5 * (2 / n) ** 0.5
    assert stats.kstest(flat.numpy(), "norm").pvalue > 1e-3

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    bound = 5 / (z[:, :-1].numel()) ** 0.5
    assert abs(corr(z[:, :-1], z[:, 1:])) < bound  # neighbouring samples
    assert abs(corr(z[:-1], z[1:])) < bound * 1.1  # consecutive steps
    assert abs(corr(z[..., :-1], z[..., 1:])) < bound * 1.3  # neighbouring elements
    other = torch.stack([noise.normal(1, p, (400, 3)) for p in range(100)]).double()
    assert abs(corr(z, other)) < bound  # another slot
    shifted = torch.stack([SampleNoise(12, 0, 400).normal(0, p, (400, 3)) for p in range(100)]).double()
    assert abs(corr(z, shifted)) < bound  # another seed
    assert len({sample_seed(s, i, k) for s in range(4) for i in range(50) for k in range(4)}) == 800


def test_noise_is_bit_identical_on_every_available_device() -> None:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    reference = SampleNoise(5, 3, 7).normal(0, 4, (7, 2, 3))
    assert reference[0, 0, 0].item() != 0
    for device in devices:
        z = SampleNoise(5, 3, 7).normal(0, 4, torch.zeros(7, 2, 3, device=device))
        assert z.device.type == device
        assert torch.equal(z.cpu(), reference)


def test_noise_refuses_a_batch_of_another_size_and_positions_out_of_order() -> None:
    noise = SampleNoise(0, 0, 4)
    with pytest.raises(ValueError, match="first dimension should be the 4 samples"):
        noise.normal(0, 0, (3, 2))
    noise.normal(0, 900, (4, 2))
    with pytest.raises(ValueError, match="in order"):
        noise.normal(0, 1, (4, 2))


# -- every sampler and application, through a pipeline ------------------------------------------
@pytest.fixture(scope="module")
def moons() -> diffkit.Pipeline:
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 40},
        denoiser={"type": "mlp", "hidden": 32, "depth": 1},
        data={"type": "moons", "n": 256},
        train={"steps": 30, "batch_size": 64, "preview": 0, "device": "cpu"},
    )
    pipe.fit(progress=False)
    return pipe


def _samplers() -> list[str]:
    return sorted(n for n in get_registry().tags("sampler") if ":" not in n and n != "guided")


def test_every_registered_sampler_is_covered() -> None:
    assert {"ddpm", "ddim", "dpm-solver", "euler", "heun", "euler-ancestral", "sde", "ode", "pc", "sgld"} <= set(
        _samplers()
    )


def _per_sample(name: str) -> dict:
    """The sampler with per-sample settings: pc's corrector step from each sample's own norms."""
    return {"type": name, "step_norms": "sample"} if name == "pc" else {"type": name}


@pytest.mark.parametrize("name", [n for n in _samplers() if n != "ode"])
def test_a_sample_does_not_depend_on_n_or_the_batch_size(moons, name) -> None:
    sampler = {**_per_sample(name), "steps": 6}
    ref = moons.sample(7, seed=3, sampler=sampler)
    for n, batch in ((7, 3), (11, 11), (9, 2), (3, 1)):
        x = moons.sample(n, seed=3, sampler=sampler, batch_size=batch)
        k = min(n, 7)
        np.testing.assert_allclose(x[:k].numpy(), ref[:k].numpy(), atol=1e-5, rtol=0)
    assert not torch.allclose(moons.sample(7, seed=4, sampler=sampler), ref)


def test_pc_with_batch_norms_depends_on_the_batch_as_documented(moons) -> None:
    sampler = {"type": "pc", "steps": 6}
    ref = moons.sample(8, seed=3, sampler=sampler)
    assert not torch.allclose(moons.sample(8, seed=3, sampler=sampler, batch_size=4), ref, atol=1e-4)


def test_the_adaptive_ode_solver_depends_on_the_batch_only_within_its_tolerance(moons) -> None:
    """Its starting noise is per sample, but its step sizes are chosen for the batch as a
    whole: a sample agrees with itself drawn in another batch to the solver's error, which
    shrinks with the tolerance."""
    gaps = []
    for tol in (1e-4, 1e-7):
        sampler = {"type": "ode", "rtol": tol, "atol": tol}
        ref = moons.sample(9, seed=3, sampler=sampler)
        parts = moons.sample(9, seed=3, sampler=sampler, batch_size=2)
        gaps.append(float((parts - ref).abs().max()))
    assert gaps[0] < 0.05
    assert gaps[1] < 1e-3 and gaps[1] < gaps[0] / 10


@pytest.mark.parametrize("name", _samplers())
def test_every_sampler_meets_the_noise_contract_of_the_kit(name) -> None:
    if name == "ode":  # agrees to its tolerance only (see above)
        check_sampler_noise({"type": "ode", "rtol": 1e-9, "atol": 1e-9}, atol=1e-5)
    else:
        check_sampler_noise(_per_sample(name))


def test_applications_do_not_depend_on_the_batch_size(moons) -> None:
    x = moons.sample(6, seed=0)
    mask = torch.tensor([1.0, 0.0])
    for resample in (1, 2):
        whole = A.inpaint(moons, x, mask, seed=5, steps=8, resample=resample, jump=2)
        parts = A.inpaint(moons, x, mask, seed=5, steps=8, resample=resample, jump=2, batch_size=4)
        torch.testing.assert_close(parts, whole, atol=1e-5, rtol=0)
        first = A.inpaint(moons, x[:2], mask, seed=5, steps=8, resample=resample, jump=2)
        torch.testing.assert_close(first, whole[:2], atol=1e-5, rtol=0)
    whole = A.denoise(moons, x, 0.5, seed=2, steps=10)
    torch.testing.assert_close(A.denoise(moons, x, 0.5, seed=2, steps=10, batch_size=1), whole, atol=1e-5, rtol=0)


def test_upscale_does_not_depend_on_the_batch_size() -> None:
    pipe = diffkit.Pipeline(
        schedule={"type": "linear", "timesteps": 20},
        denoiser={"type": "mlp", "hidden": 16, "depth": 1},
        data={"type": "digits"},
        train={"preview": 0, "device": "cpu"},
    )
    low = torch.rand(5, 1, 4, 4) * 2 - 1
    whole = A.upscale(pipe, low, seed=1, steps=5)
    torch.testing.assert_close(A.upscale(pipe, low, seed=1, steps=5, batch_size=2), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(A.upscale(pipe, low[:1], seed=1, steps=5), whole[:1], atol=1e-5, rtol=0)


def test_batch_noise_is_0_1_s_and_depends_on_the_batch(moons) -> None:
    a = moons.sample(8, seed=1, noise="batch")
    b = moons.sample(8, seed=1, noise="batch", batch_size=4)
    assert not torch.allclose(a[4:], b[4:])
    assert torch.equal(moons.sample(8, seed=1, noise="batch"), a)
    with pytest.raises(diffkit.DiffkitError, match="noise must be 'per-sample' or 'batch'"):
        moons.sample(2, seed=1, noise="cuda")


# -- threads -------------------------------------------------------------------------------------
def test_two_threads_sampling_at_once_get_what_serial_calls_get(moons) -> None:
    calls = [dict(n=300, seed=1, sampler={"type": "ddpm"}), dict(n=200, seed=2, sampler={"type": "heun", "steps": 10})]
    serial = [moons.sample(**c) for c in calls]
    clipped_serial = []
    for c in calls:
        moons.sample(**c)
        clipped_serial.append(moons.last_clipped)
    results: dict[int, tuple[torch.Tensor, float | None]] = {}
    barrier = threading.Barrier(len(calls))

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            x = moons.sample(**calls[i])
            results[i] = (x, moons.last_clipped)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, expected in enumerate(serial):
        assert torch.equal(results[i][0], expected)
        assert results[i][1] == clipped_serial[i]


# -- the kit catches samplers that break the contract ----------------------------------------------
class _GlobalRandn(StepSamplerBase):
    name = "global-randn"

    def step(self, x, ctx):
        d = ctx.denoise(x)
        return d.x0 if ctx.last else d.x0 + 0.1 * torch.randn_like(x)


class _BatchMean(StepSamplerBase):
    name = "batch-mean"

    def step(self, x, ctx):
        d = ctx.denoise(x)
        return d.x0 if ctx.last else d.x0 + 0.1 * ctx.noise(x) * x.std()


class _Params:
    steps = None
    spacing = None
    clip_denoised = None


def test_the_kit_names_a_sampler_that_draws_from_torch_s_global_generator() -> None:
    with pytest.raises(ConformanceError, match="global generator"):
        check_sampler_noise(_GlobalRandn(_Params()))


def test_the_kit_names_a_sampler_that_mixes_the_samples_of_a_batch() -> None:
    with pytest.raises(ConformanceError, match="depend only on the seed and its index"):
        check_sampler_noise(_BatchMean(_Params()))


# -- compiled sampling ----------------------------------------------------------------------------
def test_compiling_that_fails_falls_back_with_one_notice(moons, monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    moons.__dict__.pop("_compiled", None)
    try:
        x = moons.sample(5, seed=1, compile=True)
        moons.sample(5, seed=1, compile=True)
    finally:
        moons.__dict__.pop("_compiled", None)
    err = capsys.readouterr().err
    assert err.count("compiling the network failed (RuntimeError: no C++ compiler here)") == 1
    assert torch.equal(x, moons.sample(5, seed=1))


@pytest.mark.slow
def test_compiled_sampling_draws_the_samples_of_eager_sampling(moons, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    moons.__dict__.pop("_compiled", None)
    try:
        x = moons.sample(32, seed=2, sampler={"type": "heun", "steps": 5}, compile=True)
        assert moons.compiled_network().failed is None
    finally:
        moons.__dict__.pop("_compiled", None)
    torch.testing.assert_close(x, moons.sample(32, seed=2, sampler={"type": "heun", "steps": 5}), atol=1e-4, rtol=1e-4)
    assert any((tmp_path / "cache").rglob("*")), "the compiled kernels are kept on disk"


def test_training_with_compile_that_fails_trains_the_same_weights_uncompiled(monkeypatch, capsys) -> None:
    spec = dict(
        schedule={"type": "linear", "timesteps": 20},
        denoiser={"type": "mlp", "hidden": 16, "depth": 1},
        data={"type": "moons", "n": 128},
        train={"steps": 4, "batch_size": 32, "preview": 0, "device": "cpu"},
    )
    plain = diffkit.Pipeline(**spec)
    plain.fit(progress=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    compiled = diffkit.Pipeline(**{**spec, "train": {**spec["train"], "compile": True}})
    compiled.fit(progress=False)
    assert "compiling the network failed (RuntimeError: no C++ compiler here); training without it" in capsys.readouterr().err
    for (name, a), b in zip(plain.denoiser.state_dict().items(), compiled.denoiser.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_spec_s_sample_compile_is_the_default_of_compile_and_round_trips(moons, monkeypatch, capsys) -> None:
    pipe = diffkit.Pipeline.from_spec({**moons.spec.model_dump(mode="json"), "sample": {"compile": True}})
    assert pipe.spec.sample.compile is True
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("none here")))
    pipe.sample(2, seed=0)
    assert "compiling the network failed" in capsys.readouterr().err
    pipe.sample(2, seed=0, compile=False)
    with pytest.raises(diffkit.SpecError, match="sample.compile"):
        diffkit.Pipeline.from_spec({**moons.spec.model_dump(mode="json"), "sample": {"compile": "yes please"}})


def test_a_checkpoint_written_before_the_compile_settings_resumes_without_a_spec_change() -> None:
    from diffkit.pipeline import _spec_changes

    new = {"train": {"steps": 10, "compile": False}, "sample": {"compile": False}}
    assert _spec_changes({"train": {"steps": 10}}, new) == []
    assert _spec_changes({"train": {"steps": 10}}, {**new, "sample": {"compile": True}}) == [
        ("sample", None, {"compile": True})
    ]
