"""Registers the stage subcommands of the CLI (each a thin layer over its stage module)."""

from __future__ import annotations

import argparse

from .cli import EXTRACT_FLAGS, _cfg, register


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import run_extract

    cfg = _cfg(args, EXTRACT_FLAGS)
    for s in run_extract(cfg):
        print(s.line())
    return 0


register("extract", "extract VGG features (all taps in one pass) into Parquet shards", EXTRACT_FLAGS, cmd_extract)
