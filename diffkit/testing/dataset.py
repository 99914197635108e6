"""``check_dataset``: a dataset yields ``(x, y)`` in model space, of the shape it declares,
with labels in range, the same data for the same seed, and what its component says it
holds before it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from diffkit.interfaces import BuildContext
from diffkit.registry import Registry
from diffkit.spec import using_registry
from diffkit.testing._common import Subject, _registry, resolve

__all__ = ["check_dataset"]

ITEMS = 16
"""How many items are read one by one (the first and the last ones)."""


def check_dataset(
    dataset: Any,
    params: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    seed: int = 0,
) -> None:
    """Check a dataset; raise :class:`~diffkit.testing.ConformanceError` saying what is
    wrong if it breaks the contract.

    ``dataset`` is a built :class:`diffkit.Dataset` or a registered name, built with
    ``params`` and a :class:`~diffkit.BuildContext` of ``seed`` (its Params model is
    checked too). The properties:

    - it has at least one item, ``kind`` is ``"points"`` or ``"images"``, and
      ``sample_shape`` is a tuple of positive sizes (``(C, H, W)`` for images);
    - ``dataset[i]`` is ``(x, y)``: x a finite floating-point tensor of ``sample_shape``,
      y an integer label: −1 for none; in ``[0, num_classes)`` where ``num_classes`` is set;
    - images lie in [−1, 1];
    - ``tensors()``, where it gives tensors, is ``(x [N, *sample_shape], y [N])`` and
      agrees with ``dataset[i]`` item by item;
    - built twice with one seed it holds the same data, whatever the state of torch's
      global generator (all randomness comes from ``ctx.seed``);
    - given by name, the component's ``data_shape(params)`` (what ``diffkit validate``
      knows without loading) equals the built dataset's ``sample_shape``.
    """
    ctx = BuildContext(seed=seed)
    subject = resolve("data", dataset, params, registry, ctx)
    ds = subject.obj
    _check_declared(subject, ds)
    n = len(ds)
    indices = sorted(set(range(min(ITEMS // 2, n))) | set(range(max(n - ITEMS // 2, 0), n)))
    items = [_item(subject, ds, i) for i in indices]
    _check_tensors(subject, ds, indices, items)
    if isinstance(dataset, str):
        _check_registered(subject, dataset, params, registry, ds, seed, indices, items)


def _check_declared(subject: Subject, ds: Any) -> None:
    try:
        n = len(ds)
    except TypeError:
        raise subject.fail(f"a dataset must have a length (__len__), {type(ds).__name__} has none") from None
    subject.expect(n >= 1, "the dataset is empty; a dataset must hold at least one item")
    kind = getattr(ds, "kind", None)
    subject.expect(kind in ("points", "images"), f"kind must be 'points' or 'images', got {kind!r}")
    shape = getattr(ds, "sample_shape", None)
    subject.expect(
        isinstance(shape, tuple) and len(shape) >= 1 and all(isinstance(s, int) and s >= 1 for s in shape),
        f"sample_shape must be a tuple of positive sizes, got {shape!r}",
    )
    if kind == "images":
        subject.expect(len(shape) == 3, f"images must have sample_shape (C, H, W), got {shape}")
    classes = getattr(ds, "num_classes", None)
    subject.expect(
        classes is None or (isinstance(classes, int) and not isinstance(classes, bool) and classes >= 1),
        f"num_classes must be None (no labels) or a positive integer, got {classes!r}",
    )


def _item(subject: Subject, ds: Any, i: int) -> tuple[Tensor, int]:
    item = ds[i]
    subject.expect(
        isinstance(item, tuple) and len(item) == 2,
        f"dataset[{i}] must be a pair (x, y), got {type(item).__name__}"
        + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""),
    )
    x, y = item
    shape = ds.sample_shape
    subject.expect(
        isinstance(x, Tensor) and tuple(x.shape) == tuple(shape),
        f"dataset[{i}]'s x must be a tensor of sample_shape {shape}, got "
        + (f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__),
    )
    subject.expect(x.is_floating_point(), f"dataset[{i}]'s x must be floating point, got {x.dtype}")
    subject.expect(bool(torch.isfinite(x).all()), f"dataset[{i}]'s x holds NaN or infinite values")
    if ds.kind == "images":
        lo, hi = float(x.min()), float(x.max())
        subject.expect(
            lo >= -1.0 and hi <= 1.0,
            f"images must lie in [-1, 1] (model space), dataset[{i}] spans [{lo:.4g}, {hi:.4g}]; map pixels p in"
            " [0, 1] as 2p − 1",
        )
    label = y.item() if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point() else y
    subject.expect(
        isinstance(label, int) and not isinstance(label, bool),
        f"dataset[{i}]'s y must be an integer label (−1 for none), got {y!r}",
    )
    classes = ds.num_classes
    if classes is None:  # labels that no model is trained on (moons keeps which moon); −1 is the usual
        subject.expect(label >= -1, f"dataset[{i}]'s label is {label}; a label is −1 (none) or a class index")
    else:
        subject.expect(
            label == -1 or 0 <= label < classes,
            f"dataset[{i}]'s label {label} is outside [0, num_classes = {classes}) (−1 for no label)",
        )
    return x, label


def _check_tensors(subject: Subject, ds: Any, indices: list[int], items: list[tuple[Tensor, int]]) -> None:
    both = ds.tensors()
    if both is None:
        return
    subject.expect(isinstance(both, tuple) and len(both) == 2, "tensors() must return (x, y) or None")
    x, y = both
    n = len(ds)
    subject.expect(
        isinstance(x, Tensor) and tuple(x.shape) == (n, *ds.sample_shape),
        f"tensors()'s x must have shape [len, *sample_shape] = {[n, *ds.sample_shape]}, got "
        + (f"{list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__),
    )
    subject.expect(
        isinstance(y, Tensor) and tuple(y.shape) == (n,) and not y.is_floating_point(),
        f"tensors()'s y must be integer labels of shape [{n}], got "
        + (f"{y.dtype} of shape {list(y.shape)}" if isinstance(y, Tensor) else type(y).__name__),
    )
    for i, (xi, yi) in zip(indices, items):
        subject.expect(
            torch.equal(x[i], xi) and int(y[i]) == yi,
            f"tensors() and dataset[{i}] disagree; the training fast path reads tensors(), other code dataset[i]",
        )


def _check_registered(
    subject: Subject,
    name: str,
    params: Mapping[str, Any] | None,
    registry: Registry | None,
    ds: Any,
    seed: int,
    indices: list[int],
    items: list[tuple[Tensor, int]],
) -> None:
    # built again with torch's global generator in another state: only ctx.seed may decide the data
    reg = _registry(registry)
    with torch.random.fork_rng(devices=[]), using_registry(reg):
        torch.manual_seed(seed + 12345)
        again = reg.build("data", {"type": name, **dict(params or {})}, BuildContext(seed=seed))
    subject.expect(len(again) == len(ds), f"built twice with seed {seed} it holds {len(ds)} and {len(again)} items")
    for i, (x, y) in zip(indices, items):
        x2, y2 = again[i]
        subject.expect(
            torch.equal(x, x2) and int(y2) == y,
            f"built twice with seed {seed}, item {i} differs: draw the data from a generator seeded with ctx.seed,"
            " never from torch's global generator",
        )
    entry = _registry(registry).get("data", name)
    if entry.component.data_shape is not None:
        model = entry.component.params.model_validate(dict(params or {}))
        declared = entry.component.data_shape(model)
        subject.expect(
            declared is None or tuple(declared) == tuple(ds.sample_shape),
            f"its component's data_shape(params) says {tuple(declared) if declared is not None else None}, but the"
            f" built dataset's sample_shape is {tuple(ds.sample_shape)}; diffkit validate checks networks against"
            " data_shape, so they must agree",
        )
