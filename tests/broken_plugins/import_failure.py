"""A plugin that imports a module its distribution forgot to depend on."""
import diffkit_missing_dependency  # noqa: F401

from diffkit import hookimpl

DIFFKIT_API_VERSION = 2


@hookimpl
def diffkit_schedules():
    return []
