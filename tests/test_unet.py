"""The ``unet`` denoiser: shapes, conditioning, determinism, learning, and its spec checks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field

import diffkit
from diffkit import BuildContext, Component, Params, TensorData
from diffkit.errors import SpecError
from diffkit.spec import validate_spec

TINY = {"channels": 8, "channel_mult": [1, 2], "num_heads": 2, "dropout": 0.0}


def build(shape: tuple[int, ...], num_classes: int | None = None, **params: object) -> torch.nn.Module:
    config = {"type": "unet", **TINY, **params}
    if num_classes is not None:
        config["num_classes"] = num_classes
    return diffkit.get_registry().build("denoiser", config, BuildContext(sample_shape=shape))


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """The U-Net zero-initialises the last layer of each residual branch and its output,
    so a fresh one returns 0 for every input; give every weight some noise so that its
    dependence on t and labels shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def _max_levels(size: int) -> int:
    levels = 1
    while size % 2 == 0:
        size //= 2
        levels += 1
    return levels


@settings(deadline=None, max_examples=15)
@given(
    size=st.sampled_from([8, 16, 28, 32]),
    channels=st.sampled_from([1, 3]),
    batch=st.integers(1, 3),
    levels=st.integers(1, 3),
    attend_all=st.booleans(),
    data=st.data(),
)
def test_output_has_the_input_shape(size: int, channels: int, batch: int, levels: int, attend_all: bool, data) -> None:
    levels = min(levels, _max_levels(size))
    mult = data.draw(st.lists(st.integers(1, 2), min_size=levels, max_size=levels))
    attention = [size >> i for i in range(levels)] if attend_all else None
    net = build((channels, size, size), channel_mult=mult, attention_resolutions=attention, num_res_blocks=1)
    x = torch.randn(batch, channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    assert net(x, t).shape == x.shape


def test_non_square_images() -> None:
    net = perturbed(build((2, 8, 12)))
    x = torch.randn(2, 2, 8, 12)
    assert net(x, torch.tensor([3, 4])).shape == x.shape


def test_a_fresh_network_predicts_zero() -> None:
    # the zero-initialised output layer (Nichol & Dhariwal 2021) makes the initial ε̂ = 0
    net = build((1, 8, 8))
    assert torch.equal(net(torch.randn(2, 1, 8, 8), torch.tensor([1, 500])), torch.zeros(2, 1, 8, 8))


def test_time_conditioning_changes_the_output() -> None:
    net = perturbed(build((1, 8, 8)))
    x = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1)
    out = net(x, torch.tensor([10, 900]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_label_conditioning_changes_the_output_and_none_is_the_null_label() -> None:
    net = perturbed(build((1, 8, 8), num_classes=3))
    assert net.num_classes == 3
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    t = torch.full((4,), 250)
    out = net(x, t, torch.tensor([0, 1, 2, -1]))
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(out[i], out[j], atol=1e-4)
    null = torch.full((4,), 3)
    torch.testing.assert_close(net(x, t), net(x, t, null))
    torch.testing.assert_close(net(x, t, torch.tensor([-1, -5, -1, -2])), net(x, t, null))


def test_unconditional_network_ignores_labels() -> None:
    net = perturbed(build((1, 8, 8)))
    assert net.num_classes is None
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    torch.testing.assert_close(net(x, t, torch.tensor([0, 1])), net(x, t))


@settings(deadline=None, max_examples=10)
@given(batch=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_eval_is_deterministic_and_batch_independent(batch: int, seed: int) -> None:
    net = perturbed(build((1, 8, 8), num_classes=2, dropout=0.3), seed=1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(-1, 2, (batch,), generator=g)
    with torch.no_grad():
        out = net(x, t, y)
        torch.testing.assert_close(net(x, t, y), out, rtol=0, atol=0)
        for i in range(batch):
            torch.testing.assert_close(net(x[i : i + 1], t[i : i + 1], y[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-5)


def test_a_few_adam_steps_lower_the_epsilon_loss() -> None:
    torch.manual_seed(0)
    registry = diffkit.get_registry()
    schedule = registry.build("schedule", {"type": "linear", "timesteps": 100})
    objective = registry.build("objective", "epsilon")
    net = build((1, 8, 8), channels=16, num_heads=2)
    x0 = torch.rand(8, 1, 8, 8).round() * 2 - 1  # a tiny fixed batch of binary images in [-1, 1]
    eval_batch = x0.repeat(16, 1, 1, 1)

    def held_out_loss() -> float:
        # the same t and ε every time, so that the two losses differ only by the weights
        with torch.no_grad():
            return objective.loss(net, schedule, eval_batch, generator=torch.Generator().manual_seed(123)).item()

    before = held_out_loss()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(40):
        opt.zero_grad()
        objective.loss(net, schedule, x0.repeat(4, 1, 1, 1)).backward()
        opt.step()
    net.eval()
    after = held_out_loss()
    assert before == pytest.approx(1.0, abs=0.15)  # ε̂ = 0 at initialisation: E‖ε‖² per pixel
    assert after < 0.6 * before, (before, after)


def test_gradients_reach_every_parameter() -> None:
    net = build((1, 8, 8), num_classes=2).train()
    net(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, -1])).square().sum().backward()
    # every parameter takes part in the forward pass (none is built and left unused)
    assert [name for name, p in net.named_parameters() if p.grad is None] == []


# -- the spec -------------------------------------------------------------------------


class FakeImagesParams(Params):
    """Blank square images of a chosen size."""

    size: int = Field(28, ge=1, description="Height and width.")
    channels: int = Field(1, ge=1, description="Channels.")


class FakeImages:
    @diffkit.hookimpl
    def diffkit_datasets(self) -> list[Component]:
        def factory(p: FakeImagesParams, ctx: BuildContext) -> TensorData:
            return TensorData(torch.zeros(4, p.channels, p.size, p.size), kind="images")

        return [Component("fake-images", factory, FakeImagesParams, data_shape=lambda p: (p.channels, p.size, p.size))]


@pytest.fixture
def registry() -> Iterator[diffkit.Registry]:
    """The built-ins plus a dataset whose image shape is known from its parameters.

    It is also made the process-wide registry for the test, since ``spec.data_shape``
    (which component checks call) looks the data section up there."""
    reg = diffkit.load_plugins(autoload=False)
    reg.register_plugin(FakeImages(), "test-images")
    previous = diffkit.get_registry()
    diffkit.set_registry(reg)
    try:
        yield reg
    finally:
        diffkit.set_registry(previous)


def spec(size: int = 28, **denoiser: object) -> dict:
    return {"data": {"type": "fake-images", "size": size}, "denoiser": {"type": "unet", **denoiser}}


@pytest.mark.parametrize("size", [8, 28, 32])
def test_the_defaults_fit_small_images(registry: diffkit.Registry, size: int) -> None:
    validate_spec(spec(size), registry=registry)
    net = build((1, size, size), channels=16, channel_mult=[1, 2], num_heads=4)  # the defaults, stated
    default = diffkit.get_registry().build("denoiser", "unet", BuildContext(sample_shape=(1, size, size)))
    assert sum(p.numel() for p in default.parameters()) == sum(p.numel() for p in net.parameters())


def test_check_rejects_a_network_too_deep_for_the_resolution(registry: diffkit.Registry) -> None:
    with pytest.raises(diffkit.SpecError) as info:
        validate_spec(spec(28, channel_mult=[1, 2, 2, 2]), registry=registry)
    message = str(info.value)
    assert "denoiser" in message
    assert "channel_mult has 4 levels, which downsample 8×" in message
    assert "28×28 images allow at most 3 levels (e.g. channel_mult: [1, 2, 2])" in message
    validate_spec(spec(28, channel_mult=[1, 2, 2]), registry=registry)  # the suggestion fits
    validate_spec(spec(32, channel_mult=[1, 2, 2, 2]), registry=registry)


def test_check_rejects_attention_at_a_resolution_that_never_occurs(registry: diffkit.Registry) -> None:
    validate_spec(spec(28, attention_resolutions=[28, 14]), registry=registry)
    validate_spec(spec(28, attention_resolutions=[]), registry=registry)
    with pytest.raises(diffkit.SpecError, match=r"attention_resolutions has 7.*height 28, 14; choose among those"):
        validate_spec(spec(28, attention_resolutions=[7]), registry=registry)


def test_check_rejects_data_that_are_not_images(registry: diffkit.Registry) -> None:
    with pytest.raises(diffkit.SpecError, match=r"needs images of shape \(C, H, W\).*'moons'.*\(2,\)"):
        validate_spec({"data": {"type": "moons"}, "denoiser": {"type": "unet"}}, registry=registry)


def test_factory_raises_the_same_problem_for_python_pipelines() -> None:
    # the registry turns a factory's ValueError into a SpecError naming the section
    with pytest.raises(SpecError, match=r"denoiser: .*28×28 images allow at most 3 levels"):
        build((1, 28, 28), channel_mult=[1, 1, 1, 1])
    with pytest.raises(SpecError, match=r"needs images of shape \(C, H, W\)"):
        build((2,))
    with pytest.raises(SpecError, match="sample shape"):
        diffkit.get_registry().build("denoiser", "unet")


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"channel_mult": []}, "channel_mult"),
        ({"channel_mult": [1, 0]}, "channel_mult.1"),
        ({"channels": 30, "num_heads": 4}, "num_heads"),
        ({"channels": 24, "norm_groups": 16}, "norm_groups"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"attention_resolutions": [0]}, "attention_resolutions.0"),
        ({"heads": 2}, "heads"),
    ],
)
def test_invalid_parameters_fail_with_their_field_path(registry: diffkit.Registry, params: dict, field: str) -> None:
    with pytest.raises(diffkit.SpecError) as info:
        validate_spec(spec(28, **params), registry=registry)
    assert f"denoiser.{field}:" in str(info.value)


def test_it_is_a_builtin_plugin() -> None:
    entry = diffkit.get_registry().get("denoiser", "unet")
    assert entry.distribution == "diffkit"
    assert entry.plugin == "diffkit.unet"
    assert entry.component.check is not None
