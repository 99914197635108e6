"""``check_denoiser``: a network keeps its input's shape, dtype and device, treats every
sample of a batch on its own, is deterministic in eval mode, and learns."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from diffkit.interfaces import BuildContext
from diffkit.registry import Registry
from diffkit.testing._common import Subject, max_abs, resolve

__all__ = ["check_denoiser"]

BATCH = 4
T = 1000  # the timesteps fed to the network lie in [0, T − 1]


def check_denoiser(
    denoiser: nn.Module | str,
    params: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    sample_shape: Sequence[int] = (2,),
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> None:
    """Check a denoiser network; raise :class:`~diffkit.testing.ConformanceError` saying
    what is wrong if it breaks the contract.

    ``denoiser`` is a built ``nn.Module`` or a registered name, built with ``params`` and
    a :class:`~diffkit.BuildContext` of ``sample_shape`` and ``num_classes`` (its Params
    model is checked too). With ``num_classes`` the network is also called with labels
    (``cond``), −1 among them meaning "no label". The properties, for a batch of
    ``[4, *sample_shape]`` with four different timesteps:

    - ``net(x_t, t, cond)`` returns a finite tensor of x_t's shape, dtype (float32, and
      float64 after ``.double()``) and device (cpu, plus ``device`` if given, e.g. cuda);
    - batch independence: changing one sample (and its timestep) leaves the outputs of
      the others unchanged, and a sample alone gives what it gives in the batch; the
      usual culprit is a reduction over the batch dimension, or batch statistics;
    - in eval mode two calls give the same output;
    - in train mode a loss on the output sends a finite gradient to every parameter.

    The checks run on copies; ``denoiser`` itself is left as it was.
    """
    shape = tuple(int(s) for s in sample_shape)
    kind = "images" if len(shape) == 3 else "points"
    ctx = BuildContext(sample_shape=shape, num_classes=num_classes, data_kind=kind)
    subject = resolve("denoiser", denoiser, params, registry, ctx)
    subject.expect(
        isinstance(subject.obj, nn.Module),
        f"a denoiser must be a torch.nn.Module, got {type(subject.obj).__name__}",
    )
    net: nn.Module = copy.deepcopy(subject.obj).float().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, *shape), generator=gen)
    t = torch.tensor([0, T // 3, 2 * T // 3, T - 1])
    conds: list[Tensor | None] = [None]
    if num_classes:
        conds.append(torch.tensor([0, num_classes - 1, -1, 0]))
    with torch.no_grad():
        for cond in conds:
            out = _call(subject, net, x, t, cond)
            again = _call(subject, net, x, t, cond)
            subject.expect(
                torch.equal(out, again),
                f"in eval mode two calls on the same input differ by up to {max_abs(out, again):.3g};"
                " a denoiser must be deterministic in eval mode (dropout and other randomness only in train mode)",
            )
            _check_batch_independence(subject, net, x, t, cond, out, gen)
        as64 = copy.deepcopy(net).double()
        _call(subject, as64, x.double(), t, conds[-1])
        if device is not None and torch.device(device).type != "cpu":
            moved = copy.deepcopy(net).to(device)
            _call(subject, moved, x.to(device), t.to(device), None if conds[-1] is None else conds[-1].to(device))
    _check_gradients(subject, copy.deepcopy(net).train(), x, t, conds[-1], gen)


def _call(subject: Subject, net: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
    with_labels = "" if cond is None else " with labels"
    try:
        out = net(x, t, cond)
    except Exception as exc:
        raise subject.fail(
            f"net(x_t, t{', cond' if cond is not None else ''}) raised {type(exc).__name__}: {exc}"
            f" (x_t of shape {tuple(x.shape)} {x.dtype}, t of shape {tuple(t.shape)}{with_labels})"
        ) from exc
    subject.expect(isinstance(out, Tensor), f"a denoiser must return a tensor, got {type(out).__name__}")
    subject.expect(
        out.shape == x.shape and out.dtype == x.dtype and out.device == x.device,
        f"the output must have x_t's shape, dtype and device ({tuple(x.shape)}, {x.dtype}, {x.device}){with_labels};"
        f" got {tuple(out.shape)}, {out.dtype}, {out.device}",
    )
    subject.expect(bool(torch.isfinite(out).all()), f"the output is not finite for {x.dtype} input{with_labels}")
    return out


def _check_batch_independence(
    subject: Subject, net: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None, out: Tensor, gen: torch.Generator
) -> None:
    changed_x, changed_t = x.clone(), t.clone()
    changed_x[0] = 3.0 * torch.randn(x.shape[1:], generator=gen)
    changed_t[0] = T // 2
    changed = net(changed_x, changed_t, cond)
    drift = max_abs(changed[1:], out[1:])
    subject.expect(
        torch.allclose(changed[1:], out[1:], rtol=1e-4, atol=1e-5),
        f"changing sample 0 of a batch changed the outputs of the other samples by up to {drift:.3g}: the network"
        " mixes the batch. Each sample's output must depend on its own x_t, t and label only (no reductions over"
        " dimension 0, no BatchNorm statistics in eval mode)",
    )
    alone = net(x[1:2], t[1:2], None if cond is None else cond[1:2])
    subject.expect(
        torch.allclose(alone, out[1:2], rtol=1e-4, atol=1e-5),
        f"sample 1 alone gives an output that differs from its output in a batch of {x.shape[0]} by up to"
        f" {max_abs(alone, out[1:2]):.3g}: the network depends on the batch it is in",
    )


def _check_gradients(
    subject: Subject, net: nn.Module, x: Tensor, t: Tensor, cond: Tensor | None, gen: torch.Generator
) -> None:
    target = torch.randn(x.shape, generator=gen)
    loss = (net(x, t, cond) - target).square().mean()
    subject.expect(loss.requires_grad, "in train mode the output must carry gradients (is forward run under no_grad?)")
    loss.backward()
    trainable = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    subject.expect(bool(trainable), "the network has no trainable parameters")
    missing = [name for name, p in trainable if p.grad is None]
    subject.expect(
        not missing,
        f"parameter(s) {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} receive no gradient from the"
        " output: layers that are built but never used, or a computation detached from them",
    )
    bad = [name for name, p in trainable if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    subject.expect(not bad, f"the gradient of parameter(s) {', '.join(bad[:5])} is not finite")
    total = sum(float(p.grad.double().square().sum()) for _, p in trainable if p.grad is not None)
    subject.expect(total > 0, "every gradient is zero: the output does not depend on the parameters")
