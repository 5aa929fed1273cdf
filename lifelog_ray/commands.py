"""Registers the stage subcommands of the CLI (each a thin layer over its stage module)."""
