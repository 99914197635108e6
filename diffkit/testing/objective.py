"""``check_objective``: an objective's target converts back to the true ε, x_0 and score,
and its loss is a finite scalar that trains the network."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diffkit import diffusion as D
from diffkit.interfaces import BuildContext, Objective, Schedule
from diffkit.registry import Registry
from diffkit.testing._common import Subject, max_abs, reference_schedule, resolve

__all__ = ["check_objective"]

F64 = torch.float64


class _TinyDenoiser(nn.Module):
    """A small network for the loss check: a linear map of the flattened x_t and the
    scaled timestep."""

    def __init__(self, dim: int, T: int) -> None:
        super().__init__()
        self.T = T
        self.lin = nn.Linear(dim + 1, dim)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        flat = x_t.reshape(x_t.shape[0], -1)
        h = torch.cat([flat, (t.to(x_t.dtype) / self.T)[:, None]], dim=1)
        return self.lin(h).reshape(x_t.shape)


def check_objective(
    objective: Objective | str,
    params: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    schedule: Schedule | None = None,
    seed: int = 0,
) -> None:
    """Check an objective; raise :class:`~diffkit.testing.ConformanceError` saying what
    is wrong if it breaks the contract.

    ``objective`` is a built :class:`~diffkit.Objective` or a registered name (built with
    ``params``; its Params model is checked too). On ``schedule`` (default: linear,
    T = 1000), for points and images and timesteps from 0 to T − 1:

    - conversions round-trip: the output of a perfect network, ``target(x_0, ε, x_t, t)``,
      converts back to the true ε (``to_eps``), x_0 (``to_x0``) and score −ε/σ_t
      (``to_score``), in float64 to 1e-6, and every conversion keeps float32 as float32;
    - ``loss(denoiser, schedule, x_0, generator=…)`` is a finite scalar, the same for one
      seed, and sends a finite, non-zero gradient to every parameter of a small network;
    - ``weight(t, schedule, like)``, where it is not ``None``, is finite, non-negative
      and one value per sample.
    """
    subject = resolve("objective", objective, params, registry, BuildContext())
    obj = subject.obj
    subject.expect(
        isinstance(obj, Objective),
        f"an objective must subclass diffkit.Objective (define target and to_eps), got {type(obj).__name__}",
    )
    sch = schedule or reference_schedule()
    gen = torch.Generator().manual_seed(seed)
    for shape in ((64, 2), (8, 1, 4, 4)):
        _check_round_trip(subject, obj, sch, shape, gen)
        _check_float32(subject, obj, sch, shape, gen)
    _check_loss(subject, obj, sch, seed)


def _draw(sch: Schedule, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> tuple[Tensor, ...]:
    x0 = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    eps = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    t = torch.randint(0, sch.T, (shape[0],), generator=gen)
    t[0], t[-1] = 0, sch.T - 1
    return x0, eps, t, sch.q_sample(x0, t, eps)


def _check_round_trip(subject: Subject, obj: Objective, sch: Schedule, shape: tuple[int, ...], gen: torch.Generator) -> None:
    x0, eps, t, x_t = _draw(sch, shape, F64, gen)
    target = obj.target(x0, eps, x_t, t, sch)
    subject.expect(
        isinstance(target, Tensor) and target.shape == x0.shape,
        f"target must have x_0's shape {tuple(shape)}, got {tuple(getattr(target, 'shape', ()))}",
    )
    score = D.eps_to_score(eps, sch.alpha_bar(t, x_t))
    for name, got, want in (
        ("to_eps", obj.to_eps(target, x_t, t, sch), eps),
        ("to_x0", obj.to_x0(target, x_t, t, sch), x0),
        ("to_score", obj.to_score(target, x_t, t, sch), score),
    ):
        scale = 1.0 + want.abs().max().item()
        err = max_abs(got, want) if isinstance(got, Tensor) and got.shape == want.shape else math.inf
        truth = {"to_eps": "the true ε", "to_x0": "the true x_0", "to_score": "the true score −ε/σ_t"}[name]
        subject.expect(
            err <= 1e-6 * scale,
            f"{name}(target, x_t, t) must give back {truth} when the network's output is exactly its target;"
            f" it is off by {err:.3g} for data of shape {tuple(shape)}. Check {name} against target",
        )


def _check_float32(subject: Subject, obj: Objective, sch: Schedule, shape: tuple[int, ...], gen: torch.Generator) -> None:
    x0, eps, t, x_t = _draw(sch, shape, torch.float32, gen)
    target = obj.target(x0, eps, x_t, t, sch)
    for name, out in (
        ("target", target),
        ("to_eps", obj.to_eps(target, x_t, t, sch)),
        ("to_x0", obj.to_x0(target, x_t, t, sch)),
        ("to_score", obj.to_score(target, x_t, t, sch)),
    ):
        subject.expect(
            isinstance(out, Tensor) and out.dtype == torch.float32,
            f"{name} must keep float32 data float32, got {getattr(out, 'dtype', type(out).__name__)}"
            " (cast float64 coefficients with .to(x.dtype))",
        )


def _check_loss(subject: Subject, obj: Objective, sch: Schedule, seed: int) -> None:
    with torch.random.fork_rng():  # seeded initial weights, the caller's global generator untouched
        torch.manual_seed(seed)
        net = _TinyDenoiser(2, sch.T)
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(seed))
    t = torch.arange(32) * (sch.T // 32)
    w = obj.weight(t, sch, x0)
    if w is not None:
        subject.expect(
            isinstance(w, Tensor) and w.shape == (32,) and bool(torch.isfinite(w).all() and (w >= 0).all()),
            f"weight(t, schedule, like) must be None or a finite, non-negative tensor of shape [batch], got {w!r}",
        )
    losses = [obj.loss(net, sch, x0, None, torch.Generator().manual_seed(seed)) for _ in range(2)]
    loss = losses[0]
    subject.expect(
        isinstance(loss, Tensor) and loss.ndim == 0 and bool(torch.isfinite(loss)),
        f"loss must be a finite scalar tensor, got {loss!r}",
    )
    subject.expect(
        torch.equal(losses[0].detach(), losses[1].detach()),
        "two losses with the same generator seed differ: draw t and ε from the `generator` argument",
    )
    subject.expect(loss.requires_grad, "the loss carries no gradient: it must be computed from the network's output")
    loss.backward()
    grads = [p.grad for p in net.parameters()]
    subject.expect(
        all(g is not None and bool(torch.isfinite(g).all()) for g in grads),
        "the loss does not send a finite gradient to every parameter of the network",
    )
    subject.expect(
        any(float(g.abs().sum()) > 0 for g in grads if g is not None), "the loss's gradient is zero for every parameter"
    )
