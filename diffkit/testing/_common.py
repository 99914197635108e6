"""What every conformance check shares: the error it raises, resolving a component
given by name or as an object, and the checks of a component's Params model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

from diffkit.errors import DiffkitError, SpecError
from diffkit.interfaces import BuildContext, Schedule
from diffkit.registry import Registry

__all__ = ["ConformanceError", "Subject", "resolve", "check_params", "reference_schedule", "max_abs", "restored_attribute"]


class ConformanceError(AssertionError):
    """A component breaks its interface's contract; the message says which property and how.

    It is an ``AssertionError``, so pytest reports it as a failed check with the message."""


class Subject:
    """The component under test and how messages name it (``schedule 'sigmoid'``)."""

    def __init__(self, obj: Any, label: str) -> None:
        self.obj = obj
        self.label = label

    def fail(self, message: str) -> ConformanceError:
        """The error for a broken property, prefixed with the component's label."""
        return ConformanceError(f"{self.label}: {message}")

    def expect(self, condition: bool, message: str) -> None:
        """Raise :class:`ConformanceError` with ``message`` unless ``condition`` holds."""
        if not condition:
            raise self.fail(message)


def _registry(registry: Registry | None) -> Registry:
    from diffkit.spec import current_registry

    return registry or current_registry()


def resolve(
    kind: str,
    component: Any,
    params: Mapping[str, Any] | None,
    registry: Registry | None,
    ctx: BuildContext,
) -> Subject:
    """The component to check: built from the registry when given by name (its Params
    model checked too), or taken as it is when given as an object."""
    if not isinstance(component, str):
        if params:
            raise TypeError("params apply only to a component given by name; build the object with them instead")
        return Subject(component, f"{kind} {type(component).__name__}")
    reg = _registry(registry)
    label = f"{kind} '{component}'"
    try:
        entry = reg.get(kind, component)
    except DiffkitError as exc:
        raise ConformanceError(f"{label}: not in the registry: {exc}") from None
    check_params(entry.component.params, label)
    section = {"type": component, **dict(params or {})}
    from diffkit.spec import using_registry

    try:
        # Built under a fixed seed, without touching the caller's global generator: the same
        # weights every time, whatever ran before.
        with torch.random.fork_rng(devices=[]), using_registry(reg):  # nested sections resolve here too
            torch.manual_seed(0)
            obj = reg.build(kind, section, ctx)
    except DiffkitError as exc:
        raise ConformanceError(f"{label}: could not be built from {section}: {_one_line(exc)}") from None
    return Subject(obj, label)


def _one_line(exc: DiffkitError) -> str:
    if isinstance(exc, SpecError):
        return "; ".join(f"{path}: {msg}" if path else msg for path, msg in exc.problems)
    return str(exc)


def check_params(model: type[BaseModel], label: str = "component") -> None:
    """A component's Params model: it rejects unknown keys, every field has a description
    (the spec's JSON Schema and reference documentation are made from them), and its
    JSON Schema can be built."""
    if model.model_config.get("extra") != "forbid":
        raise ConformanceError(
            f"{label}: its Params model accepts unknown keys; derive it from diffkit.Params"
            " (or set model_config = ConfigDict(extra='forbid'))"
        )
    bare = [name for name, info in model.model_fields.items() if not info.description]
    if bare:
        raise ConformanceError(
            f"{label}: Params field(s) {', '.join(bare)} have no description;"
            " give each a Field(..., description='...'): it becomes the spec's documentation"
        )
    try:
        model.model_json_schema()
    except Exception as exc:  # pydantic raises several kinds for types it cannot describe
        raise ConformanceError(
            f"{label}: the JSON Schema of its Params model cannot be built ({type(exc).__name__}: {exc});"
            " use types pydantic can describe (numbers, strings, Literal, lists, nested models)"
        ) from None


def reference_schedule(T: int = 1000) -> Schedule:
    """The linear schedule β_t = linspace(1e-4, 0.02, T) (Ho et al. 2020, Sec. 4), built
    directly so that the checks need no schedule plugin."""
    return Schedule.from_betas(torch.linspace(1e-4, 0.02, T, dtype=torch.float64))


def max_abs(a: Tensor, b: Tensor) -> float:
    """The largest absolute difference of two tensors, compared in float64."""
    return (a.detach().double() - b.detach().double()).abs().max().item()


@contextmanager
def restored_attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name`` to ``value`` for the duration, then put the old value back."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
