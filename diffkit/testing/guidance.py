"""``check_guidance``: scale 0 changes nothing, and guidance with an exact classifier moves
samples toward the asked label."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from diffkit.interfaces import BuildContext, CondPredict, Predict, Schedule
from diffkit.oracles import GaussianMixture
from diffkit.registry import Registry
from diffkit.testing._common import ConformanceError, Subject, max_abs, reference_schedule, resolve, restored_attribute

__all__ = ["check_guidance", "MIXTURE", "LABEL", "exact_logits"]

F64 = torch.float64
K = 3
# Three overlapping Gaussians on a circle of radius 1.5 (std 0.7): p(y | x_0) is far from
# certain, so there is room to move samples toward a label.
_ANGLES = torch.arange(K, dtype=F64) * 2 * math.pi / K
MIXTURE = GaussianMixture(1.5 * torch.stack([_ANGLES.cos(), _ANGLES.sin()], 1), 0.7)
LABEL = 1


def exact_logits(process: Any, x_t: Tensor, t: Tensor) -> Tensor:
    """log p(y | x_t) of :data:`MIXTURE` under any process x_t = α x_0 + σ ε, as logits
    ``[batch, K]``, differentiable in x_t: the classifier a noise-aware classifier is
    trained to become. Given k, x_t ~ N(α μ_k, (α² s² + σ²) I)."""
    a, s = process.coefficients(t, x_t[:, :1])
    a, s = a.reshape(-1, 1).double(), s.reshape(-1, 1).double()
    var = a * a * MIXTURE.stds.square().to(x_t.device)[None] + s * s  # [B, K]
    resid = x_t.double()[:, None, :] - a[:, :, None] * MIXTURE.means.to(x_t.device)[None]
    log_joint = MIXTURE.weights.log().to(x_t.device) - (MIXTURE.dim / 2) * var.log() - 0.5 * resid.square().sum(-1) / var
    return torch.log_softmax(log_joint, dim=1).to(x_t.dtype)


class ExactClassifier(nn.Module):
    """:func:`exact_logits` for a discrete table, called as a 0.1 classifier is: ``(x_t, t)``."""

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        return exact_logits(self.schedule, x_t, t)


def _models(schedule: Schedule) -> tuple[CondPredict, CondPredict]:
    """The exact unconditional model (it ignores labels) and the exact conditional one
    ε(x_t, y), with ε(x_t, ∅) where a label is −1 or missing."""
    uncond = MIXTURE.predict(schedule)

    def unconditional(x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        return uncond(x_t, t)

    def conditional(x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            return uncond(x_t, t)
        eps_y = MIXTURE.predict(schedule, cond.clamp_min(0))(x_t, t)
        return torch.where((cond >= 0)[:, None], eps_y, uncond(x_t, t))

    return unconditional, conditional


def check_guidance(
    guidance: Any,
    params: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    sampler: Any = "ddim",
    scales: Sequence[float] = (1.0, 4.0),
    n: int = 1000,
    seed: int = 0,
) -> None:
    """Check a guidance method; raise :class:`~diffkit.testing.ConformanceError` saying
    what is wrong if it breaks the contract.

    ``guidance`` is a built guidance or a registered name (built with ``params`` for
    2-D points with 3 classes; its Params model is checked too). The model it steers is
    exact: the denoiser of a mixture of 3 Gaussians (conditional when the guidance
    sets ``requires_conditional_denoiser``, else unconditional), and the classifier of a
    guidance that has one (a ``logits(process, x_t, t)`` method, or a 0.1 ``classifier``
    attribute) is replaced for the check by the mixture's exact p(y | x_t). Samples are drawn by ``sampler`` (a registered name, default
    ``ddim``, or a sampler object). The properties, all under ``torch.inference_mode()``:

    - at scale 0 the wrapped prediction is ``predict(x_t, t, cond)`` exactly, and the
      samples are the unguided ones bit for bit (all that is checked of a guidance that
      sets ``needs_labels = False``, such as autoguidance, whose direction needs a trained model);
    - rows whose label is −1 are left unguided at every scale;
    - the mean p(y | x_0) of the samples asked for label y rises with every scale in
      ``scales`` and by at least 0.05 in all: guidance moves samples toward the label.
    """
    ctx = BuildContext(sample_shape=(2,), num_classes=K)
    subject = resolve("guidance", guidance, params, registry, ctx)
    g = subject.obj
    subject.expect(callable(getattr(g, "wrap", None)), f"a guidance must have a wrap method, got {type(g).__name__}")
    schedule = reference_schedule()
    unconditional, conditional = _models(schedule)
    model = conditional if getattr(g, "requires_conditional_denoiser", False) else unconditional
    run = _sampler(sampler, registry, schedule)
    with ExitStack() as stack:
        if callable(getattr(g, "logits", None)):
            stack.enter_context(restored_attribute(g, "logits", exact_logits))
        elif isinstance(getattr(g, "classifier", None), nn.Module):
            stack.enter_context(restored_attribute(g, "classifier", ExactClassifier(schedule)))
        stack.enter_context(torch.inference_mode())
        _check_scale_zero(subject, model, schedule, run, seed)
        if not getattr(g, "needs_labels", True):  # steers without labels: only scale 0 is checked here
            return
        _check_unlabelled_rows(subject, model, schedule, scales, seed)
        _check_moves_toward_label(subject, model, schedule, run, scales, n, seed)


def _sampler(sampler: Any, registry: Registry | None, schedule: Schedule) -> Any:
    from diffkit.spec import current_registry

    if not isinstance(sampler, str):
        return sampler
    try:
        return (registry or current_registry()).build("sampler", {"type": sampler, "steps": 50}, BuildContext())
    except Exception as exc:
        raise ConformanceError(
            f"check_guidance draws samples with the sampler '{sampler}', which could not be built: {exc};"
            " pass sampler=... (a sampler object)"
        ) from None


def _wrap(subject: Subject, model: CondPredict, schedule: Schedule, cond: Tensor, scale: float) -> Predict:
    wrapped = subject.obj.wrap(model, schedule, cond, scale=scale)
    subject.expect(callable(wrapped), f"wrap(...) must return predict(x_t, t), got {type(wrapped).__name__}")
    return wrapped


def _states(seed: int, n: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(n, 2, generator=gen)
    t = torch.randint(0, T, (n,), generator=gen)
    cond = torch.randint(-1, K, (n,), generator=gen)
    return x, t, cond


def _draw(run: Any, predict: Predict, schedule: Schedule, n: int, seed: int) -> Tensor:
    return run(predict, schedule, (n, 2), generator=torch.Generator().manual_seed(seed))


def _check_scale_zero(subject: Subject, model: CondPredict, schedule: Schedule, run: Any, seed: int) -> None:
    x, t, cond = _states(seed, 64, schedule.T)
    wrapped = _wrap(subject, model, schedule, cond, 0.0)
    plain = model(x, t, cond)
    got = wrapped(x, t)
    subject.expect(
        isinstance(got, Tensor) and got.shape == plain.shape and torch.equal(got, plain),
        "at scale 0 the guided prediction must be predict(x_t, t, cond) unchanged; it differs by up to"
        f" {max_abs(got, plain) if isinstance(got, Tensor) and got.shape == plain.shape else math.inf:.3g}."
        " Is scale=0 taken for 'not given' (`scale or self.scale`)? Test `scale is None`",
    )
    guided = _draw(run, wrapped, schedule, 64, seed)
    unguided = _draw(run, lambda x_t, t_: model(x_t, t_, cond), schedule, 64, seed)
    subject.expect(torch.equal(guided, unguided), "at scale 0 the samples must be the unguided ones bit for bit")


def _check_unlabelled_rows(
    subject: Subject, model: CondPredict, schedule: Schedule, scales: Sequence[float], seed: int
) -> None:
    x, t, cond = _states(seed + 1, 64, schedule.T)
    cond[::2] = -1
    for scale in scales:
        got = _wrap(subject, model, schedule, cond, scale)(x, t)
        plain = model(x, t, cond)
        subject.expect(
            torch.allclose(got[::2], plain[::2], rtol=1e-5, atol=1e-6),
            f"at scale {scale} rows whose label is −1 (no label) must be left unguided; they moved by up to"
            f" {max_abs(got[::2], plain[::2]):.3g}",
        )


def _check_moves_toward_label(
    subject: Subject, model: CondPredict, schedule: Schedule, run: Any, scales: Sequence[float], n: int, seed: int
) -> None:
    y = torch.full((n,), LABEL)
    shares = []
    for scale in (0.0, *scales):
        x = _draw(run, _wrap(subject, model, schedule, y, scale), schedule, n, seed)
        subject.expect(bool(torch.isfinite(x).all()), f"the samples guided at scale {scale} are not finite")
        shares.append(MIXTURE.class_posterior(x.double(), 1.0)[:, LABEL].mean().item())
    rising = all(a < b for a, b in zip(shares, shares[1:]))
    subject.expect(
        rising and shares[-1] - shares[0] >= 0.05,
        f"guidance must move samples toward the asked label as the scale grows: with the exact classifier the"
        f" mean p(y | x_0) of {n} samples at scales {[0.0, *scales]} is {[round(s, 3) for s in shares]};"
        " check the sign of the guidance term and that `scale` is used",
    )
