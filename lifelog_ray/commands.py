"""Every `lifelog-ray` subcommand, defined once: its config flags, its other arguments and its handler.

A config flag maps onto a dotted config key and overrides the --config file; the handler turns the
resulting typed config into a call of the stage function and prints that stage's summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import storage
from .config import ConfigError, StudyConfig, load_config
from .console import QUIET_RAY, Console
from .errors import LifelogError

Flag = tuple[str, str, dict[str, Any]]  # (flag, dotted config key, argparse kwargs)
# Every command that writes a stage's outputs holds that stage's lease (STUDY/_leases/); --wait queues.
WAIT: Flag = ("--wait", "storage.lease_wait", {"action": "store_true", "default": None,
                                               "help": "if another run holds this stage of the study, wait for it "
                                                       "instead of failing"})


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Callable[[argparse.Namespace], int]
    flags: list[Flag] = field(default_factory=list)  # config flags
    arguments: Callable[[argparse.ArgumentParser], None] | None = None  # arguments that are not config keys
    study: bool = True  # takes --config, --study, --set, ... (every command but `sample`)


def console_of(args: argparse.Namespace) -> Console:
    """The console main() installed; a handler called on its own gets a plain one (no redirection)."""
    c = getattr(args, "console", None)
    return c if c is not None else Console(verbose=True, out=sys.stdout, err=sys.stderr)


def say(args: argparse.Namespace, text: str) -> None:
    console_of(args).say(text)


def config_from_args(args: argparse.Namespace, flags: list[Flag]) -> StudyConfig:
    """The typed config: the --config file, then the command's flags, then each --set KEY=VALUE."""
    overrides = {key: getattr(args, key) for _, key, _ in flags}
    if not getattr(args, "verbose", True):
        overrides.update(QUIET_RAY)  # workers' output and Ray Data's bars stay in the stage log
    overrides["output.study"] = getattr(args, "study", None)
    overrides["ray.address"] = getattr(args, "ray_address", None)
    explicit = {}
    for item in getattr(args, "set_", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.top_k=5")
        try:
            explicit[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return load_config(args.config, overrides, explicit)


# --- sample -------------------------------------------------------------------------------------------

def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--images-per-day", type=int, default=36)
    p.add_argument("--image-size", default="320x240", help="WxH of the drawn images")
    p.add_argument("--held-out", metavar="DIR", help="also write new, unlabelled days there, for `predict` (their true "
                                                     "activities in DIR/truth.csv)")
    p.add_argument("--held-out-days", type=int, default=2)


def check_sample_arguments(width: int, height: int, days: int, per_day: int, held_out_days: int) -> None:
    """Each of `sample`'s numbers in its range, or a one-line error (nothing is written before this passes)."""
    if not (32 <= width <= 4096 and 32 <= height <= 4096):
        raise LifelogError(f"--image-size {width}x{height}: each side must be 32 to 4096 pixels")
    for flag, value, low, high in (("--days", days, 1, 3650), ("--images-per-day", per_day, 1, 5000),
                                   ("--held-out-days", held_out_days, 0, 3650)):
        if not low <= value <= high:
            raise LifelogError(f"{flag} {value}: expected {low} to {high}")


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import write_sample

    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        raise LifelogError(f"--image-size {args.image_size!r}: expected WIDTHxHEIGHT, e.g. 320x240") from None
    check_sample_arguments(w, h, args.days, args.images_per_day, args.held_out_days)  # before anything is written
    stats = write_sample(args.dir, seed=args.seed, days=args.days, images_per_day=args.images_per_day, image_size=(w, h),
                         held_out=args.held_out, held_out_days=args.held_out_days)
    more = f"; {args.held_out_days} held-out days in {args.held_out}" if args.held_out else ""
    say(args, f"sample lifelog written to {args.dir} (labels: {args.dir}/labels.csv){more}: {stats}")
    return 0


# --- manifest -----------------------------------------------------------------------------------------

MANIFEST_FLAGS: list[Flag] = [
    ("--root", "data.root", {"help": "dataset root directory"}),
    ("--labels", "data.labels", {"help": "labels CSV (minute table for ntcir14)"}),
    ("--layout", "data.layout", {"choices": ["lsc", "ntcir14", "csv", "folder"]}),
    ("--images-csv", "data.images_csv", {"help": "ntcir14: per-image CSV (image_id, image_path)"}),
    ("--path-column", "data.path_column", {}),
    ("--label-column", "data.label_column", {}),
    ("--taxonomy", "data.taxonomy", {"help": "'paper' (bundled), a YAML file, or 'none'"}),
    ("--top-k", "data.top_k", {"type": int}),
    ("--split", "data.split", {"help": "train,val,test fractions, e.g. 0.6,0.2,0.2"}),
    ("--seed", "data.seed", {"type": int}),
    ("--allow-outside-root", "data.allow_outside_root", {"action": "store_true", "default": None}),
    WAIT,
]


def cmd_manifest(args: argparse.Namespace) -> int:
    from .ingest import build_manifest

    cfg = config_from_args(args, MANIFEST_FLAGS)
    with console_of(args).stage("manifest", cfg.study_dir):
        res = build_manifest(cfg)
    say(args, res.accounting())
    say(args, res.categories.to_string(index=False))
    say(args, f"manifest: {res.study / 'manifest.parquet'}  rejects: {res.study / 'rejects.parquet'}")
    return 0


# --- extract ------------------------------------------------------------------------------------------

EXTRACT_FLAGS: list[Flag] = [
    ("--model", "extract.models", {"help": "vgg19 or vgg16 (comma list for both)"}),
    ("--layers", "extract.layers", {"help": "comma list of layer names (default flatten,fc1,fc2,predictions)"}),
    ("--weights", "extract.weights", {"help": "imagenet | none | PATH to a weights file"}),
    ("--batch-size", "extract.batch_size", {"type": int}),
    ("--precision", "extract.precision", {"choices": ["float32", "bfloat16", "float16"]}),
    ("--image-size", "extract.image_size", {"type": int, "help": "input side (224 for imagenet weights)"}),
    ("--num-actors", "extract.num_actors", {"help": "model actors: N, or MIN,MAX for a pool that grows with the "
                                                    "cluster (default: one per GPU the cluster can hold)"}),
    ("--device", "extract.device", {"choices": ["auto", "gpu", "cpu"],
                                    "help": "where the model actors run (default auto: the GPU when the cluster has "
                                            "one or its autoscaler can add one)"}),
    ("--backend", "extract.backend", {"choices": ["tensorflow", "jax"],
                                      "help": "Keras 3 backend of the model actors (default tensorflow)"}),
    ("--decode", "extract.decode", {"choices": ["cpu", "gpu", "auto"],
                                    "help": "decode JPEGs in CPU tasks, or on the model actors' GPUs (default auto)"}),
    ("--overwrite", "extract.overwrite", {"action": "store_true", "default": None}),
    WAIT,
]


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import run_extract

    cfg = config_from_args(args, EXTRACT_FLAGS)
    with console_of(args).stage("extract", cfg.study_dir, f"{','.join(cfg.extract.models)}: {','.join(cfg.extract.layers)}"):
        sums = run_extract(cfg)
    for s in sums:
        say(args, s.line())
    return 0


# --- classify -----------------------------------------------------------------------------------------

CLASSIFY_FLAGS: list[Flag] = [
    ("--models", "classify.models", {"help": "comma list of feature models (default: all present)"}),
    ("--layers", "classify.layers", {"help": "comma list of layers (default: all present)"}),
    ("--classifiers", "classify.classifiers",
     {"help": "comma list, e.g. svm,random_forest,naive_bayes,xgboost,bayesian_ridge"}),
    ("--pca", "classify.pca", {"help": "variance fraction (0.95), a component count, or 'off'"}),
    ("--select-metric", "classify.select_metric", {}),
    ("--search-space", "classify.search_space", {"help": "YAML file of grids per classifier"}),
    ("--refit-on", "classify.refit_on", {"choices": ["train", "train+val"]}),
    ("--protocol", "classify.protocol", {"choices": ["image", "day", "both"],
                                         "help": "split per image (the paper's), per whole day, or both side by side"}),
    WAIT,
]


def cmd_classify(args: argparse.Namespace) -> int:
    from .classify.study import run_classify

    cfg = config_from_args(args, CLASSIFY_FLAGS)
    with console_of(args).stage("classify", cfg.study_dir):
        res = run_classify(cfg)
    say(args, (res.output / "table3.md").read_text("utf-8"))
    say(args, res.line())
    return 0


# --- finetune -----------------------------------------------------------------------------------------

FINETUNE_FLAGS: list[Flag] = [
    ("--models", "finetune.models", {"help": "vgg19,vgg16"}),
    ("--methods", "finetune.methods", {"help": "m1,m2,m3"}),
    ("--weights", "finetune.weights", {"help": "imagenet | none | PATH"}),
    ("--epochs", "finetune.epochs", {"type": int}),
    ("--batch-size", "finetune.batch_size", {"type": int}),
    ("--workers", "finetune.workers", {"type": int}),
    ("--image-size", "finetune.image_size", {"type": int}),
    ("--gpus-per-worker", "finetune.gpus_per_worker", {"type": float}),
    ("--protocol", "finetune.protocol", {"choices": ["image", "day"],
                                         "help": "train and test on the per-image split (the paper's) or whole days"}),
    WAIT,
]


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import run_finetune

    cfg = config_from_args(args, FINETUNE_FLAGS)
    with console_of(args).stage("finetune", cfg.study_dir, f"{','.join(cfg.finetune.methods)} on "
                                                              f"{','.join(cfg.finetune.models)}"):
        runs = run_finetune(cfg)
    say(args, (cfg.study_dir / "finetune" / "table4.md").read_text("utf-8"))
    for r in runs:
        state = "already done" if r.skipped else f"{r.epochs} epochs (best {r.best_epoch})"
        say(args, f"finetune {r.model}/{r.method}: {state}, test accuracy {100 * r.metrics['accuracy']:.2f}% -> {r.output}")
    return 0


# --- report -------------------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    cfg = config_from_args(args, [])
    with console_of(args).stage("report", cfg.study_dir):
        path = build_report(cfg.study_dir, options=cfg.storage.options or None)
    say(args, f"report: {path}")
    return 0


# --- run ----------------------------------------------------------------------------------------------

RUN_FLAGS: list[Flag] = MANIFEST_FLAGS + [
    ("--weights", "extract.weights", {"help": "imagenet | none | PATH (extract; fine-tuning uses finetune.weights)"}),
]


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", help="comma list of stages to run (default: all); the stages they need run first "
                                    "when their outputs are missing")


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import format_summary, parse_stages, run_study

    cfg = config_from_args(args, RUN_FLAGS)
    rows = run_study(cfg, parse_stages(args.stages), console=console_of(args))
    say(args, format_summary(rows, cfg.study_dir))
    return 0


# --- predict ------------------------------------------------------------------------------------------

PREDICT_FLAGS: list[Flag] = [
    ("--images", "predict.images", {"help": "a folder of new images, a manifest .parquet or a .csv (predict.images)"}),
    ("--pipeline", "predict.pipeline", {"help": "auto | approach1 | approach2 | MODEL/LAYER/CLASSIFIER"}),
    ("--name", "predict.name", {"help": "output name under STUDY/predictions/ (default: the input's name)"}),
    ("--device", "extract.device", {"choices": ["auto", "gpu", "cpu"], "help": "where the model actors run"}),
    ("--num-actors", "extract.num_actors", {"help": "model actors: N or MIN,MAX"}),
    ("--backend", "extract.backend", {"choices": ["tensorflow", "jax"],
                                      "help": "Keras 3 backend for Approach-1 pipelines (fine-tuned ones run on "
                                              "TensorFlow)"}),
    ("--decode", "extract.decode", {"choices": ["cpu", "gpu", "auto"],
                                    "help": "where Approach-1 pipelines decode JPEGs (default auto: as the study)"}),
    WAIT,
]


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    cfg = config_from_args(args, PREDICT_FLAGS)
    with console_of(args).stage("predict", cfg.study_dir, cfg.predict.images or ""):
        res = run_predict(cfg)
    say(args, res.line())
    return 0


# --- summary ------------------------------------------------------------------------------------------

def _summary_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", help="a prediction set under STUDY/predictions/ (default: the only one)")
    p.add_argument("--by", choices=["day", "week", "month"], default="day", help="period (ISO weeks)")
    p.add_argument("--activity", help="only this activity (or a comma list)")
    p.add_argument("--from", dest="date_from", metavar="DATE", help="first day, YYYY-MM-DD (inclusive)")
    p.add_argument("--to", dest="date_to", metavar="DATE", help="last day, YYYY-MM-DD (inclusive)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")


def cmd_summary(args: argparse.Namespace) -> int:
    from .events import format_table, summarise

    cfg = config_from_args(args, [])
    table, name = summarise(cfg.study_dir, args.predictions, args.by, args.activity, args.date_from, args.date_to)
    if args.format == "csv":
        say(args, table.to_csv(index=False).rstrip("\n"))
    elif args.format == "json":
        say(args, table.to_json(orient="records", indent=1))
    else:
        say(args, f"time per activity by {args.by} ({name}):")
        say(args, format_table(table))
    return 0


# --- audit --------------------------------------------------------------------------------------------

def _audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--model")
    p.add_argument("--layer")
    p.add_argument("--classifier")
    p.add_argument("--top", type=int, default=20, help="suspects to print")
    p.add_argument("--rerun-without-suspects", action="store_true",
                   help="also refit the pipeline without the flagged training images; compare on test")


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit

    cfg = config_from_args(args, [WAIT])
    with console_of(args).stage("audit", cfg.study_dir):
        out = run_audit(cfg, args.folds, args.model, args.layer, args.classifier, rerun=args.rerun_without_suspects)
    say(args, out.head(args.top)[["rank", "image_id", "given_label", "suggested_label", "score"]].to_string(index=False))
    say(args, f"audit: {int(out['is_issue'].sum())} of {len(out)} labels flagged -> {cfg.study_dir / 'audit'}")
    if args.rerun_without_suspects:
        say(args, "before / after removing flagged training images (test split and labels unchanged):")
        say(args, storage.read_csv(cfg.study_dir / "audit" / "rerun.csv").to_string(index=False))
    return 0


# --- curve --------------------------------------------------------------------------------------------

CURVE_FLAGS: list[Flag] = [
    ("--approach", "curve.approach", {"choices": ["1", "2", "both"],
                                      "help": "1 features + classifier, 2 fine-tuning, or both on one axis (default: "
                                              "both when the study fine-tuned)"}),
    ("--method", "curve.method", {"choices": ["m1", "m2", "m3"], "help": "Approach 2's method (default: the best)"}),
    ("--fractions", "curve.fractions", {"help": "of the train split, e.g. 0.1,0.25,0.5,1 (default 0.05,0.1,0.25,0.5,1)"}),
    ("--seeds", "curve.seeds", {"type": int, "help": "subsets per fraction (default 3)"}),
    ("--protocol", "curve.protocol", {"choices": ["image", "day"], "help": "per-image split or whole days"}),
    WAIT,
]


def cmd_curve(args: argparse.Namespace) -> int:
    from .curve import run_curve

    cfg = config_from_args(args, CURVE_FLAGS)
    c = cfg.curve
    with console_of(args).stage("curve", cfg.study_dir, f"approach {c.approach}, {len(c.fractions)} fractions x "
                                                         f"{c.seeds} seed(s), {c.protocol} split"):
        table = run_curve(cfg)
    say(args, table.to_string(index=False))
    say(args, json.loads((cfg.study_dir / "curve" / "curve.json").read_text("utf-8"))["verdict"])
    say(args, f"curve -> {cfg.study_dir / 'curve'}")
    return 0


# --- doctor -------------------------------------------------------------------------------------------

def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import format_checks, run_doctor

    checks, healthy = run_doctor(config_from_args(args, []).ray)
    say(args, format_checks(checks))
    say(args, "doctor: everything the project needs works" if healthy else
        "doctor: something the project needs is broken (FAIL above)")
    return 0 if healthy else 1


COMMANDS: list[Command] = [
    Command("sample", "write the bundled synthetic sample lifelog (LSC layout)", cmd_sample,
            arguments=_sample_arguments, study=False),
    Command("manifest", "build the study manifest from a lifelog on disk", cmd_manifest, MANIFEST_FLAGS),
    Command("extract", "extract VGG features (all taps in one pass) into Parquet shards", cmd_extract,
            EXTRACT_FLAGS),
    Command("classify", "PCA + classifier battery, grid-searched on validation with Ray Tune (Table 3)",
            cmd_classify, CLASSIFY_FLAGS),
    Command("finetune", "fine-tune VGG (M1/M2/M3) with Ray Train (Table 4, learning curves)", cmd_finetune,
            FINETUNE_FLAGS),
    Command("report", "write the self-contained HTML report of a study", cmd_report),
    Command("run", "the whole study: manifest -> extract -> classify -> finetune -> predict -> report (resumable)",
            cmd_run,
            RUN_FLAGS, _run_arguments),
    Command("predict", "label new lifelog images with the study's best pipeline", cmd_predict, PREDICT_FLAGS),
    Command("summary", "time per activity by day, week or month, from a prediction set's events", cmd_summary,
            arguments=_summary_arguments),
    Command("audit", "rank likely mislabelled images (out-of-fold probabilities + cleanlab)", cmd_audit, [WAIT],
            arguments=_audit_arguments),
    Command("curve", "test score against the amount of training data, for either approach or both (Ray Tune grids)",
            cmd_curve, CURVE_FLAGS),
    Command("doctor", "check this install: versions, devices, cached weights, the Ray cluster, extras", cmd_doctor),
]
