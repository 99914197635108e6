"""Further ``diffkit`` subcommands, one module each.

Every module here defines ``register(subparsers)``, which adds its parser and sets
``func`` to a function of the parsed arguments returning an exit status. Use
``diffkit.cli.add_plugin_options(parser)`` and ``diffkit.cli.load_registry(args)``
so the command honours the plugin flags, and raise ``DiffkitError`` for user errors:
the CLI prints it as one line.
"""
