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

A component's parameters may themselves name components (:class:`ComponentSection`),
e.g. a sampler that drives another one::

    sampler:
      type: my-wrapper
      base: {type: ddim, steps: 100}

Such a nested section is validated against the same union of installed components as
a top-level one, and its problems are reported at its full path (``sampler.base.steps``).
"""

from __future__ import annotations

import json
import json.scanner
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError

from diffkit.errors import ComponentLookupError, DiffkitError, PluginError, SpecError
from diffkit.interfaces import BuildContext
from diffkit.plugins import get_registry
from diffkit.registry import KINDS, SEED_RANGE, Entry, Registry, Seed, loop_sampler_problem, plugin_fault
from diffkit.requirements import requirement_problem

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "Spec",
    "TrainConfig",
    "SampleConfig",
    "ComponentSection",
    "nested_sections",
    "iter_sections",
    "build_section",
    "using_registry",
    "current_registry",
    "spec_model",
    "validate_spec",
    "load_spec",
    "parse_spec_file",
    "dump_spec",
    "json_schema",
    "data_shape",
    "SECTIONS",
    "Seed",
    "SEED_RANGE",
    "check_seed",
    "OPTIONAL_SECTIONS",
    "register_upgrade",
    "upgrade_spec",
    "complete_saved_spec",
]

# spec section -> kind of component; the order is the order sections are written in
SECTIONS: dict[str, str] = {
    "data": "data",
    "schedule": "schedule",
    "denoiser": "denoiser",
    "objective": "objective",
    "sampler": "sampler",
    "guidance": "guidance",
}
# sections a spec may leave out altogether (then ``None``, and not written back)
OPTIONAL_SECTIONS: frozenset[str] = frozenset({"guidance"})
# sections that may be left out, and the component a spec then gets (if installed)
DEFAULTS: dict[str, str] = {"schedule": "linear", "objective": "epsilon", "sampler": "ddpm"}


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed`` if torch's generators accept it; else a :class:`SpecError` naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError([(name, f"must be an integer, got {seed!r}")])
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        low, high = SEED_RANGE
        raise SpecError([(name, f"{seed} is outside the 64-bit seeds torch takes; give one from {low} to {high}")])
    return seed


class TrainConfig(BaseModel):
    """How ``diffkit train`` and ``Pipeline.fit`` train the denoiser."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    steps: int = Field(3000, ge=1, description="Number of optimiser steps.")
    batch_size: int = Field(
        512,
        ge=1,
        description="Examples per forward pass on each process; an optimiser step sees"
        " batch_size × grad_accum × processes of them (the effective batch size).",
    )
    grad_accum: int = Field(1, ge=1, description="Forward and backward passes whose gradients are summed per optimiser step.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate (the peak, after warm-up).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up from 0.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="The learning rate after warm-up: 'constant', or 'cosine' decay to min_lr at the last step"
        " (Loshchilov & Hutter 2017, Eq. 5).",
    )
    min_lr: float = Field(0.0, ge=0, description="The learning rate cosine decay ends at; at most lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient's global norm to this value; null disables.")
    ema_decay: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="Decay of the exponential moving average of the weights used for sampling, warmed up as"
        " min(decay, (1 + k)/(10 + k)) at update k; 0 samples with the trained weights themselves.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Arithmetic of the forward pass: 'bf16' autocasts on CPU and CUDA; 'fp16' autocasts with"
        " gradient scaling, on CUDA only. Weights, optimiser state and EMA stay float32.",
    )
    cond_drop_prob: float = Field(
        0.1,
        ge=0,
        le=1,
        description="For a conditional denoiser (num_classes set): the fraction of training labels replaced by"
        " 'no label', so that one network learns both ε(x, y) and the unconditional ε(x, ∅)"
        " (Ho & Salimans 2022, Alg. 1); 0 trains a purely conditional network.",
    )
    log_every: int = Field(50, ge=1, description="Steps between entries of metrics.jsonl.")
    preview: int = Field(
        1000, ge=0, description="Samples drawn after training for the run directory's samples picture; 0 disables."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where to train: 'auto' takes CUDA, then MPS, when available."
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes for datasets read from files; in-memory data needs none."
    )
    checkpoint_every: int = Field(
        1000,
        ge=0,
        description="Steps between training checkpoints in the run directory's checkpoints/ (one is always"
        " written at the end); 0 writes only the last.",
    )
    keep_checkpoints: int = Field(3, ge=1, description="How many of the newest checkpoints to keep.")
    skip_nonfinite: int = Field(
        0,
        ge=0,
        description="Steps whose loss is NaN or infinite that may be skipped (no update) before training stops;"
        " 0 stops at the first. Checks every step when above 0 (one device sync per step).",
    )
    log: Literal["jsonl", "tensorboard"] = Field(
        "jsonl",
        description="Where metrics go besides metrics.jsonl: 'tensorboard' also writes TensorBoard event files"
        " to the run directory's tensorboard/ (needs the tensorboard package: pip install 'diffkit[tensorboard]').",
    )
    sample_every: int = Field(
        0,
        ge=0,
        description="Steps between pictures of `preview` samples from the EMA weights, written to the run"
        " directory's samples/ during training; 0 disables.",
    )
    compile: bool = Field(
        False,
        description="Train the network through torch.compile (compiled kernels cached on disk; where compiling"
        " fails, one line says why and training runs uncompiled). The weights and checkpoints are the same.",
    )

    @field_validator("min_lr")
    @classmethod
    def _min_lr_at_most_lr(cls, value: float, info: ValidationInfo) -> float:
        lr = info.data.get("lr")
        if lr is not None and value > lr:
            raise ValueError(f"min_lr ({value}) exceeds lr ({lr}); set it to at most lr")
        return value


def _installed(requirement: str) -> str:
    """One entry of ``requires:``, met by the installed distributions."""
    problem = requirement_problem(requirement)
    if problem is not None:
        raise PydanticCustomError("requirement", problem)
    return requirement


class SampleConfig(BaseModel):
    """Options of sampling from the model (``sample:``), beside the sampler's own parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    compile: bool = Field(
        False,
        description="Run the network through torch.compile when sampling (compiled kernels cached on disk; where"
        " compiling fails, one line says why and sampling runs uncompiled); --compile on the command line.",
    )


class Spec(BaseModel):
    """Base of the spec model; the component sections are added from the registry."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    requires: list[Annotated[str, AfterValidator(_installed)]] = Field(
        default_factory=list,
        description="Distributions the spec needs, as pip requirements (e.g. 'diffkit-sigmoid>=0.2'), each"
        " checked against the installed ones; name the plugins that provide its components here.",
    )
    seed: Seed = Field(0, description="Seed of every random draw in training.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Sampling settings.")


# -- nested component sections -------------------------------------------------------------
@dataclass(frozen=True)
class _NestedKind:
    """Marks a parameter whose value is a section naming a component of ``kind``."""

    kind: str


def _plain_section(kind: str):
    """What a nested section accepts when its Params are validated alone (``Registry.build``):
    a bare name or a mapping with a ``type``. The spec model replaces it with the full union."""

    def check(value: Any) -> Any:
        if isinstance(value, str):
            return {"type": value}
        if isinstance(value, BaseModel):
            return value.model_dump()
        if isinstance(value, Mapping):
            if "type" not in value:
                raise PydanticCustomError("missing_type", "a {kind} section needs a 'type'", {"kind": kind})
            if not isinstance(value["type"], str):
                raise _type_not_a_name(value["type"], set(current_registry().tags(kind)))
            return dict(value)
        return value  # pydantic reports the wrong type

    return check


class ComponentSection:
    """The type of a parameter that names another component, as a section of its own.

    ``ComponentSection["sampler"]`` accepts what a spec's ``sampler:`` accepts (a bare
    name or ``{type: NAME, ...parameters}``) and holds it as a dict; the spec model
    validates it against the installed samplers, with problems at the full path
    (``sampler.base.steps``), and the JSON Schema offers the same choices. A factory
    builds it with :func:`build_section`::

        class WrapperParams(diffkit.Params):
            base: ComponentSection["sampler"] = Field({"type": "ddpm"}, description="...")

    Nesting goes one level deep: a component with sections of its own cannot be named
    inside another's.
    """

    def __class_getitem__(cls, kind: str) -> Any:
        if kind not in KINDS:
            raise TypeError(f"unknown kind of component '{kind}'; kinds are {', '.join(KINDS)}")
        return Annotated[dict[str, Any], BeforeValidator(_plain_section(kind)), _NestedKind(kind)]


def nested_sections(params: type[BaseModel]) -> dict[str, str]:
    """The parameters of a Params model that are component sections: ``{field: kind}``."""
    out = {}
    for name, info in params.model_fields.items():
        for meta in info.metadata:
            if isinstance(meta, _NestedKind):
                out[name] = meta.kind
    return out


def current_registry() -> Registry:
    """The registry a spec is being validated or a pipeline built against (else the process-wide one)."""
    return _validating.get() or get_registry()


@contextmanager
def using_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the one :func:`current_registry` returns, for building a pipeline's components."""
    token = _validating.set(registry)
    try:
        yield registry
    finally:
        _validating.reset(token)


def build_section(kind: str, section: Any, ctx: BuildContext, path: str) -> Any:
    """Build the component a nested section names, from :func:`current_registry`.

    ``path`` is where the section sits in a spec (``sampler.base``); problems are
    raised as a :class:`SpecError` at that path."""
    registry = current_registry()
    if isinstance(section, BaseModel):
        section = section.model_dump()
    if isinstance(section, str):
        section = {"type": section}
    tag = section.get("type") if isinstance(section, Mapping) else None
    if not isinstance(tag, str):
        what = "needs a 'type'" if tag is None else f"type must be a component's name, got a {type(tag).__name__}"
        choices = ", ".join(sorted(registry.tags(kind)))
        raise SpecError([(path if tag is None else f"{path}.type", f"{what}: one of {choices}")])
    try:
        entry = registry.get(kind, str(tag))
    except ComponentLookupError as exc:
        raise SpecError([(path, str(exc))]) from None
    if nested_sections(entry.component.params):
        raise SpecError([(path, _nesting_message(kind, str(tag)))])
    return registry.build(kind, section, ctx, path=path)


def _nesting_message(kind: str, tag: str) -> str:
    return f"{kind} '{tag}' has component sections of its own, so it cannot be nested inside another component"


# -- the spec model ----------------------------------------------------------------------------
def _section_validator(registry: Registry, kind: str, nested: bool = False):
    tags = registry.tags(kind)
    if nested:  # the choices a nested section has: components without sections of their own
        choices = {tag for tag, e in tags.items() if not nested_sections(e.component.params)}
    else:
        choices = set(tags)

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
                "missing_type", "needs a 'type': one of {choices}", {"choices": ", ".join(sorted(choices)) or "(none installed)"}
            )
        if not isinstance(tag, str):
            raise _type_not_a_name(tag, choices)
        if tag not in tags:
            try:
                registry.get(kind, str(tag))
            except ComponentLookupError as exc:
                raise PydanticCustomError("unknown_component", str(exc)) from None
        elif nested and nested_sections(tags[tag].component.params):
            raise PydanticCustomError("nested_component", _nesting_message(kind, str(tag)))
        return value

    return check


def _type_not_a_name(tag: Any, choices: set[str]) -> PydanticCustomError:
    return PydanticCustomError(
        "type_not_a_name",
        "type must be a component's name, got a {got}; one of {choices}",
        {"got": type(tag).__name__, "choices": ", ".join(sorted(choices)) or "(none installed)"},
    )


def _member_model(entry: Any, kind: str, tags: list[str], nested_types: dict[str, Any]) -> type[BaseModel]:
    """The section model of one component: its Params plus the ``type`` tag, with each
    nested section's field retyped as the union of that kind."""
    name = "".join(p.capitalize() for p in f"{kind}-{entry.plugin}-{entry.name}".replace(".", "-").replace("_", "-").split("-"))
    params = entry.component.params
    fields: dict[str, Any] = {
        "type": (Literal[tuple(sorted(tags, key=lambda s: (":" in s, s)))], Field(description=f"{kind} component"))
    }
    for field, sub_kind in nested_sections(params).items():
        info = params.model_fields[field]
        default: dict[str, Any] = {"description": info.description, "validate_default": True}
        if info.default_factory is not None:
            default["default_factory"] = info.default_factory
        elif not info.is_required():
            default["default"] = info.default
        fields[field] = (Annotated[nested_types[sub_kind], _NestedKind(sub_kind)], Field(**default))
    return create_model(
        name, __base__=params, __doc__=entry.component.description or params.__doc__, **fields
    )


def _union(registry: Registry, kind: str, members: list[type[BaseModel]], bare: list[str], nested: bool) -> Any:
    validator = BeforeValidator(_section_validator(registry, kind, nested))
    shorthand = _Shorthand(tuple(sorted(bare, key=lambda s: (":" in s, s))))
    if not members:
        return Annotated[dict, validator]
    if len(members) == 1:
        return Annotated[members[0], validator, shorthand]
    return Annotated[Annotated[Union[tuple(members)], Field(discriminator="type")], validator, shorthand]


def _section_types(registry: Registry) -> dict[str, Any]:
    """The type of a section of each kind. Components without nested sections are built
    first; their unions type the nested sections of the others (one level deep)."""
    flat: dict[str, list[type[BaseModel]]] = {}
    flat_bare: dict[str, list[str]] = {}
    deep: dict[str, list[tuple[Any, list[str]]]] = {}
    bare: dict[str, list[str]] = {}
    for kind in KINDS:
        by_entry: dict[str, list[str]] = {}
        entries = {}
        for tag, entry in registry.tags(kind).items():
            by_entry.setdefault(entry.qualified, []).append(tag)
            entries[entry.qualified] = entry
        flat[kind], flat_bare[kind], deep[kind], bare[kind] = [], [], [], []
        for qualified, tags in by_entry.items():
            entry = entries[qualified]
            # the tags a bare name may use: those of components with no required parameter
            no_required = not any(f.is_required() for f in entry.component.params.model_fields.values())
            if nested_sections(entry.component.params):
                deep[kind].append((entry, tags))
            else:
                flat[kind].append(_member_model(entry, kind, tags, {}))
                flat_bare[kind] += tags if no_required else []
            bare[kind] += tags if no_required else []
    nested_types = {kind: _union(registry, kind, flat[kind], flat_bare[kind], nested=True) for kind in KINDS}
    out = {}
    for kind in KINDS:
        members = flat[kind] + [_member_model(e, kind, tags, nested_types) for e, tags in deep[kind]]
        out[kind] = _union(registry, kind, members, bare[kind], nested=False)
    return out


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
        types = _section_types(registry)
        fields: dict[str, Any] = {}
        for section, kind in SECTIONS.items():
            default = DEFAULTS.get(section)
            if section in OPTIONAL_SECTIONS:
                fields[section] = (Union[types[kind], None], Field(None, description=f"The {kind} (optional)."))
            elif default is not None and default in registry.tags(kind):
                fields[section] = (types[kind], Field({"type": default}, description=f"The {kind} (default: {default})."))
            else:
                fields[section] = (types[kind], Field(..., description=f"The {kind}."))
        _cache[key] = create_model("DiffkitSpec", __base__=Spec, **fields)
    return _cache[key]


def _clean_loc(loc: list[Any], data: Any) -> tuple[list[Any], Any]:
    """The field path without the union tags pydantic inserts after a section name
    (``denoiser.mlp.hidden`` → ``denoiser.hidden``, ``sampler.my-wrapper.base.ddim.steps`` →
    ``sampler.base.steps``), and the data at the path's parent."""
    out: list[Any] = []
    node, parent = data, None
    for part in loc:
        if isinstance(node, str) and out:  # a bare name stands for {type: name}
            node = {"type": node}
        if out and isinstance(node, Mapping) and isinstance(part, str) and part not in node and part == node.get("type"):
            continue
        out.append(part)
        parent = node
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return out, parent


def _problems(err: ValidationError, data: Any) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        loc, parent = _clean_loc(list(e["loc"]), data)
        path = ".".join(str(p) for p in loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
            if len(loc) >= 2 and isinstance(parent, Mapping) and "type" in parent:
                where = ".".join(str(p) for p in loc[:-1])
                msg += f" (see `diffkit schema` for the parameters of {where} '{parent.get('type')}')"
        elif e["type"] == "missing":
            msg = "required; add it"
        elif e["type"] == "type_not_a_name":
            path += ".type"
            msg = msg.removeprefix("type ")
        out.append((path, msg))
    return out


def _sections(model: BaseModel, path: str, kind: str) -> Iterator[tuple[str, str, BaseModel]]:
    """A validated section and the sections nested in it, as ``(path, kind, section)``."""
    yield path, kind, model
    for field, sub_kind in nested_sections(type(model)).items():
        sub = getattr(model, field)
        if isinstance(sub, BaseModel):
            yield from _sections(sub, f"{path}.{field}", sub_kind)


def iter_sections(spec: Spec) -> Iterator[tuple[str, str, BaseModel]]:
    """Every component section of a validated spec, nested ones included, as
    ``(path, kind, section)``: ``("sampler", "sampler", …)``, ``("sampler.base", "sampler", …)``."""
    for section, kind in SECTIONS.items():
        if getattr(spec, section) is not None:
            yield from _sections(getattr(spec, section), section, kind)


def complete_saved_spec(data: Any, registry: Registry | None = None) -> Any:
    """A spec read back from a run directory or a checkpoint, with the parameters it lacks
    because it was written before they existed set to what the component did then (each
    component's ``Params.saved_defaults``), nested sections included. A copy; sections whose
    component is unknown are left for validation to report."""
    import copy

    registry = registry or current_registry()

    def complete(section: Any, kind: str) -> None:
        if not isinstance(section, dict) or not isinstance(section.get("type"), str):
            return
        try:
            params = registry.get(kind, section["type"]).component.params
        except (ComponentLookupError, KeyError):
            return
        for name, value in getattr(params, "saved_defaults", {}).items():
            if name in params.model_fields and name not in section:
                section[name] = copy.deepcopy(value)
        for name, sub_kind in nested_sections(params).items():
            complete(section.get(name), sub_kind)

    if not isinstance(data, Mapping):
        return data
    data = copy.deepcopy(dict(data))
    for name, kind in SECTIONS.items():
        complete(data.get(name), kind)
    return data


# -- specs of earlier releases ---------------------------------------------------------------
SpecUpgrade = Callable[[Mapping[str, Any]], "tuple[dict[str, Any], str | None]"]
_upgrades: list[SpecUpgrade] = []


def register_upgrade(upgrade: SpecUpgrade) -> None:
    """Have every spec pass through ``upgrade(data) -> (data, notice)`` before it is
    validated: a plugin rewrites a form an earlier release wrote into today's, saying so in
    a one-line ``notice`` (``None`` where it changed nothing). Registering twice is a no-op."""
    if upgrade not in _upgrades:
        _upgrades.append(upgrade)


def upgrade_spec(data: Mapping[str, Any], say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """``data`` through every registered upgrade; each notice goes to ``say`` (stderr by default)."""
    out = dict(data)
    for upgrade in _upgrades:
        out, notice = upgrade(out)
        if notice:
            (say or (lambda msg: print(f"diffkit: {msg}", file=sys.stderr)))(notice)
    return out


def validate_spec(
    data: Any, registry: Registry | None = None, *, source: str | None = None, check_inputs: bool = False
) -> Spec:
    """Validate a spec given as a dict (or a Spec) against the installed components.

    Raises :class:`~diffkit.errors.SpecError` listing every problem with its field
    path; then runs each component's cross-checks (e.g. network against data shape),
    those of nested sections included. With ``check_inputs``, also what components will
    read from outside the spec (``Component.check_inputs``: an image folder that exists
    and holds images), as ``diffkit validate`` does.
    """
    registry = registry or get_registry()
    model = spec_model(registry)
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    if not isinstance(data, Mapping):
        raise SpecError([("", f"a spec must be a mapping of sections, got {type(data).__name__}")], source)
    data = upgrade_spec(data)
    try:
        spec = model.model_validate(dict(data))
    except ValidationError as err:
        raise SpecError(_problems(err, data), source) from None
    problems = []
    token = _validating.set(registry)
    try:
        sections = list(iter_sections(spec))
        for path, kind, section_model in sections:
            entry = registry.get(kind, section_model.type)
            check = entry.component.check
            if check is not None:
                problems += _plugin_call(entry, path, lambda: [(path, msg) for msg in check(section_model, spec)])
            check_in = entry.component.check_inputs if check_inputs else None
            if check_in is not None:
                problems += _plugin_call(
                    entry, path, lambda: [(f"{path}.{field}", msg) for field, msg in check_in(section_model)]
                )
        # The schedule is cheap to build; building it catches parameters that validate one
        # by one but give no valid ᾱ (e.g. ᾱ underflowing to 0).
        # The data is not loaded while validating: a stand-in for its diameter lets a process
        # that derives a parameter from the data (ve's sigma_max: null) build.
        try:
            process = registry.build("schedule", spec.schedule, BuildContext(data_diameter=VALIDATION_DIAMETER))
            T: int | None = process.T if getattr(process, "discrete", False) else None
        except SpecError as exc:
            problems.append(("schedule", f"these parameters give no valid schedule: {exc.problems[0][1]}"))
            process, T = None, None
        except PluginError as exc:
            problems.append(("schedule", str(exc)))
            process, T = None, None
        # By convention a sampler's `steps` parameter counts reverse steps, at most T;
        # that holds for samplers nested in another (a wrapper's base) too.
        for path, kind, section_model in sections:
            steps = getattr(section_model, "steps", None) if kind == "sampler" else None
            if isinstance(steps, int) and T is not None and steps > T:
                problems.append(
                    (f"{path}.steps", f"{steps} exceeds the schedule's T = {T}; lower it, or leave it null to take all T")
                )
        problems += _build_sections(spec, registry, process, problems)
    finally:
        _validating.reset(token)
    if problems:
        raise SpecError(problems, source)
    return spec


VALIDATION_DIAMETER = 10.0


def _plugin_call(entry: Entry, path: str, call: Callable[[], list[tuple[str, str]]]) -> list[tuple[str, str]]:
    """The problems a component's own check returns; one that raises is a fault of its plugin, at ``path``."""
    try:
        return call()
    except (DiffkitError, MemoryError):
        raise
    except Exception as exc:
        return [(path, str(plugin_fault(entry, path, exc)))]


def _build_sections(
    spec: Spec, registry: Registry, process: Any, known: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Build every section a spec's data allows without loading it, so that a factory's
    error is a spec error at its path: the denoiser on PyTorch's ``meta`` device (nothing
    allocated, however large), for one sample of the data's shape where the dataset can
    tell it without loading; the objective; and the sampler, which is then checked against
    the process (a plugin API version 1 sampler runs on discrete tables only). Sections
    that already have a problem, and samplers with sections of their own (their guidance
    needs the data's labels), are left to their checks."""
    problems: list[tuple[str, str]] = []
    seen = {path.split(".")[0] for path, _ in known}
    data_entry = registry.get("data", spec.data.type)
    shape = None
    if "data" not in seen and data_entry.component.data_shape is not None:
        found: list[tuple[int, ...] | None] = []

        def read_shape() -> list[tuple[str, str]]:
            found.append(data_shape(spec.data, registry))
            return []

        problems += _plugin_call(data_entry, "data", read_shape)
        shape = found[0] if found else None
    ctx = BuildContext(
        sample_shape=tuple(shape or ()),
        seed=spec.seed,
        data_kind="images" if shape is not None and len(shape) == 3 else "points",
        data_diameter=VALIDATION_DIAMETER,
    )
    for section in ("denoiser", "objective", "sampler"):
        kind, model = SECTIONS[section], getattr(spec, section)
        if section in seen or (section == "denoiser" and shape is None):
            continue
        if section == "sampler" and nested_sections(registry.get(kind, model.type).component.params):
            continue
        try:
            built = _build_cheaply(registry, kind, model, ctx, section)
        except SpecError as exc:
            problems += exc.problems
            continue
        except PluginError as exc:
            problems.append((section, str(exc)))
            continue
        if section == "sampler" and process is not None:
            why = loop_sampler_problem(registry.get(kind, model.type), built, process)
            if why is not None:
                problems.append((section, why))
    return problems


def _build_cheaply(registry: Registry, kind: str, section: BaseModel, ctx: BuildContext, path: str) -> Any:
    """Build a section for validation, leaving torch's random state as it was; a denoiser
    on the ``meta`` device, or on the CPU where its factory needs real tensors."""
    import torch

    with torch.random.fork_rng(devices=[]):
        if kind != "denoiser":
            return registry.build(kind, section, ctx, path=path)
        try:
            with torch.device("meta"):
                return registry.build(kind, section, ctx, path=path)
        except PluginError:  # a factory computing with real tensors: what it raises on the CPU is its fault
            return registry.build(kind, section, ctx, path=path)

# The registry a spec is being validated against (or a pipeline built against), so that
# component checks calling data_shape() and factories building nested sections look
# components up where the spec is being validated.
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


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int = 0, first: int = 0) -> None:
        super().__init__(f"the key '{key}' at line {line} is given twice (first at line {first}); keep one of them")
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (as TOML does)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by the keys beside it
                continue
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
            except TypeError:  # an unhashable key: the safe loader refuses it
                pass
        return super().construct_mapping(node, deep=deep)


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _json_key_lines(text: str, start: int, key: str) -> list[int]:
    """The lines where the JSON object whose body begins at ``start`` gives ``key``."""
    lines, depth, i = [], 0, start
    while i < len(text):
        c = text[i]
        if c == '"':
            value, i = json.decoder.scanstring(text, i + 1)
            if depth == 0 and value == key and text[i:].lstrip().startswith(":"):
                lines.append(text.count("\n", 0, i) + 1)
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            if depth == 0:
                break
            depth -= 1
        i += 1
    return lines


def _load_json(text: str) -> Any:
    """``json.loads``, refusing a key given twice in one object, with the lines of both."""
    decoder = json.JSONDecoder(object_pairs_hook=_json_object)
    parse_object = decoder.parse_object

    def parse(s_and_end: tuple[str, int], *args: Any) -> Any:
        try:
            return parse_object(s_and_end, *args)
        except _DuplicateKey as exc:
            if exc.line:
                raise
            lines = _json_key_lines(*s_and_end, exc.key) + [0, 0]
            raise _DuplicateKey(exc.key, lines[1], lines[0]) from None

    decoder.parse_object = parse  # type: ignore[method-assign]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # the pure-Python scanner calls parse_object
    return decoder.decode(text)


def _parse(path: Path) -> Any:
    suffix = path.suffix.lower()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SpecError([("", f"no such spec file: {path}")]) from None
    except OSError as exc:
        raise SpecError([("", f"cannot read {path}: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, bad = raw.count(b"\n", 0, exc.start) + 1, raw[exc.start : exc.start + 1]
        problem = f"not UTF-8 text: byte {exc.start} (line {line}) is {bad!r}; save it as UTF-8"
        raise SpecError([("", problem)], str(path)) from None
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        if suffix == ".json":
            return _load_json(text)
        if suffix == ".toml":
            return tomllib.loads(text)
    except _DuplicateKey as exc:
        raise SpecError([("", str(exc))], str(path)) from None
    except RecursionError:
        raise SpecError([("", "nested too deeply to read; a spec needs only a few levels")], str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError([("", f"not valid YAML{where}: {getattr(exc, 'problem', exc)}")], str(path)) from None
    except json.JSONDecodeError as exc:
        raise SpecError([("", f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError([("", f"not valid TOML: {exc}")], str(path)) from None
    raise SpecError([("", f"unknown spec format '{suffix}'; use .yaml, .yml, .json or .toml")], str(path))


def parse_spec_file(path: str | Path) -> Any:
    """The data of a spec file (YAML, JSON or TOML), parsed but not validated."""
    return _parse(Path(path))


def load_spec(
    spec: str | Path | Mapping[str, Any] | Spec, registry: Registry | None = None, *, check_inputs: bool = False
) -> Spec:
    """A validated spec from a file path (YAML, JSON or TOML), a dict, or a Spec
    (``check_inputs``: see :func:`validate_spec`)."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        return validate_spec(_parse(path), registry, source=str(path), check_inputs=check_inputs)
    return validate_spec(spec, registry, check_inputs=check_inputs)


def to_dict(spec: Spec) -> dict[str, Any]:
    """The spec as plain data, each section's ``type`` first (nested sections' too)."""
    raw = spec.model_dump(mode="json")
    requires = raw.pop("requires")
    out: dict[str, Any] = {"requires": requires} if requires else {}
    out["seed"] = raw.pop("seed")
    for section, kind in SECTIONS.items():
        body = raw.pop(section)
        if body is not None:
            out[section] = _type_first(body, getattr(spec, section))
    out.update(raw)
    return out


def _type_first(body: dict[str, Any], model: BaseModel) -> dict[str, Any]:
    body = dict(body)
    out = {"type": body.pop("type"), **body}
    for field in nested_sections(type(model)):
        sub = getattr(model, field)
        if isinstance(sub, BaseModel) and isinstance(out.get(field), dict):
            out[field] = _type_first(out[field], sub)
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
