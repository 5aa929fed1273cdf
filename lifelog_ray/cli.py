"""`lifelog-ray` command line: a thin layer mapping flags onto the typed config, then the stage functions."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import yaml

from .config import ConfigError, StudyConfig, load_config
from .errors import USER_ERRORS
from .storage import access_errors

log = logging.getLogger("lifelog_ray")

# (flag, dotted config key, argparse kwargs) per subcommand; flags override the --config file.
Flag = tuple[str, str, dict[str, Any]]

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
]

EXTRACT_FLAGS: list[Flag] = [
    ("--model", "extract.models", {"help": "vgg19 or vgg16 (comma list for both)"}),
    ("--layers", "extract.layers", {"help": "comma list of layer names (default flatten,fc1,fc2,predictions)"}),
    ("--weights", "extract.weights", {"help": "imagenet | none | PATH to a weights file"}),
    ("--batch-size", "extract.batch_size", {"type": int}),
    ("--precision", "extract.precision", {"choices": ["float32", "bfloat16", "float16"]}),
    ("--image-size", "extract.image_size", {"type": int, "help": "input side (224 for imagenet weights)"}),
    ("--num-actors", "extract.num_actors", {"type": int}),
    ("--overwrite", "extract.overwrite", {"action": "store_true", "default": None}),
]

CLASSIFY_FLAGS: list[Flag] = [
    ("--models", "classify.models", {"help": "comma list of feature models (default: all present)"}),
    ("--layers", "classify.layers", {"help": "comma list of layers (default: all present)"}),
    ("--classifiers", "classify.classifiers", {"help": "comma list, e.g. svm,random_forest,naive_bayes,xgboost,bayesian_ridge"}),
    ("--pca", "classify.pca", {"help": "variance fraction (0.95), a component count, or 'off'"}),
    ("--select-metric", "classify.select_metric", {}),
    ("--search-space", "classify.search_space", {"help": "YAML file of grids per classifier"}),
    ("--refit-on", "classify.refit_on", {"choices": ["train", "train+val"]}),
]

FINETUNE_FLAGS: list[Flag] = [
    ("--models", "finetune.models", {"help": "vgg19,vgg16"}),
    ("--methods", "finetune.methods", {"help": "m1,m2,m3"}),
    ("--weights", "finetune.weights", {"help": "imagenet | none | PATH"}),
    ("--epochs", "finetune.epochs", {"type": int}),
    ("--batch-size", "finetune.batch_size", {"type": int}),
    ("--workers", "finetune.workers", {"type": int}),
    ("--image-size", "finetune.image_size", {"type": int}),
    ("--gpus-per-worker", "finetune.gpus_per_worker", {"type": float}),
]


def _add_common(p: argparse.ArgumentParser, study_required: bool = True) -> None:
    p.add_argument("--config", help="YAML config; flags override it")
    p.add_argument("--study", help="study directory (output.study)", required=False)
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                   help="any config key, dotted, value as YAML (repeatable), e.g. "
                        "--set storage.options.s3.endpoint_url=http://minio:9000")


def _add_flags(p: argparse.ArgumentParser, flags: list[Flag]) -> None:
    for flag, key, kw in flags:
        if kw.get("action") != "store_true":
            kw = {"metavar": "N" if kw.get("type") in (int, float) else flag.lstrip("-").upper().replace("-", "_"), **kw}
        p.add_argument(flag, dest=key, **kw)


def _cfg(args: argparse.Namespace, flags: list[Flag]) -> StudyConfig:
    overrides = {key: getattr(args, key) for _, key, _ in flags}
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


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import write_sample

    w, h = (int(x) for x in args.image_size.lower().split("x"))
    stats = write_sample(args.dir, seed=args.seed, days=args.days, images_per_day=args.images_per_day, image_size=(w, h))
    print(f"sample lifelog written to {args.dir} (labels: {args.dir}/labels.csv): {stats}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from .ingest import build_manifest

    cfg = _cfg(args, MANIFEST_FLAGS)
    res = build_manifest(cfg)
    print(res.accounting())
    print(res.categories.to_string(index=False))
    print(f"manifest: {res.study / 'manifest.parquet'}  rejects: {res.study / 'rejects.parquet'}")
    return 0


COMMANDS: dict[str, tuple[str, list[Flag], Callable[[argparse.Namespace], int] | None]] = {
    "manifest": ("build the study manifest from a lifelog on disk", MANIFEST_FLAGS, cmd_manifest),
}


def register(name: str, help_: str, flags: list[Flag], fn: Callable[[argparse.Namespace], int]) -> None:
    COMMANDS[name] = (help_, flags, fn)


def build_parser() -> argparse.ArgumentParser:
    from . import commands  # noqa: F401 - registers the stage subcommands

    parser = argparse.ArgumentParser(
        prog="lifelog-ray",
        description="Transfer-learning study of daily activities in lifelog images, on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("sample", help="write the bundled synthetic sample lifelog (LSC layout)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--images-per-day", type=int, default=60)
    p.add_argument("--image-size", default="320x240", help="WxH of the drawn images")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_sample)
    for name, (help_, flags, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        _add_common(p)
        _add_flags(p, flags)
        if name == "run":
            p.add_argument("--stages", help="comma list of stages to run (default: all)")
        if name == "audit":
            p.add_argument("--folds", type=int, default=5)
            p.add_argument("--model")
            p.add_argument("--layer")
            p.add_argument("--classifier")
            p.add_argument("--top", type=int, default=20, help="suspects to print")
            p.add_argument("--rerun-without-suspects", action="store_true",
                           help="also refit the pipeline without the flagged training images; compare on test")
        if name == "curve":
            p.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0")
            p.add_argument("--seeds", type=int, default=3)
        if name == "predict":
            p.add_argument("--images", required=True, help="a folder of new images, a manifest .parquet or a .csv")
            p.add_argument("--pipeline", default="auto", help="auto | approach1 | approach2 | MODEL/LAYER/CLASSIFIER")
            p.add_argument("--name", help="output name under STUDY/predictions/ (default: the input's name)")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except access_errors() as e:
        print(f"error: cannot use the storage location ({type(e).__name__}: {e}); check the path, "
              f"storage.options and the credentials in the environment", file=sys.stderr)
        return 2


if __name__ == "__main__":  # run through the package, so the stage commands register in one module
    from lifelog_ray.cli import main as _main

    sys.exit(_main())
