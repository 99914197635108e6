"""The hooks a plugin implements: one per kind of component.

Each hook takes no arguments and returns a list of :class:`diffkit.Component`
records. A plugin is any module or object with functions marked ``@hookimpl``,
exposed through an entry point in the group ``diffkit``::

    [project.entry-points.diffkit]
    my-plugin = "my_package.plugin"

and declares the version of this API it was written for::

    DIFFKIT_API_VERSION = 2
"""

from __future__ import annotations

import pluggy

PROJECT = "diffkit"
API_VERSION = 2
"""Version of this hook API; bumped when a hook's contract changes incompatibly.

A plugin module declares the version it was written for as ``DIFFKIT_API_VERSION = 2``;
one declaring a version this diffkit cannot load is refused with a message naming both
versions, instead of failing somewhere inside its hooks.

Version 2 is the continuous core: a schedule is a :class:`diffkit.Process` (a discrete
ᾱ table is one kind), a denoiser is given the process's conditioning value, and a
sampler is a step of the core's loop (:class:`diffkit.StepSamplerBase`). Version-1
plugins keep loading: their schedules (ᾱ or β tables), denoisers, objectives, datasets
and guidance work unchanged, and their samplers (whole loops over a table's integer
timesteps) run unchanged on discrete tables and are refused, naming the plugin, on a
continuous process."""

COMPATIBLE_API_VERSIONS: frozenset[int] = frozenset({1, 2})
"""The versions whose plugins this diffkit loads (the current one, and older ones that
still work unchanged)."""

UNDECLARED_API_VERSION = 1
"""The version of a plugin that declares none: declaring it came with version 1."""

MIGRATION_PAGE = "docs/plugins.md, section 'Migrating a plugin from API version 1'"
"""Where a plugin author reads how to rewrite a version-1 sampler as a step."""

API_VERSION_ATTRIBUTE = "DIFFKIT_API_VERSION"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# kind of component -> name of the hook that supplies it
HOOKS: dict[str, str] = {
    "data": "diffkit_datasets",
    "schedule": "diffkit_schedules",
    "denoiser": "diffkit_denoisers",
    "objective": "diffkit_objectives",
    "sampler": "diffkit_samplers",
    "guidance": "diffkit_guidance",
}


@hookspec
def diffkit_schedules() -> list:  # type: ignore[empty-body]
    """Return the noise schedules (forward processes) this plugin provides; factories return a Schedule."""


@hookspec
def diffkit_denoisers() -> list:  # type: ignore[empty-body]
    """Return the denoiser networks this plugin provides; factories return an nn.Module."""


@hookspec
def diffkit_objectives() -> list:  # type: ignore[empty-body]
    """Return the training objectives this plugin provides; factories return an Objective."""


@hookspec
def diffkit_samplers() -> list:  # type: ignore[empty-body]
    """Return the reverse-process samplers this plugin provides; factories return a Sampler."""


@hookspec
def diffkit_guidance() -> list:  # type: ignore[empty-body]
    """Return the guidance methods this plugin provides; factories return a Guidance."""


@hookspec
def diffkit_datasets() -> list:  # type: ignore[empty-body]
    """Return the datasets this plugin provides; factories return a Dataset."""
