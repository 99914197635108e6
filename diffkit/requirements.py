"""A spec's ``requires:``: the distributions (plugins) it needs, checked against the
installed ones.

Each entry is a pip requirement (PEP 508) such as ``diffkit-sigmoid>=0.2``. A spec that
uses a third-party component says which distribution provides it, so that a missing or
outdated plugin is reported as such, with the command that installs it, rather than
as an unknown component::

    requires: ["diffkit-sigmoid>=0.2"]
    schedule: {type: sigmoid}
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version

from packaging.requirements import InvalidRequirement, Requirement

from diffkit.errors import SpecError

__all__ = ["requirement_problem", "check_requirements"]


def requirement_problem(text: str) -> str | None:
    """What is wrong with one requirement in this environment, or ``None`` if it is met.

    A requirement whose environment marker does not apply here (``; sys_platform ==
    'win32'``) is met."""
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        return f"{text!r} is not a requirement such as 'diffkit-sigmoid>=0.2': {str(exc).splitlines()[0]}"
    if req.marker is not None and not req.marker.evaluate():
        return None
    try:
        installed = version(req.name)
    except PackageNotFoundError:
        return f"{req.name} is not installed; the spec requires {text!r}. Install it with: {_pip_install(text)}"
    if req.specifier and not req.specifier.contains(installed, prereleases=True):
        return (
            f"{req.name} {installed} is installed, but the spec requires {req.name}{req.specifier}."
            f" Install a matching version with: {_pip_install(text)}"
        )
    return None


def _pip_install(text: str) -> str:
    """The command that installs ``text``, quoted so that a shell reads the requirement
    as written (``>`` would redirect, and a marker holds quotes of its own)."""
    return f"pip install {shlex.quote(text)}"


def check_requirements(requires: Iterable[str]) -> None:
    """Raise :class:`~diffkit.errors.SpecError` listing every requirement that is not met,
    at its path ``requires.INDEX``."""
    problems = [(f"requires.{i}", p) for i, text in enumerate(requires) if (p := requirement_problem(text))]
    if problems:
        raise SpecError(problems)
