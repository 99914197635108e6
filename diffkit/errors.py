"""Errors a user can act on. Each message says what was wrong and how to fix it."""

from __future__ import annotations


class DiffkitError(Exception):
    """Base of every error diffkit raises for bad input; the CLI prints it as one line."""


class PluginError(DiffkitError):
    """A plugin could not be loaded or contributed an invalid component."""


class ComponentLookupError(DiffkitError, LookupError):
    """A component name is unknown or ambiguous."""


class SpecError(DiffkitError):
    """A spec file or dictionary is invalid; ``problems`` lists ``(field path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"]
        lines += [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))
