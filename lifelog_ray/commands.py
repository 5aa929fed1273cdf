"""Registers the stage subcommands of the CLI (each a thin layer over its stage module)."""

from __future__ import annotations

import argparse

from .cli import CLASSIFY_FLAGS, EXTRACT_FLAGS, _cfg, register


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import run_extract

    cfg = _cfg(args, EXTRACT_FLAGS)
    for s in run_extract(cfg):
        print(s.line())
    return 0


register("extract", "extract VGG features (all taps in one pass) into Parquet shards", EXTRACT_FLAGS, cmd_extract)


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify.study import run_classify

    cfg = _cfg(args, CLASSIFY_FLAGS)
    res = run_classify(cfg)
    print((res.output / "table3.md").read_text("utf-8"))
    print(res.line())
    return 0


register("classify", "PCA + classifier battery, grid-searched on validation with Ray Tune (Table 3)",
         CLASSIFY_FLAGS, cmd_classify)
