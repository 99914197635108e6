"""Hypothesis strategies for property tests of diffusion components.

    from hypothesis import given
    from diffkit.testing import check_schedule
    from diffkit.testing.strategies import schedule_params

    @given(schedule_params("sigmoid"))
    def test_every_valid_sigmoid_schedule_conforms(section):
        check_schedule(section["type"], {k: v for k, v in section.items() if k != "type"})

:func:`params` derives a strategy from any Params model (its fields' types and bounds),
so a new component's parameters are covered without writing one by hand.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import torch
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from diffkit.registry import Registry

__all__ = ["params", "component_params", "schedule_params", "timesteps", "timestep_batches", "shapes", "dtypes", "seeds"]

INT_SPAN = 1000
"""Integers with no upper bound (or a far one) are drawn from [lower, lower + INT_SPAN]."""
FLOAT_RANGE = 100.0
"""Floats with no bound on a side are drawn from [−FLOAT_RANGE, FLOAT_RANGE] on that side."""


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator().manual_seed``."""
    return st.integers(0, 2**32 - 1)


def dtypes(*, half: bool = False) -> st.SearchStrategy[torch.dtype]:
    """Floating dtypes data comes in: float32 and float64 (and bfloat16 with ``half``)."""
    return st.sampled_from([torch.float32, torch.float64, *([torch.bfloat16] if half else [])])


def shapes(
    kind: Literal["points", "images", "any"] = "any",
    *,
    max_batch: int = 8,
    max_dim: int = 8,
    max_side: int = 8,
    max_channels: int = 3,
) -> st.SearchStrategy[tuple[int, ...]]:
    """Batch shapes: points ``(B, D)``, images ``(B, C, H, W)``, or either."""
    batch = st.integers(1, max_batch)
    points = st.tuples(batch, st.integers(1, max_dim))
    images = st.tuples(batch, st.integers(1, max_channels), st.integers(1, max_side), st.integers(1, max_side))
    return {"points": points, "images": images, "any": points | images}[kind]


def timesteps(T: int) -> st.SearchStrategy[int]:
    """A timestep of a schedule of T steps: 0 .. T − 1."""
    return st.integers(0, T - 1)


def timestep_batches(T: int, batch: int) -> st.SearchStrategy[torch.Tensor]:
    """Integer timesteps of shape ``[batch]``, as samplers and denoisers receive them."""
    return st.lists(timesteps(T), min_size=batch, max_size=batch).map(lambda ts: torch.tensor(ts, dtype=torch.long))


def params(model: type[BaseModel], **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Valid parameters of a Params model, as a dict.

    Each field is drawn from its type and bounds (``Field(ge=…, lt=…)``): ints, floats,
    bools, ``Literal`` choices and ``X | None``. A field of another type keeps its
    default; give it a strategy in ``overrides`` (which also narrow any field, e.g.
    ``timesteps=st.integers(2, 100)``). Draws the model's own validators reject are
    filtered out.
    """
    fields = {}
    for name, info in model.model_fields.items():
        if name in overrides:
            fields[name] = overrides[name]
        else:
            fields[name] = _field(model, name, info)
    unknown = set(overrides) - set(model.model_fields)
    if unknown:
        raise TypeError(f"{model.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return st.fixed_dictionaries(fields).filter(lambda d: _valid(model, d))


def component_params(
    kind: str, name: str, registry: Registry | None = None, **overrides: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """A spec section ``{"type": name, **parameters}`` of a registered component, its
    parameters drawn by :func:`params`."""
    from diffkit.spec import current_registry

    entry = (registry or current_registry()).get(kind, name)
    return params(entry.component.params, **overrides).map(lambda d: {"type": name, **d})


def schedule_params(
    name: str, registry: Registry | None = None, *, max_timesteps: int = 1000, **overrides: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """A schedule section ``{"type": name, ...}`` with parameters drawn from the
    schedule's Params model; a ``timesteps`` field is kept within ``max_timesteps``."""
    from diffkit.spec import current_registry

    entry = (registry or current_registry()).get("schedule", name)
    model = entry.component.params
    if "timesteps" in model.model_fields and "timesteps" not in overrides:
        low, _ = _int_bounds(model.model_fields["timesteps"])
        overrides["timesteps"] = st.integers(max(low, 2), max(max_timesteps, low, 2))
    return params(model, **overrides).map(lambda d: {"type": name, **d})


def _valid(model: type[BaseModel], values: dict[str, Any]) -> bool:
    try:
        model.model_validate(values)
    except ValidationError:
        return False
    return True


def _bounds(info: FieldInfo) -> dict[str, float]:
    out: dict[str, float] = {}
    for meta in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            value = getattr(meta, key, None)
            if isinstance(meta, annotated_types.BaseMetadata) and value is not None:
                out[key] = value
    return out


def _int_bounds(info: FieldInfo) -> tuple[int, int]:
    b = _bounds(info)
    low = int(b["ge"]) if "ge" in b else int(b["gt"]) + 1 if "gt" in b else 0
    high = int(b["le"]) if "le" in b else int(b["lt"]) - 1 if "lt" in b else low + INT_SPAN
    return low, min(high, low + INT_SPAN)


def _float_strategy(info: FieldInfo) -> st.SearchStrategy[float]:
    b = _bounds(info)
    low = b.get("ge", b.get("gt", -FLOAT_RANGE))
    high = b.get("le", b.get("lt", FLOAT_RANGE))
    return st.floats(
        min_value=low, max_value=high, exclude_min="gt" in b, exclude_max="lt" in b, allow_nan=False, allow_infinity=False
    )


def _field(model: type[BaseModel], name: str, info: FieldInfo) -> st.SearchStrategy[Any]:
    strategy = _for_type(info.annotation, info)
    if strategy is not None:
        return strategy
    if not info.is_required():
        return st.just(info.get_default(call_default_factory=True))
    raise TypeError(
        f"cannot draw {model.__name__}.{name} of type {info.annotation!r}; pass a strategy for it: {name}=st...."
    )


def _for_type(annotation: Any, info: FieldInfo) -> st.SearchStrategy[Any] | None:
    origin = get_origin(annotation)
    if origin is Literal:
        return st.sampled_from(get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        inner: Sequence[st.SearchStrategy[Any] | None] = [_for_type(a, info) for a in args]
        if any(s is None for s in inner):
            return None
        options = st.one_of(*inner)  # type: ignore[arg-type]
        return st.none() | options if len(args) < len(get_args(annotation)) else options
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(*_int_bounds(info))
    if annotation is float:
        return _float_strategy(info)
    return None
