"""One module per ``meshwright`` subcommand, each with ``register(subparsers)``."""
