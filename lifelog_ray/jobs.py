"""Shared body of the `jobs/*.py` entry points for `ray job submit` (and `--smoke-test` runs)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from .config import StudyConfig, load_config
from .pipeline import STAGES, format_summary, run_study

# What each job runs: a stage needs the ones before it to have run (they skip when complete).
JOB_STAGES = {
    "study": STAGES,
    "manifest": ("manifest",),
    "extract": ("extract",),
    "classify": ("classify",),
    "finetune": ("finetune",),
    "report": ("report",),
}

SMOKE = {
    "extract.weights": "none", "extract.image_size": 32, "extract.batch_size": 8, "extract.layers": "fc2,predictions",
    "classify.search_space": None, "classify.classifiers": "svm,naive_bayes", "finetune.weights": "none",
    "finetune.image_size": 32, "finetune.epochs": 1, "finetune.methods": "m1", "finetune.batch_size": 16,
    "finetune.cpus_per_worker": 0.5, "data.top_k": 4,
}


def smoke_config(workdir: Path) -> StudyConfig:
    """A tiny generated lifelog and settings that run every stage in a minute or two on a laptop."""
    from .sample import write_sample

    root = workdir / "lifelog"
    write_sample(root, seed=0, days=2, images_per_day=30, image_size=(96, 72))
    over = {**SMOKE, "data.root": str(root), "data.labels": str(root / "labels.csv"),
            "output.study": str(workdir / "study")}
    cfg = load_config(None, over)
    small = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "search_space_small.yaml"
    if small.exists():
        cfg.classify.search_space = str(small)
    return cfg


def main(job: str, argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=f"lifelog-ray job: {job}")
    p.add_argument("--config", help="study config YAML (jobs/configs/*.yaml)")
    p.add_argument("--study", help="override output.study")
    p.add_argument("--smoke-test", action="store_true", help="run on a tiny generated lifelog")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.smoke_test:
        tmp = Path(tempfile.mkdtemp(prefix=f"lifelog-smoke-{job}-"))
        cfg = smoke_config(tmp)
        stages = STAGES[: STAGES.index(JOB_STAGES[job][-1]) + 1]  # with the stages it builds on
    else:
        if not args.config:
            p.error("--config is required (or --smoke-test)")
        cfg = load_config(args.config, {"output.study": args.study})
        stages = JOB_STAGES[job]
    rows = run_study(cfg, stages)
    print(format_summary(rows, cfg.study_dir))
    return 0
