"""Discovering plugins through the entry-point group ``diffkit``.

The built-in components travel the same path as a third party's: they are entry
points of the distribution ``diffkit``. Loading is isolated: a plugin that fails to
import, or whose hook fails, is recorded with its distribution and error and the
others still load, unless strict mode makes the first failure fatal.

Environment variables (each also a keyword of :func:`load_plugins` and a CLI flag):

``DIFFKIT_DISABLE_PLUGIN_AUTOLOAD=1``
    load only the built-in plugins (and those named in ``DIFFKIT_PLUGINS``).
``DIFFKIT_PLUGINS=a,b``
    plugins to load even when autoloading is off.
``DIFFKIT_BLOCK_PLUGINS=a,b``
    plugins never to load. Built-in plugins are refused here, so that a typo or a
    shared name cannot remove them; block one deliberately with
    ``DIFFKIT_BLOCK_BUILTIN_PLUGINS``.
``DIFFKIT_STRICT_PLUGINS=1``
    the first plugin that fails raises :class:`~diffkit.errors.PluginError`.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points

from diffkit.errors import PluginError
from diffkit.registry import KINDS, Entry, PluginInfo, Registry

__all__ = ["ENTRY_POINT_GROUP", "load_plugins", "check_plugins", "get_registry", "set_registry"]

ENTRY_POINT_GROUP = "diffkit"
BUILTIN_DISTRIBUTION = "diffkit"

_registry: Registry | None = None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> list[str]:
    return [s.strip() for s in os.environ.get(name, "").split(",") if s.strip()]


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    return dist.metadata["Name"], dist.version


def _is_builtin(dist: str | None) -> bool:
    return dist is not None and dist.lower().replace("_", "-") == BUILTIN_DISTRIBUTION


def load_plugins(
    *,
    autoload: bool | None = None,
    include: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    block_builtins: Iterable[str] | None = None,
    strict: bool | None = None,
) -> Registry:
    """Build a fresh registry from the installed entry points.

    Arguments left as ``None`` are read from the environment (see the module doc).
    """
    autoload = not _env_flag("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD") if autoload is None else autoload
    include = set(_env_list("DIFFKIT_PLUGINS") if include is None else include)
    block = set(_env_list("DIFFKIT_BLOCK_PLUGINS") if block is None else block)
    block_builtins = set(_env_list("DIFFKIT_BLOCK_BUILTIN_PLUGINS") if block_builtins is None else block_builtins)
    strict = _env_flag("DIFFKIT_STRICT_PLUGINS") if strict is None else strict

    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not _is_builtin(_dist_of(e)[0]), e.name))
    builtin_names = {ep.name for ep in eps if _is_builtin(_dist_of(ep)[0])}
    refused = block & builtin_names
    if refused:
        raise PluginError(
            f"refusing to block built-in plugin(s) {', '.join(sorted(refused))}: the built-ins cannot be"
            " blocked through the ordinary block list. To block one deliberately, name it in"
            " DIFFKIT_BLOCK_BUILTIN_PLUGINS (or block_builtins=...)."
        )
    block |= block_builtins

    registry = Registry()
    for ep in eps:
        dist, version = _dist_of(ep)
        builtin = _is_builtin(dist)
        if ep.name in block:
            registry.plugins.append(PluginInfo(ep.name, dist, version, "blocked", builtin=builtin))
            continue
        if not (builtin or autoload or ep.name in include):
            registry.plugins.append(PluginInfo(ep.name, dist, version, "not-loaded", builtin=builtin))
            continue
        try:
            plugin = ep.load()
            registry.register_plugin(plugin, ep.name, distribution=dist, version=version, builtin=builtin)
        except Exception as exc:  # isolation: one broken plugin must not take the rest down
            message = str(exc) if isinstance(exc, PluginError) else f"{type(exc).__name__}: {exc}{_import_hint(exc)}"
            if strict:
                raise PluginError(
                    f"plugin '{ep.name}' from {dist or 'an unknown distribution'} {version or ''} failed to load"
                    f" (strict mode): {message}"
                ) from exc
            info = PluginInfo(ep.name, dist, version, "failed", error=message, builtin=builtin)
            info.traceback = traceback.format_exc()  # type: ignore[attr-defined]
            registry.plugins.append(info)
    return registry


def _import_hint(exc: Exception) -> str:
    """A hint for a plugin that fails importing something from diffkit: it was most
    likely written for another version of diffkit."""
    missing = getattr(exc, "name", None) or ""
    if not (isinstance(exc, ImportError) and (missing == "diffkit" or missing.startswith("diffkit."))):
        return ""
    from diffkit import __version__
    from diffkit.hookspecs import API_VERSION

    return (
        f" (the plugin needs something this diffkit {__version__}, plugin API version {API_VERSION}, does not have;"
        " it may have been written for a newer diffkit)"
    )


def check_plugins(registry: Registry) -> list[str]:
    """Every problem a plugin author's CI should fail on, one message each: plugins that
    failed to load (import errors, failing hooks, hooks with no matching hookspec, an
    incompatible plugin API version), components of one kind sharing a name, Params
    models without a JSON Schema, and a spec schema that cannot be built."""
    problems = [
        f"plugin '{p.name}' ({' '.join(v for v in (p.distribution, p.version) if v) or 'no distribution'})"
        f" failed to load: {p.error}"
        for p in registry.failed()
    ]
    for kind in KINDS:
        by_name: dict[str, list[Entry]] = {}
        for entry in registry.all(kind):
            by_name.setdefault(entry.name, []).append(entry)
        for name, entries in by_name.items():
            if len(entries) > 1:
                problems.append(
                    f"{kind} '{name}' is provided by more than one plugin: {'; '.join(e.source for e in entries)}."
                    f" Specs must then use a qualified name ({', '.join(e.qualified for e in entries)}); rename one"
                )
        for entry in registry.all(kind):
            try:
                entry.component.params.model_json_schema()
            except Exception as exc:  # pydantic raises several kinds for types it cannot describe
                problems.append(
                    f"{kind} '{entry.name}' of {entry.source}: the JSON Schema of its Params model cannot be built:"
                    f" {type(exc).__name__}: {exc}"
                )
    from diffkit.spec import json_schema

    try:
        json_schema(registry)
    except Exception as exc:  # whatever stops the spec model from being built
        problems.append(f"the spec schema of the installed components cannot be built: {type(exc).__name__}: {exc}")
    return problems


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _registry
    if _registry is None:
        _registry = load_plugins()
    return _registry


def set_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (``None`` reloads it on next use); returns the
    one it replaced, so that it can be put back."""
    global _registry
    previous, _registry = _registry, registry
    return previous
