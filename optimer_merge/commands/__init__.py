"""CLI subcommands: each module has a docstring, `add_arguments(parser)` and `run(args)`."""
