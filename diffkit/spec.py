"""The declarative pipeline spec.

A spec is a YAML, JSON or TOML document (or a dict) such as::

    seed: 0
    data: {type: moons, noise: 0.05}
    schedule: {type: linear, timesteps: 1000}
    denoiser: {type: mlp}
    objective: {type: epsilon}
    sampler: {type: ddpm}
    train: {steps: 3000, batch_size: 512}

Its pydantic model is built from the registry after plugins load: each component
section is a discriminated union of the installed components of that kind, tagged by
``type``, with the component's own parameters inline. Only registered components
can be chosen: a spec never names code to import.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetJsonSchemaHandler, ValidationError, create_model
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError

from diffkit.errors import ComponentLookupError, SpecError
from diffkit.plugins import get_registry
from diffkit.registry import Registry

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["Spec", "TrainConfig", "spec_model", "validate_spec", "load_spec", "dump_spec", "json_schema", "data_shape", "SECTIONS"]

# spec section -> kind of component; the order is the order sections are written in
SECTIONS: dict[str, str] = {
    "data": "data",
    "schedule": "schedule",
    "denoiser": "denoiser",
    "objective": "objective",
    "sampler": "sampler",
}
# sections that may be left out, and the component a spec then gets (if installed)
DEFAULTS: dict[str, str] = {"schedule": "linear", "objective": "epsilon", "sampler": "ddpm"}


class TrainConfig(BaseModel):
    """How ``diffkit train`` and ``Pipeline.fit`` train the denoiser."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(3000, ge=1, description="Number of optimiser steps.")
    batch_size: int = Field(512, ge=1, description="Examples per optimiser step.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient's global norm to this value; null disables.")
    ema_decay: float = Field(
        0.999, ge=0, lt=1, description="Decay of the exponential moving average of the weights used for sampling."
    )
    log_every: int = Field(50, ge=1, description="Steps between entries of metrics.jsonl.")
    preview: int = Field(
        1000, ge=0, description="Samples drawn after training for the run directory's samples picture; 0 disables."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: 'auto' takes CUDA, then MPS, when available."
    )


class Spec(BaseModel):
    """Base of the spec model; the component sections are added from the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    seed: int = Field(0, description="Seed of every random draw in training.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")


def _section_validator(registry: Registry, kind: str):
    tags = registry.tags(kind)

    def check(value: Any) -> Any:
        if isinstance(value, str):  # `sampler: ddpm` is short for `sampler: {type: ddpm}`
            value = {"type": value}
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if not isinstance(value, Mapping):
            return value  # pydantic reports the wrong type
        tag = value.get("type")
        if tag is None:
            raise PydanticCustomError(
                "missing_type", "needs a 'type': one of {choices}", {"choices": ", ".join(sorted(tags)) or "(none installed)"}
            )
        if tag not in tags:
            try:
                registry.get(kind, str(tag))
            except ComponentLookupError as exc:
                raise PydanticCustomError("unknown_component", str(exc)) from None
        return value

    return check


def _section_type(registry: Registry, kind: str) -> Any:
    by_entry: dict[str, list[str]] = {}
    models = {}
    for tag, entry in registry.tags(kind).items():
        by_entry.setdefault(entry.qualified, []).append(tag)
        models[entry.qualified] = entry
    members = []
    for qualified, tags in by_entry.items():
        entry = models[qualified]
        name = "".join(p.capitalize() for p in f"{kind}-{entry.plugin}-{entry.name}".replace(".", "-").replace("_", "-").split("-"))
        model = create_model(
            name,
            __base__=entry.component.params,
            __doc__=entry.component.description or entry.component.params.__doc__,
            type=(Literal[tuple(sorted(tags, key=lambda s: (":" in s, s)))], Field(description=f"{kind} component")),
        )
        members.append(model)
    validator = BeforeValidator(_section_validator(registry, kind))
    # the tags a bare name may use: those of components with no required parameter
    bare = [
        tag
        for tag, e in registry.tags(kind).items()
        if not any(f.is_required() for f in e.component.params.model_fields.values())
    ]
    shorthand = _Shorthand(tuple(sorted(bare, key=lambda s: (":" in s, s))))
    if not members:
        return Annotated[dict, validator]
    if len(members) == 1:
        return Annotated[members[0], validator, shorthand]
    return Annotated[Annotated[Union[tuple(members)], Field(discriminator="type")], validator, shorthand]


@dataclass(frozen=True)
class _Shorthand:
    """Lets the JSON Schema accept what the validator accepts: a bare component name
    (``sampler: ddpm``) as well as a section, so editors do not flag the short form."""

    tags: tuple[str, ...]

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        section = handler(core_schema)
        if not self.tags:
            return section
        name = {"type": "string", "enum": list(self.tags), "description": "A bare name is short for {type: NAME}."}
        return {"anyOf": [section, name]}


_cache: dict[tuple[int, int], type[Spec]] = {}


def spec_model(registry: Registry | None = None) -> type[Spec]:
    """The pydantic model of a spec for the components in ``registry`` (cached)."""
    registry = registry or get_registry()
    key = (id(registry), registry.generation)
    if key not in _cache:
        fields: dict[str, Any] = {}
        for section, kind in SECTIONS.items():
            typ = _section_type(registry, kind)
            default = DEFAULTS.get(section)
            if default is not None and default in registry.tags(kind):
                fields[section] = (typ, Field({"type": default}, description=f"The {kind} (default: {default})."))
            else:
                fields[section] = (typ, Field(..., description=f"The {kind}."))
        _cache[key] = create_model("DiffkitSpec", __base__=Spec, **fields)
    return _cache[key]


def _problems(err: ValidationError, data: Any) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc = list(e["loc"])
        # drop the union tag pydantic inserts after a section name (`denoiser.mlp.hidden`)
        if len(loc) >= 2 and loc[0] in SECTIONS and isinstance(data, Mapping):
            section = data.get(loc[0])
            if isinstance(section, Mapping) and loc[1] == section.get("type"):
                del loc[1]
        path = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
            section = data.get(loc[0]) if isinstance(data, Mapping) and loc else None
            if len(loc) == 2 and isinstance(section, Mapping):
                msg += f" (see `diffkit schema` for the parameters of {loc[0]} '{section.get('type')}')"
        elif e["type"] == "missing":
            msg = "required; add it"
        out.append((path, msg))
    return out


def validate_spec(data: Any, registry: Registry | None = None, *, source: str | None = None) -> Spec:
    """Validate a spec given as a dict (or a Spec) against the installed components.

    Raises :class:`~diffkit.errors.SpecError` listing every problem with its field
    path; then runs each component's cross-checks (e.g. network against data shape).
    """
    registry = registry or get_registry()
    model = spec_model(registry)
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if not isinstance(data, Mapping):
        raise SpecError([("", f"a spec must be a mapping of sections, got {type(data).__name__}")], source)
    try:
        spec = model.model_validate(dict(data))
    except ValidationError as err:
        raise SpecError(_problems(err, data), source) from None
    problems = []
    token = _validating.set(registry)
    try:
        for section, kind in SECTIONS.items():
            section_model = getattr(spec, section)
            check = registry.get(kind, section_model.type).component.check
            if check is not None:
                problems += [(section, msg) for msg in check(section_model, spec)]
        # The schedule is cheap to build; building it catches parameters that validate one
        # by one but give no valid ᾱ (e.g. ᾱ underflowing to 0).
        try:
            T: int | None = registry.build("schedule", spec.schedule).T
        except SpecError as exc:
            problems.append(("schedule", f"these parameters give no valid schedule: {exc.problems[0][1]}"))
            T = None
        # By convention a sampler's `steps` parameter counts reverse steps, at most T.
        steps = getattr(spec.sampler, "steps", None)
        if isinstance(steps, int) and T is not None and steps > T:
            problems.append(
                ("sampler.steps", f"{steps} exceeds the schedule's T = {T}; lower it, or leave it null to take all T")
            )
    finally:
        _validating.reset(token)
    if problems:
        raise SpecError(problems, source)
    return spec


# The registry a spec is being validated against, so that component checks calling
# data_shape() look the data up where the spec is being validated.
_validating: ContextVar[Registry | None] = ContextVar("diffkit_validating_registry", default=None)


def data_shape(data_section: BaseModel | Mapping[str, Any], registry: Registry | None = None) -> tuple[int, ...] | None:
    """The shape of one sample of a data section, from its parameters alone, if the
    dataset component can tell without loading (``Component.data_shape``); else None.

    Component checks use it to compare a network with the data, e.g.::

        def check(params, spec):
            shape = data_shape(spec.data)
    """
    registry = registry or _validating.get() or get_registry()
    section = data_section.model_dump() if isinstance(data_section, BaseModel) else dict(data_section)
    entry = registry.get("data", str(section.get("type")))
    if entry.component.data_shape is None:
        return None
    params = entry.component.params.model_validate({k: v for k, v in section.items() if k != "type"})
    shape = entry.component.data_shape(params)
    return None if shape is None else tuple(shape)


def _parse(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([("", f"no such spec file: {path}")]) from None
    except OSError as exc:
        raise SpecError([("", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            return tomllib.loads(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")], str(path)) from None
    except json.JSONDecodeError as exc:
        raise SpecError([("", f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([("", f"not valid TOML: {exc}")], str(path)) from None
    raise SpecError([("", f"unknown spec format '{suffix}'; use .yaml, .yml, .json or .toml")], str(path))


def load_spec(spec: str | Path | Mapping[str, Any] | Spec, registry: Registry | None = None) -> Spec:
    """A validated spec from a file path (YAML, JSON or TOML), a dict, or a Spec."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        return validate_spec(_parse(path), registry, source=str(path))
    return validate_spec(spec, registry)


def to_dict(spec: Spec) -> dict[str, Any]:
    """The spec as plain data, each section's ``type`` first."""
    raw = spec.model_dump(mode="json")
    out: dict[str, Any] = {"seed": raw.pop("seed")}
    for section in SECTIONS:
        body = raw.pop(section)
        out[section] = {"type": body.pop("type"), **body}
    out.update(raw)
    return out


def dump_spec(spec: Spec, path: str | Path | None = None) -> str:
    """The spec as YAML; written to ``path`` if given."""
    text = yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The JSON Schema of a spec for the installed components (for editors)."""
    schema = spec_model(registry).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "diffkit pipeline spec"
    return schema
