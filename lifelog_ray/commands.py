"""Registers the stage subcommands of the CLI (each a thin layer over its stage module)."""

from __future__ import annotations

import argparse

from . import storage
from .cli import CLASSIFY_FLAGS, EXTRACT_FLAGS, FINETUNE_FLAGS, MANIFEST_FLAGS, _cfg, register
from .errors import LifelogError


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


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import run_finetune

    cfg = _cfg(args, FINETUNE_FLAGS)
    runs = run_finetune(cfg)
    print((cfg.study_dir / "finetune" / "table4.md").read_text("utf-8"))
    for r in runs:
        state = "already done" if r.skipped else f"{r.epochs} epochs (best {r.best_epoch})"
        print(f"finetune {r.model}/{r.method}: {state}, test accuracy {100 * r.metrics['accuracy']:.2f}% -> {r.output}")
    return 0


register("finetune", "fine-tune VGG (M1/M2/M3) with Ray Train (Table 4, learning curves)", FINETUNE_FLAGS,
         cmd_finetune)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    cfg = _cfg(args, [])
    print(f"report: {build_report(cfg.study_dir, options=cfg.storage.options or None)}")
    return 0


register("report", "write the self-contained HTML report of a study", [], cmd_report)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import STAGES, format_summary, run_study

    cfg = _cfg(args, RUN_FLAGS)
    stages = tuple(s.strip() for s in args.stages.split(",")) if args.stages else STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise LifelogError(f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    rows = run_study(cfg, stages)
    print(format_summary(rows, cfg.study_dir))
    return 0


RUN_FLAGS = MANIFEST_FLAGS + [
    ("--weights", "extract.weights", {"help": "imagenet | none | PATH (extract; fine-tuning uses finetune.weights)"}),
]
register("run", "the whole study: manifest -> extract -> classify -> finetune -> report (resumable)", RUN_FLAGS,
         cmd_run)


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    cfg = _cfg(args, [])
    out, n, secs = run_predict(cfg, args.images, args.pipeline, args.name)
    print(f"predict: {n} images labelled in {secs}s -> {out} (partitioned by day)")
    return 0


register("predict", "label new lifelog images with the study's best pipeline", [], cmd_predict)


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit

    cfg = _cfg(args, [])
    out = run_audit(cfg, args.folds, args.model, args.layer, args.classifier, rerun=args.rerun_without_suspects)
    print(out.head(args.top)[["rank", "image_id", "given_label", "suggested_label", "score"]].to_string(index=False))
    print(f"audit: {int(out['is_issue'].sum())} of {len(out)} labels flagged -> {cfg.study_dir / 'audit'}")
    if args.rerun_without_suspects:
        print("before / after removing flagged training images (test split and labels unchanged):")
        print(storage.read_csv(cfg.study_dir / "audit" / "rerun.csv").to_string(index=False))
    return 0


def cmd_curve(args: argparse.Namespace) -> int:
    from .audit import run_curve

    cfg = _cfg(args, [])
    fractions = [float(x) for x in args.fractions.split(",")]
    print(run_curve(cfg, fractions, args.seeds).to_string(index=False))
    print(f"curve -> {cfg.study_dir / 'curve'}")
    return 0


register("audit", "rank likely mislabelled images (out-of-fold probabilities + cleanlab)", [], cmd_audit)
register("curve", "test score against the amount of training data (a Ray Tune grid)", [], cmd_curve)
