"""The registry of components contributed by plugins.

A plugin's hook returns :class:`Component` records; the registry files each under
its kind together with where it came from (plugin, distribution, version). Names
are looked up plainly (``linear``) or qualified by plugin (``my-plugin:linear``);
two components of one kind and name are never resolved silently.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

import pluggy
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from diffkit import hookspecs
from diffkit.errors import ComponentLookupError, DiffkitError, PluginError, SpecError
from diffkit.interfaces import BuildContext

__all__ = ["Params", "Seed", "SEED_RANGE", "Component", "Entry", "PluginInfo", "Registry", "KINDS"]

KINDS: tuple[str, ...] = tuple(hookspecs.HOOKS)


# what torch's generators take: a 64-bit signed integer
SEED_RANGE = (-(2**63), 2**63 - 1)
Seed = Annotated[
    int,
    # a whole float too large for pydantic's integers (1e30) is compared with the range, not misparsed
    BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v),
    Field(ge=SEED_RANGE[0], le=SEED_RANGE[1]),
]
"""The type of a seed parameter: an integer torch's generators accept (64-bit signed)."""


class Params(BaseModel):
    """Base of every component's parameters: unknown keys are rejected, floats must be
    finite (NaN and ±inf are refused), and values are immutable once validated. Give
    every field a ``Field(description=...)``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    saved_defaults: ClassVar[Mapping[str, Any]] = {}
    """Values for parameters a saved run's spec lacks because it was written before they
    existed: a parameter added with a default that behaves otherwise than the component did
    before names the old behaviour here (``{"scale_by_sigma": False}``), so that a run saved
    earlier loads, samples and resumes as it was trained. A spec a user writes gets the
    field's default as always; only specs read back from a run directory or a checkpoint
    are completed this way (:func:`diffkit.spec.complete_saved_spec`)."""


@dataclass(frozen=True)
class Component:
    """What a plugin contributes: a named factory and the pydantic model of its parameters.

    ``factory(params, ctx)`` builds the component from validated ``params`` and a
    :class:`~diffkit.interfaces.BuildContext`. ``check(params, spec)``, if given, is
    called after the whole spec validates and returns problems that involve other
    parts of the spec (e.g. a network that does not fit the data's shape).
    """

    name: str
    factory: Callable[[Any, BuildContext], Any]
    params: type[BaseModel] = Params
    description: str = ""
    check: Callable[[Any, Any], list[str]] | None = None
    data_shape: Callable[[Any], tuple[int, ...] | None] | None = None
    """For datasets: the shape of one sample from the parameters alone, without loading."""
    check_inputs: Callable[[Any], list[tuple[str, str]]] | None = None
    """Problems with what the component will read from outside the spec (a data folder),
    as ``(parameter, message)`` pairs, found without loading it. ``diffkit validate`` runs
    it; reading a finished run does not, since its training data may since have moved."""


@dataclass(frozen=True)
class Entry:
    """A component as registered: the record plus its kind and provenance."""

    kind: str
    component: Component
    plugin: str
    distribution: str | None
    version: str | None
    api: int = hookspecs.API_VERSION
    """The plugin API version its plugin declares (``DIFFKIT_API_VERSION``; 1 where undeclared)."""

    @property
    def name(self) -> str:
        return self.component.name

    @property
    def qualified(self) -> str:
        return f"{self.plugin}:{self.component.name}"

    @property
    def source(self) -> str:
        dist = f" from {self.distribution} {self.version}" if self.distribution else ""
        return f"plugin '{self.plugin}'{dist}"

    @property
    def described(self) -> str:
        """``sampler 'heun' of plugin 'acme' (acme-edm 1.0)``: the component and where it came from."""
        dist = " ".join(v for v in (self.distribution, self.version) if v)
        return f"{self.kind} '{self.name}' of plugin '{self.plugin}'" + (f" ({dist})" if dist else "")


@dataclass
class PluginInfo:
    """What became of one plugin: ``loaded``, ``failed``, ``blocked`` or ``not-loaded``."""

    name: str
    distribution: str | None
    version: str | None
    status: str
    error: str | None = None
    builtin: bool = False


@dataclass
class Registry:
    """Components by kind, with where each came from, and what became of each plugin."""

    entries: dict[str, list[Entry]] = field(default_factory=lambda: {k: [] for k in KINDS})
    plugins: list[PluginInfo] = field(default_factory=list)
    pm: pluggy.PluginManager = field(default_factory=lambda: _new_plugin_manager())
    generation: int = 0
    """Bumped on every change, so that models built from the registry can be cached."""

    # -- registration --------------------------------------------------------------
    def register_plugin(
        self,
        plugin: object,
        name: str | None = None,
        *,
        distribution: str | None = None,
        version: str | None = None,
        builtin: bool = False,
    ) -> PluginInfo:
        """Register one plugin object (a module or instance with ``@hookimpl`` functions)
        and file the components its hooks return. Problems raise :class:`PluginError`."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if self.pm.has_plugin(name):
            raise PluginError(
                f"a plugin named '{name}' is already registered"
                f" (from {self._plugin_info(name).distribution or 'Python'}); plugin names must be unique"
            )
        api = _check_api_version(plugin, name, distribution, version)
        if builtin and getattr(plugin, hookspecs.API_VERSION_ATTRIBUTE, None) is None:
            api = hookspecs.API_VERSION  # diffkit's own plugins follow the API of their release
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # pluggy validates hook signatures here
            raise PluginError(
                f"plugin '{name}' could not be registered: {exc} (this diffkit provides plugin API version"
                f" {hookspecs.API_VERSION}; a plugin written for another version may implement its hooks differently)"
            ) from exc
        new: list[Entry] = []
        hook_called: str | None = None
        try:
            # pluggy accepts a hookimpl with no matching hookspec; a misspelt hook would
            # then contribute nothing without a word (optionalhook=True opts out).
            for caller in self.pm.get_hookcallers(plugin) or []:
                mine = [i for i in caller.get_hookimpls() if i.plugin_name == name and not i.optionalhook]
                if not caller.has_spec() and mine:
                    close = difflib.get_close_matches(caller.name, hookspecs.HOOKS.values(), n=1)
                    hooks = ", ".join(hookspecs.HOOKS.values())
                    hint = f"; did you mean '{close[0]}'?" if close else f"; the hooks are {hooks}"
                    raise PluginError(f"plugin '{name}' implements an unknown hook '{caller.name}'{hint}")
            for kind, hook in hookspecs.HOOKS.items():
                for impl in getattr(self.pm.hook, hook).get_hookimpls():
                    if impl.plugin_name != name:
                        continue
                    hook_called = hook
                    records = impl.function()
                    hook_called = None
                    for rec in records or []:
                        entry = self._entry(kind, rec, name, distribution, version, api)
                        if any(e.kind == kind and e.name == entry.name for e in new):
                            raise PluginError(f"plugin '{name}' gives more than one {kind} named '{entry.name}'")
                        new.append(entry)
        except BaseException as exc:  # sys.exit in a hook is the plugin's failure, not the end of the process
            self.pm.unregister(name=name)
            if isinstance(exc, (PluginError, KeyboardInterrupt)):
                raise  # whether a KeyboardInterrupt was the user's Ctrl-C, the caller knows
            if not isinstance(exc, Exception):
                raise PluginError(f"plugin '{name}' {describe_base_exception(exc)} in its hook {hook_called}") from exc
            raise PluginError(f"plugin '{name}' failed in its hook: {type(exc).__name__}: {exc}") from exc
        for entry in new:
            self.entries[entry.kind].append(entry)
        self.generation += 1
        info = PluginInfo(name, distribution, version, "loaded", builtin=builtin)
        self.plugins.append(info)
        return info

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin and every component it contributed."""
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        for kind in self.entries:
            self.entries[kind] = [e for e in self.entries[kind] if e.plugin != name]
        self.plugins = [p for p in self.plugins if p.name != name]
        self.generation += 1

    def _entry(self, kind: str, rec: object, plugin: str, dist: str | None, version: str | None, api: int) -> Entry:
        if not isinstance(rec, Component):
            raise PluginError(
                f"plugin '{plugin}' returned {type(rec).__name__} from {hookspecs.HOOKS[kind]};"
                " hooks must return a list of diffkit.Component records"
            )
        if not (isinstance(rec.params, type) and issubclass(rec.params, BaseModel)):
            raise PluginError(f"{kind} '{rec.name}' of plugin '{plugin}': params must be a pydantic model class")
        if rec.params.model_config.get("extra") != "forbid":
            raise PluginError(
                f"{kind} '{rec.name}' of plugin '{plugin}': its Params model must reject unknown keys;"
                " derive it from diffkit.Params or set model_config = ConfigDict(extra='forbid')"
            )
        if not rec.name or ":" in rec.name or rec.name != rec.name.strip():
            raise PluginError(f"plugin '{plugin}' gave a {kind} an invalid name {rec.name!r} (no ':' or spaces)")
        if "type" in rec.params.model_fields:
            raise PluginError(f"{kind} '{rec.name}' of plugin '{plugin}': 'type' is reserved and cannot be a parameter")
        return Entry(kind, rec, plugin, dist, version, api)

    def _plugin_info(self, name: str) -> PluginInfo:
        for p in self.plugins:
            if p.name == name:
                return p
        return PluginInfo(name, None, None, "unknown")

    # -- lookup --------------------------------------------------------------------
    def all(self, kind: str) -> list[Entry]:
        self._check_kind(kind)
        return list(self.entries[kind])

    def tags(self, kind: str) -> dict[str, Entry]:
        """Every name a spec may use for this kind: unique plain names and all qualified names."""
        out: dict[str, Entry] = {}
        for e in self.entries[kind]:
            out[e.qualified] = e
            if not self.is_duplicate(e):
                out[e.name] = e
        return out

    def is_duplicate(self, entry: Entry) -> bool:
        return sum(e.name == entry.name for e in self.entries[entry.kind]) > 1

    def get(self, kind: str, name: str) -> Entry:
        """The component of this kind called ``name`` (or ``plugin:name``)."""
        self._check_kind(kind)
        entries = self.entries[kind]
        if ":" in name:
            plugin, _, short = name.partition(":")
            found = [e for e in entries if e.plugin == plugin and e.name == short]
        else:
            found = [e for e in entries if e.name == name]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise ComponentLookupError(
                f"{kind} '{name}' is provided by more than one plugin: "
                + "; ".join(e.source for e in found)
                + ". Choose one with the qualified name: "
                + " or ".join(f"'{e.qualified}'" for e in found)
            )
        raise ComponentLookupError(self.unknown_message(kind, name))

    def unknown_message(self, kind: str, name: str) -> str:
        available = sorted({e.name for e in self.entries[kind]})
        choices = sorted(self.tags(kind))
        close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        avail = ", ".join(available) if available else "none (is a plugin missing?)"
        return f"unknown {kind} '{name}'.{hint} Available: {avail}."

    def build(
        self,
        kind: str,
        config: BaseModel | dict[str, Any] | str,
        ctx: BuildContext | None = None,
        *,
        path: str | None = None,
    ) -> Any:
        """Build a component from a spec section (a validated model, a dict with ``type``,
        or a bare name) and tag the result with that section so it can be written back.

        ``path`` is where the section sits in a spec (default: the kind). Invalid
        parameters, and a ``ValueError`` from the factory, are a :class:`SpecError` at that
        path; anything else the plugin's code raises, or an object that is not of the
        kind, is a :class:`PluginError` naming the plugin, the component and the section
        (the plugin's exception is its ``__cause__``, for a traceback)."""
        ctx = ctx or BuildContext()
        path = path or kind
        if isinstance(config, str):
            config = {"type": config}
        if isinstance(config, BaseModel):
            config = config.model_dump()
        config = dict(config)
        if "type" not in config:
            raise ComponentLookupError(f"a {kind} section needs a 'type'; one of: {', '.join(sorted(self.tags(kind)))}")
        tag = str(config.pop("type"))
        entry = self.get(kind, tag)
        try:
            params = entry.component.params.model_validate(config)
        except ValidationError as err:
            problems = [(".".join(str(p) for p in (path, *e["loc"])), e["msg"]) for e in err.errors()]
            raise SpecError(problems) from None
        try:
            obj = entry.component.factory(params, ctx)
        except ValueError as exc:  # factories raise ValueError for parameters that cannot work
            raise SpecError([(path, str(exc))]) from None
        except (DiffkitError, MemoryError, KeyboardInterrupt):  # a nested section's own error; out of memory
            raise
        except Exception as exc:
            if isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower():
                raise
            raise plugin_fault(entry, path, exc) from exc
        check_built(entry, obj, path)
        # A qualified name stays qualified, so that a spec written back out still picks
        # this component once another plugin provides one of the same name.
        qualified = ":" in tag or self.is_duplicate(entry)
        spec = {"type": entry.qualified if qualified else entry.name, **params.model_dump(mode="json")}
        try:
            obj.__diffkit_spec__ = spec
        except AttributeError:  # objects with __slots__ cannot carry their spec
            pass
        return obj

    def _check_kind(self, kind: str) -> None:
        if kind not in self.entries:
            raise ComponentLookupError(f"unknown kind of component '{kind}'; kinds are {', '.join(KINDS)}")

    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.status == "failed"]

    def rows(self) -> Iterable[dict[str, Any]]:
        """One row per component (and per plugin that contributed none because it failed),
        as ``diffkit plugins`` shows them."""
        for kind in KINDS:
            for e in self.entries[kind]:
                yield {
                    "kind": kind,
                    "name": e.name,
                    "qualified_name": e.qualified,
                    "plugin": e.plugin,
                    "distribution": e.distribution,
                    "version": e.version,
                    "api": e.api,
                    "status": "duplicate" if self.is_duplicate(e) else "ok",
                    "description": e.component.description,
                }
        for p in self.plugins:
            if p.status != "loaded":
                yield {
                    "kind": None,
                    "name": None,
                    "qualified_name": None,
                    "plugin": p.name,
                    "distribution": p.distribution,
                    "version": p.version,
                    "status": p.status,
                    "error": p.error,
                }


def plugin_fault(entry: Entry, path: str, exc: BaseException) -> PluginError:
    """One clean error for an exception raised by a plugin's own code while it builds the
    spec section at ``path``: the plugin, the component and the section; the traceback is
    the error's ``__cause__`` (``--debug`` prints it)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    return PluginError(
        f"{entry.described} raised {type(exc).__name__} in the spec section '{path}': {text}. This is a fault in the"
        " plugin's code (a spec error would be a ValueError naming the parameter); report it to the plugin's authors"
        " (rerun with --debug for the traceback)"
    )


def check_built(entry: Entry, obj: object, path: str) -> None:
    """Refuse a sampler that breaks the API version its plugin declares: under version 2 a
    sampler is a step of the core's loop, not a whole loop."""
    from diffkit.sampling import is_step_sampler

    if entry.kind == "sampler" and entry.api >= 2 and callable(obj) and not is_step_sampler(obj):
        raise PluginError(
            f"{entry.described} declares plugin API version {entry.api}, but its sampler {type(obj).__name__} (spec"
            f" section '{path}') is a whole sampling loop, as version 1 wrote them; under version 2 a sampler is a step"
            f" of the core's loop: subclass diffkit.StepSamplerBase (see {hookspecs.MIGRATION_PAGE}), or declare"
            " DIFFKIT_API_VERSION = 1"
        )


def loop_sampler_problem(entry: Entry, sampler: object, process: object) -> str | None:
    """Why a version-1 sampler (a whole loop over a discrete table's integer timesteps)
    cannot run on ``process``, or ``None`` where it can: on a discrete table it runs
    unchanged, which is exact; a continuous process has no table to hand it."""
    from diffkit.sampling import is_step_sampler

    if is_step_sampler(sampler) or getattr(process, "discrete", False):
        return None
    return (
        f"{entry.described} is a plugin API version 1 sampler (a whole loop over a discrete ᾱ table's integer"
        f" timesteps), and the schedule is the continuous process {type(process).__name__}; a version-1 sampler runs"
        " only on a discrete table (linear, cosine, ...). Choose such a schedule or a sampler of the core's loop"
        f" (ddim, euler, heun, ...); its authors can rewrite it as a step: {hookspecs.MIGRATION_PAGE}"
    )


def describe_base_exception(exc: BaseException) -> str:
    """What a plugin did, for an exception that is not an ``Exception`` (it would end the
    process): ``called sys.exit(0)``, ``raised GeneratorExit: why``."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({'' if exc.code is None else repr(exc.code)})"
    text = str(exc)
    return f"raised {type(exc).__name__}{': ' + text if text else ''}"


def _check_api_version(plugin: object, name: str, distribution: str | None, version: str | None) -> int:
    """The plugin API version a plugin declares (:data:`~diffkit.hookspecs.UNDECLARED_API_VERSION`
    where it declares none); refuse one this diffkit cannot load."""
    declared = getattr(plugin, hookspecs.API_VERSION_ATTRIBUTE, None)
    if declared is None:
        return hookspecs.UNDECLARED_API_VERSION
    if isinstance(declared, int) and not isinstance(declared, bool) and declared in hookspecs.COMPATIBLE_API_VERSIONS:
        return declared
    source = f" ({' '.join(v for v in (distribution, version) if v)})" if distribution else ""
    if not isinstance(declared, int) or isinstance(declared, bool):
        raise PluginError(
            f"plugin '{name}'{source} sets {hookspecs.API_VERSION_ATTRIBUTE} = {declared!r}; it must be an integer"
            f" such as {hookspecs.API_VERSION}"
        )
    from diffkit import __version__

    supported = ", ".join(str(v) for v in sorted(hookspecs.COMPATIBLE_API_VERSIONS))
    newer = declared > hookspecs.API_VERSION
    advice = (
        "upgrade diffkit (pip install -U diffkit) to one that provides it"
        if newer
        else "install a release of the plugin written for the current API"
    )
    raise PluginError(
        f"plugin '{name}'{source} was written for diffkit plugin API version {declared}, but diffkit {__version__}"
        f" loads plugins of API version {supported}; {advice}"
    )


def _new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm
