"""diffkit's built-in components. Each module is a plugin registered through the
entry-point group ``diffkit`` in diffkit's own ``pyproject.toml``, exactly as a
third-party plugin is: nothing in the core imports this package."""
