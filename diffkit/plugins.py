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
    plugins never to load, each an entry-point name or ``DIST:NAME``, the name as
    provided by one distribution only. Built-in plugins are refused here, so that a
    typo or a shared name cannot remove them; block one deliberately with
    ``DIFFKIT_BLOCK_BUILTIN_PLUGINS``. ``DIST:NAME`` blocks a third party's entry point
    named like a built-in (``shadow:diffkit.schedules``) and leaves the built-in loaded.
``DIFFKIT_STRICT_PLUGINS=1``
    the first plugin that fails raises :class:`~diffkit.errors.PluginError`.

A plugin that ends the process -- ``sys.exit`` at import or in a hook, or any other
``BaseException`` -- fails like one that raises: it is reported and the rest load. Only a
``KeyboardInterrupt`` from the user's Ctrl-C goes through.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from types import FrameType
from typing import Any

import torch

from diffkit.errors import PluginError
from diffkit.hookspecs import MIGRATION_PAGE
from diffkit.registry import KINDS, Entry, PluginInfo, Registry, describe_base_exception

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


def _normalize(dist: str) -> str:
    """A distribution's name as pip compares names (PEP 503): ``Shadow_Plugin`` is ``shadow-plugin``."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _is_builtin(dist: str | None) -> bool:
    return dist is not None and _normalize(dist) == BUILTIN_DISTRIBUTION


def _blocks(ep: EntryPoint, dist: str | None, names: set[str]) -> bool:
    """Whether the block list ``names`` names this entry point: plainly (``NAME``, every
    distribution's) or qualified by its distribution (``DIST:NAME``)."""
    if ep.name in names:
        return True
    return dist is not None and any(
        _normalize(d) == _normalize(dist) and n == ep.name for d, _, n in (b.partition(":") for b in names if ":" in b)
    )


def load_plugins(
    *,
    autoload: bool | None = None,
    include: Iterable[str] | None = None,
    block: Iterable[str] | None = None,
    block_builtins: Iterable[str] | None = None,
    strict: bool | None = None,
    distributions: Iterable[str] | None = None,
) -> Registry:
    """Build a fresh registry from the installed entry points.

    Arguments left as ``None`` are read from the environment (see the module doc).
    ``distributions`` loads the built-ins and the entry points of these distributions
    only (names compared as pip compares them), whatever else is installed: a plugin's
    own test of its entry points then passes or fails on that plugin alone.
    """
    autoload = not _env_flag("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD") if autoload is None else autoload
    include = set(_env_list("DIFFKIT_PLUGINS") if include is None else include)
    block = set(_env_list("DIFFKIT_BLOCK_PLUGINS") if block is None else block)
    block_builtins = set(_env_list("DIFFKIT_BLOCK_BUILTIN_PLUGINS") if block_builtins is None else block_builtins)
    strict = _env_flag("DIFFKIT_STRICT_PLUGINS") if strict is None else strict
    only = None if distributions is None else {_normalize(d) for d in distributions}

    eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (not _is_builtin(_dist_of(e)[0]), e.name))
    builtin_names = {ep.name for ep in eps if _is_builtin(_dist_of(ep)[0])}
    refused = sorted(
        b for b in block if b in builtin_names or (":" in b and _is_builtin(b.partition(":")[0]))
    )
    if refused:
        # the usual reason to name a built-in here is a third party's entry point of the same name
        impostors = sorted(
            f"'{dist}:{ep.name}'"
            for ep in eps
            if ep.name in block and (dist := _dist_of(ep)[0]) is not None and not _is_builtin(dist)
        )
        alone = f" To block only {' or '.join(impostors)}, name its distribution as shown." if impostors else ""
        raise PluginError(
            f"refusing to block built-in plugin(s) {', '.join(refused)}: the built-ins cannot be"
            f" blocked through the ordinary block list.{alone} To block another distribution's plugin of that"
            " name, write DIST:NAME. To block a built-in deliberately, name it in"
            " DIFFKIT_BLOCK_BUILTIN_PLUGINS (or block_builtins=...)."
        )
    block |= block_builtins

    registry = Registry()
    for ep in eps:
        dist, version = _dist_of(ep)
        builtin = _is_builtin(dist)
        if _blocks(ep, dist, block):
            registry.plugins.append(PluginInfo(ep.name, dist, version, "blocked", builtin=builtin))
            continue
        if only is not None and not builtin:
            if dist is None or _normalize(dist) not in only:
                registry.plugins.append(PluginInfo(ep.name, dist, version, "not-loaded", builtin=builtin))
                continue
        elif not (builtin or autoload or ep.name in include):
            registry.plugins.append(PluginInfo(ep.name, dist, version, "not-loaded", builtin=builtin))
            continue
        try:
            with _ctrl_c_watch() as pressed:
                plugin = _load(ep, pressed)
                try:
                    registry.register_plugin(plugin, ep.name, distribution=dist, version=version, builtin=builtin)
                except KeyboardInterrupt:
                    if pressed():
                        raise
                    raise _Contained("raised KeyboardInterrupt in a hook") from None
        except Exception as exc:  # isolation: one broken plugin must not take the rest down
            if isinstance(exc, (PluginError, _Contained)):
                message = str(exc)
            else:
                message = f"{type(exc).__name__}: {exc}{_import_hint(exc)}"
            if strict:
                raise PluginError(
                    f"plugin '{ep.name}' from {dist or 'an unknown distribution'} {version or ''} failed to load"
                    f" (strict mode): {message}"
                ) from exc
            info = PluginInfo(ep.name, dist, version, "failed", error=message, builtin=builtin)
            info.traceback = traceback.format_exc()  # type: ignore[attr-defined]
            registry.plugins.append(info)
    return registry


class _Contained(Exception):
    """A ``BaseException`` from a plugin, turned into an ordinary failure of that plugin."""


@contextmanager
def _ctrl_c_watch() -> Iterator[Callable[[], bool]]:
    """Tell a Ctrl-C apart from a plugin raising ``KeyboardInterrupt`` itself: while a
    plugin loads, SIGINT is noted before Python's handler raises as it always does.
    Yields a function saying whether SIGINT arrived. Where the handler cannot be
    watched (another thread, a handler that is not Python's), every
    ``KeyboardInterrupt`` counts as the user's. Where SIGINT is ignored (a process started in
    the background by a shell, or under ``nohup``) no Ctrl-C can raise one, so every
    ``KeyboardInterrupt`` is the plugin's own."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        yield lambda: False
        return
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield lambda: True
        return
    arrived = False

    def noted(signum: int, frame: FrameType | None) -> Any:
        nonlocal arrived
        arrived = True
        return previous(signum, frame)  # type: ignore[operator]

    signal.signal(signal.SIGINT, noted)
    try:
        yield lambda: arrived
    finally:
        signal.signal(signal.SIGINT, previous)


def _load(ep: EntryPoint, pressed: Callable[[], bool]) -> object:
    """Import a plugin; whatever ``BaseException`` the import raises, other than the
    user's Ctrl-C, becomes an ordinary failure of that plugin."""
    try:
        return ep.load()
    except KeyboardInterrupt:
        if pressed():
            raise
        raise _Contained("raised KeyboardInterrupt at import") from None
    except Exception:
        raise
    except BaseException as exc:  # SystemExit, GeneratorExit, ...: a plugin must not end the process
        raise _Contained(f"{describe_base_exception(exc)} at import") from exc


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
    problems += _loop_samplers(registry)
    from diffkit.spec import json_schema

    try:
        json_schema(registry)
    except Exception as exc:  # whatever stops the spec model from being built
        problems.append(f"the spec schema of the installed components cannot be built: {type(exc).__name__}: {exc}")
    return problems


def _loop_samplers(registry: Registry) -> list[str]:
    """The samplers written as whole loops (plugin API version 1), found by building each
    with its default parameters: they run only on discrete tables. One whose defaults do
    not build alone is passed over here (building it in a spec reports it)."""
    from diffkit.interfaces import BuildContext
    from diffkit.sampling import is_step_sampler

    out = []
    for entry in registry.all("sampler"):
        try:
            with torch.random.fork_rng(devices=[]):
                sampler = registry.build("sampler", {"type": entry.qualified}, BuildContext(sample_shape=(2,)))
        except Exception:  # noqa: BLE001 - needs parameters or data to build; not this check's business
            continue
        if callable(sampler) and not is_step_sampler(sampler):
            out.append(
                f"{entry.described} is a plugin API version {entry.api} sampler ({type(sampler).__name__}, a whole loop"
                " over a discrete table's integer timesteps): it runs unchanged on discrete tables and is refused on"
                f" continuous processes; rewrite it as a step of the core's loop ({MIGRATION_PAGE})"
            )
    return out


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
