"""`lifelog-ray run`: the whole study, stage by stage, each skipping what is complete and current."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import StudyConfig, write_resolved
from .errors import LifelogError
from .lease import check_free
from .storage import plain_name

if TYPE_CHECKING:
    from .console import Console

log = logging.getLogger(__name__)

STAGES = ("manifest", "extract", "classify", "finetune", "predict", "report")
# What each stage reads, and the output that shows a stage has run: `run --stages` adds a needed stage
# (before the stages that need it) only when that output is missing. Fine-tuning reads images, not features;
# predict labels `predict.images` with the best pipeline (off when no images are configured).
NEEDS = {"manifest": (), "extract": ("manifest",), "classify": ("extract",), "finetune": ("manifest",),
         "predict": ("classify",), "report": ("manifest",)}
OUTPUT = {"manifest": "manifest.parquet", "extract": "features", "classify": "classify/results.parquet",
          "finetune": "finetune/results.parquet", "predict": "predictions", "report": "report/index.html"}


def parse_stages(text: str | None) -> tuple[str, ...]:
    """`a,b,...` (the --stages syntax of `run` and jobs/study.py) -> stage names; None or "" -> all."""
    if not text:
        return STAGES
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise LifelogError(f"--stages: unknown stage(s) {unknown}; choose from {','.join(STAGES)}")
    return stages


def plan(study: Path, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The requested stages and, before them, every stage they need whose output is missing, in order."""
    wanted = set(requested)
    todo = list(requested)
    while todo:
        for need in NEEDS[todo.pop()]:
            if need not in wanted and not (study / OUTPUT[need]).exists():
                wanted.add(need)
                todo.append(need)
    return tuple(s for s in STAGES if s in wanted)


def preflight(cfg: StudyConfig, stages: tuple[str, ...]) -> None:
    """What each of ``stages`` will read, checked before any runs: the files and folders it names exist, the
    search space loads (and names estimator classes only), a prediction set's name is plain. One line, the
    first problem found, else nothing."""
    from .classify.estimators import load_search_space
    from .taxonomy import Taxonomy

    def exists(key: str, value: str | None, what: str, folder: bool = False) -> None:
        if not value:
            return
        p = cfg.path(value)
        if not (p.is_dir() if folder else p.exists()):
            raise LifelogError(f"run: {key} {value!r}: no such {what}; nothing was run")

    d = cfg.data
    if "manifest" in stages:
        exists("data.root", d.root, "folder", folder=True)
        exists("data.labels", d.labels, "file")
        exists("data.images_csv", d.images_csv, "file")
        Taxonomy.load(d.taxonomy)
    if "classify" in stages:
        load_search_space(cfg.classify.search_space, cfg.classify.classifiers)
    for stage, weights in (("extract", cfg.extract.weights), ("finetune", cfg.finetune.weights)):
        if stage in stages and str(weights).lower() not in ("imagenet", "none"):
            exists(f"{stage}.weights", weights, "weights file")
    if "predict" in stages and cfg.predict.images:
        exists("predict.images", cfg.predict.images, "folder or file")
        name = cfg.predict.name or Path(cfg.predict.images.rstrip("/")).stem
        plain_name(name, "run: the prediction set's name")


@dataclass
class StageSummary:
    stage: str
    status: str  # done | skipped | off
    seconds: float
    detail: str


def run_study(cfg: StudyConfig, stages: tuple[str, ...] = STAGES, console: Console | None = None) -> list[StageSummary]:
    """Run ``stages`` (and the stages they need whose outputs are missing), each skipping what is done.

    With a ``console`` (the CLI's and the jobs', or ``Console()`` from the Python API) each stage prints
    its start line, a progress bar and its summary, and writes the rest to STUDY/logs/<stage>-<time>.log.
    """
    from .runtime import ensure_ray

    study = cfg.study_dir
    study.mkdir(parents=True, exist_ok=True)
    if tuple(stages) == ("predict",) and not cfg.predict.images:  # asked for alone: a mistake, not an "off"
        raise LifelogError("--stages predict: no images to label; set predict.images (--set predict.images=DIR)")
    stages = plan(study, stages)
    preflight(cfg, stages)  # every stage's inputs, before the first stage: a mistake costs seconds, not a study
    # A live run holding one of these stages: fail now, before Ray starts (each stage takes its lease in turn).
    check_free(cfg, [(s, m) for s in stages if s != "report" and (s != "predict" or cfg.predict.images)
                     for m in (cfg.extract.models if s == "extract" else [None])])
    write_resolved(cfg, study)
    out: list[StageSummary] = []

    def timed(stage: str, fn) -> None:
        t0 = time.perf_counter()
        with console.stage(stage, study) if console else contextlib.nullcontext():
            status, detail = fn()
        row = StageSummary(stage, status, time.perf_counter() - t0, detail)
        out.append(row)
        log.info("stage %s: %s (%s)", stage, status, detail)
        if console:
            console.say(f"[{stage}] {status} in {row.seconds:.1f}s: {detail}")

    if "manifest" in stages:
        def manifest():
            from .ingest import build_manifest

            res = build_manifest(cfg)
            return "done", res.accounting()
        timed("manifest", manifest)
    # One Ray for the whole run: the cluster the job was submitted to, a running local one, or a new one.
    if any(s in stages for s in ("extract", "classify", "finetune")) or ("predict" in stages and cfg.predict.images):
        with console.stage("ray", study, announce=False) if console else contextlib.nullcontext():
            ensure_ray(cfg.ray)
    if "extract" in stages:
        def extract():
            from .extract import run_extract

            sums = run_extract(cfg)
            status = "skipped" if all(s.processed + s.rejected == 0 for s in sums) else "done"
            return status, "; ".join(s.line() for s in sums)
        timed("extract", extract)
    if "classify" in stages:
        def classify():
            from .classify.study import run_classify

            res = run_classify(cfg)
            return ("skipped" if res.skipped else "done"), res.line()
        timed("classify", classify)
    if "finetune" in stages:
        def finetune():
            if not cfg.finetune.methods:
                return "off", "no fine-tuning methods configured"
            from .finetune import run_finetune

            runs = run_finetune(cfg)
            status = "skipped" if all(r.skipped for r in runs) else "done"
            return status, "; ".join(f"{r.model}/{r.method} acc {100 * r.metrics['accuracy']:.2f}%" for r in runs)
        timed("finetune", finetune)
    if "predict" in stages:
        def predict():
            if not cfg.predict.images:
                return "off", "no predict.images configured"
            from .predict import run_predict

            return "done", run_predict(cfg).line()
        timed("predict", predict)
    if "report" in stages:
        def report():
            from .report import build_report

            return "done", str(build_report(study, options=cfg.storage.options))
        timed("report", report)
    return out


def format_summary(rows: list[StageSummary], study: Path) -> str:
    lines = [f"study {study}:"]
    for r in rows:
        lines.append(f"  {r.stage:<9} {r.status:<8} {r.seconds:7.1f}s  {r.detail}")
    return "\n".join(lines)
