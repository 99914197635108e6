"""Registering plugins for one test: an isolated registry and a plugin registered only
inside a ``with`` block. :mod:`diffkit.testing.pytest_plugin` offers both as fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from diffkit.plugins import load_plugins, set_registry
from diffkit.registry import Entry, Registry

__all__ = ["isolated_registry", "installed_registry", "registered"]


@contextmanager
def isolated_registry(*, builtins: bool = True) -> Iterator[Registry]:
    """A fresh registry made the process-wide one inside the block, the previous one
    restored after it.

    With ``builtins`` it holds diffkit's built-in components only: autoloading is off,
    and the ``DIFFKIT_*`` environment variables are ignored, so no other installed
    plugin can change what a test sees. Without, it is empty."""
    registry = (
        load_plugins(autoload=False, include=(), block=(), block_builtins=(), strict=True) if builtins else Registry()
    )
    previous = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(previous)


@contextmanager
def installed_registry(*distributions: str) -> Iterator[Registry]:
    """A registry of diffkit's built-ins and the installed entry points of ``distributions``
    only, loaded strictly (the first failure of theirs raises), made the process-wide one
    inside the block. A plugin's test of its own entry points then passes or fails on that
    plugin alone, whatever else is installed and whatever the ``DIFFKIT_*`` variables say::

        with installed_registry("diffkit-sigmoid") as registry:
            assert registry.get("schedule", "sigmoid").distribution == "diffkit-sigmoid"
    """
    registry = load_plugins(
        autoload=False, include=(), block=(), block_builtins=(), strict=True, distributions=distributions
    )
    previous = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(previous)


@contextmanager
def registered(
    plugin: object,
    name: str | None = None,
    *,
    registry: Registry | None = None,
    distribution: str | None = None,
    version: str | None = None,
) -> Iterator[list[Entry]]:
    """Register ``plugin`` (a module or object with ``@diffkit.hookimpl`` functions) in
    ``registry`` (default: the process-wide one) for the duration of the block, and yield
    the components it contributed; it is unregistered afterwards, even if the block
    fails. Registration problems raise :class:`~diffkit.PluginError` as they would at
    load time."""
    from diffkit.plugins import get_registry

    registry = registry if registry is not None else get_registry()
    info = registry.register_plugin(plugin, name, distribution=distribution, version=version)
    try:
        yield [e for kind in registry.entries for e in registry.entries[kind] if e.plugin == info.name]
    finally:
        registry.unregister_plugin(info.name)
