"""diffkit's pytest plugin, registered through the entry point ``pytest11``: the fixtures
``diffkit_registry`` and ``diffkit_plugin`` are available in every test session of an
environment where diffkit is installed.

Loading the plugin imports the ``diffkit`` package, and with it torch (about two seconds
at the start of a test session); the registries the fixtures build are made only when a
test asks for one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from diffkit.registry import Entry, Registry


@pytest.fixture
def diffkit_registry() -> Iterator[Registry]:
    """A fresh registry of diffkit's built-in components only (autoload off, ``DIFFKIT_*``
    environment variables ignored), made the process-wide one for the test."""
    from diffkit.testing.plugin import isolated_registry

    with isolated_registry() as registry:
        yield registry


@pytest.fixture
def diffkit_plugin(diffkit_registry: Registry) -> Callable[..., AbstractContextManager[list[Entry]]]:
    """``with diffkit_plugin(module_or_object, name=None) as entries:`` registers a plugin in
    ``diffkit_registry`` for the block and unregisters it afterwards; ``entries`` are the
    components it contributed."""
    from diffkit.testing.plugin import registered

    def register(plugin: object, name: str | None = None, **kwargs: Any) -> AbstractContextManager[list[Entry]]:
        return registered(plugin, name, registry=diffkit_registry, **kwargs)

    return register
