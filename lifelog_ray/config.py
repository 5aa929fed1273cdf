"""One typed, validated config for every stage: YAML file, then CLI overrides, written beside outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import LifelogError

PAPER_LAYERS = ("flatten", "fc1", "fc2", "predictions")
CLASSIFIERS = ("svm", "random_forest", "naive_bayes", "xgboost", "bayesian_ridge")


class ConfigError(LifelogError):
    """A config problem, phrased for the user (names the key and what is wrong)."""


class _Section(BaseModel):
    # Unknown keys are errors: a typo in a YAML file must not be silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    root: str | None = None
    labels: str | None = None
    layout: Literal["lsc", "ntcir14", "csv", "folder"] = "lsc"
    path_column: str = "image_path"
    label_column: str = "label"
    # NTCIR-14: `labels` is the minute table; images_csv maps image_id -> image_path.
    images_csv: str | None = None
    minute_id_column: str = "minute_ID"
    image_id_column: str = "image_id"
    label_source: Literal["minute", "image"] = "minute"
    taxonomy: str | None = "paper"  # "paper" (bundled), a YAML path, or null for raw labels
    top_k: int | None = Field(10, ge=1)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    seed: int = 0
    allow_outside_root: bool = False  # paths in a CSV may leave the root only when the user says so
    encoding: str = "utf-8-sig"  # labels CSV encoding (utf-8, tolerating a BOM)
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

    @field_validator("split", mode="before")
    @classmethod
    def _parse_split(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = tuple(float(x) for x in v.split(","))
            except ValueError as e:
                raise ValueError(f"split must be three comma-separated fractions, got {v!r}") from e
        return v

    @field_validator("split")
    @classmethod
    def _check_split(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError(f"split fractions must be >= 0, train > 0, and sum to 1, got {v}")
        return v


class ExtractConfig(_Section):
    models: list[Literal["vgg19", "vgg16"]] = ["vgg19"]
    layers: list[str] = list(PAPER_LAYERS)
    weights: str = "imagenet"  # imagenet | none | PATH
    seed: int = 0  # random init when weights == none
    image_size: int = Field(224, ge=32)
    batch_size: int = Field(32, ge=1)
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    # Keras 3's backend in the model actors (chosen per actor: the driver may run another, or no TensorFlow).
    backend: Literal["tensorflow", "jax"] = "tensorflow"
    # Where JPEGs are decoded: cpu (Ray tasks, PIL), gpu (in the model actor, nvJPEG via nvImageCodec; a file
    # it refuses falls back to the CPU decoder there), auto (gpu when the actors get a GPU with a usable
    # decoder, else cpu; a study already extracted one way stays that way).
    decode: Literal["cpu", "gpu", "auto"] = "auto"
    # Where the model actors run (lifelog_ray/placement.py): auto takes the GPU when the cluster has one or its
    # autoscaler can start one; gpu insists (a one-line error on a cluster that can never have one); cpu never.
    device: Literal["auto", "gpu", "cpu"] = "auto"
    # The model actor pool: N, or [min, max] to grow with the cluster; None: one per GPU the cluster can hold
    # (else one per 2 CPUs), fixed on a fixed cluster, from 1 up to that on an autoscaling one.
    num_actors: int | tuple[int, int] | None = None
    # How long a stage waits for the GPU nodes it asked the autoscaler for (cloud GPU nodes take minutes).
    gpu_wait_s: float = Field(600.0, ge=0)
    cpus_per_actor: float = Field(1.0, gt=0)
    jpeg_draft: bool = True  # decode big JPEGs at a reduced DCT scale before the resize (much faster)
    max_image_pixels: int = Field(89_478_485, ge=1)  # PIL's default decompression-bomb limit
    unit_size: int = Field(512, ge=1)  # images per resumable unit (a shard per layer)
    # The features' type on disk: float16 halves the storage (the four taps: 69 KB an image instead of 137 KB,
    # 343 GB instead of 685 GB per backbone at 5 million frames); every reader (classify, audit, curve) takes
    # both. Computed in `precision`, stored in this; recorded in features/<model>/_extract.json.
    store_dtype: Literal["float32", "float16"] = "float32"
    overwrite: bool = False

    @field_validator("layers", "models", mode="before")
    @classmethod
    def _csv_list(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @field_validator("num_actors", mode="before")
    @classmethod
    def _parse_actors(cls, v: Any) -> Any:
        """N, "MIN,MAX" (the CLI's --num-actors 1,4) or [MIN, MAX]; MIN == MAX is the fixed pool N."""
        if isinstance(v, bool):
            raise ValueError(f"expected N or [MIN, MAX], got {v!r}")
        if v is None:
            return v
        if isinstance(v, str):
            parts = [x.strip() for x in v.strip("[]() ").split(",") if x.strip()]
            try:
                v = [int(x) for x in parts]
            except ValueError:
                raise ValueError(f"expected N or MIN,MAX (whole numbers), got {v!r}") from None
            v = v[0] if len(v) == 1 else v
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError(f"expected N or [MIN, MAX] (whole numbers), got {v!r}")
            lo, hi = v
            if lo < 1 or lo > hi:
                raise ValueError(f"[min, max] needs 1 <= min <= max, got [{lo}, {hi}]")
            return lo if lo == hi else (lo, hi)
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be at least 1, got {v}")
        return v


class ClassifyConfig(_Section):
    models: list[str] | None = None  # None: every model present under features/
    layers: list[str] | None = None
    classifiers: list[str] = list(CLASSIFIERS)
    pca: float | int | None = 0.95  # fraction of variance, a component count, or null (off)
    pca_solver: Literal["auto", "full", "randomized", "incremental"] = "auto"
    select_metric: Literal["f1_macro", "accuracy", "precision_macro", "recall_macro", "f1_weighted"] = (
        "f1_macro"
    )
    search_space: str | None = None  # YAML path; None: bundled defaults following the paper
    refit_on: Literal["train", "train+val"] = "train"
    cpus_per_trial: float = Field(1.0, gt=0)
    xgboost_distributed: Literal["auto", "always", "never"] = "auto"
    xgboost_workers: int = Field(2, ge=1)
    distributed_min_rows: int = Field(2_000_000, ge=1)
    seed: int = 0
    # image: the paper's per-image split (manifest `split`); day: whole days per split (`split_day`), what a
    # model meets on new days; both: the whole selection once per protocol, side by side in the report.
    protocol: Literal["image", "day", "both"] = "image"
    # Smoothing of the class probabilities along each day's time-ordered images, chosen on validation and
    # reported beside the per-image figures: a centred window, an HMM (Viterbi) with a switch penalty, or none.
    temporal: Literal["none", "window", "hmm"] = "window"
    temporal_max_gap_s: float = Field(300.0, ge=0)  # images further apart in time are not neighbours

    @property
    def protocols(self) -> list[str]:
        return ["image", "day"] if self.protocol == "both" else [self.protocol]

    @field_validator("pca", mode="before")
    @classmethod
    def _parse_pca(cls, v: Any) -> Any:
        """The one place PCA values are read: 0.95 keeps 95 % of the variance, 128 keeps 128 components,
        off/none skips PCA."""
        if v is None or (isinstance(v, str) and v.strip().lower() in ("off", "none", "null", "")):
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = float("nan")
        if 0 < f < 1:
            return f
        if f >= 1 and f == int(f):
            return int(f)
        raise ValueError(f"pca must be a variance fraction in (0, 1), a component count, or 'off', got {v!r}")

    @field_validator("models", "layers", "classifiers", mode="before")
    @classmethod
    def _csv_list(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v


class FinetuneConfig(_Section):
    models: list[Literal["vgg19", "vgg16"]] = ["vgg19"]
    methods: list[Literal["m1", "m2", "m3"]] = ["m1", "m2", "m3"]
    protocol: Literal["image", "day"] = "image"  # the manifest's split column trained and tested on (classify.protocol)
    weights: str = "imagenet"
    seed: int = 0
    image_size: int = Field(224, ge=32)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    learning_rate: float = Field(1e-4, gt=0)
    momentum: float = Field(0.0, ge=0)
    m2_trainable_layers: int = Field(8, ge=1)
    m3_units: int = Field(1024, ge=1)
    early_stopping_metric: str = "val_loss"
    patience: int = Field(3, ge=1)
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(2, ge=0)

    @field_validator("models", "methods", mode="before")
    @classmethod
    def _csv_list(cls, v: Any) -> Any:
        return [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _batch_covers_workers(self) -> FinetuneConfig:
        if self.batch_size < self.workers:  # the global batch is shared out, one share per worker
            raise ValueError(f"batch_size ({self.batch_size}) is the global batch and must be at least "
                             f"workers ({self.workers})")
        return self


class PredictConfig(_Section):
    """`lifelog-ray predict`, and the predict stage of `run` / jobs/study.py (which runs only with images set)."""

    images: str | None = None  # new images: a folder (recursive), a manifest .parquet or a .csv of paths; a URI too
    pipeline: str = "auto"  # auto | approach1 | approach2 | MODEL/LAYER/CLASSIFIER
    name: str | None = None  # STUDY/predictions/<name>/ (default: the images' folder or file name)
    # Events shorter than this are kept but flagged `short` in events.parquet (one stray frame is ~20-30 s).
    min_event_s: float = Field(60.0, ge=0)


class CurveConfig(_Section):
    """`lifelog-ray curve`: test score against the amount of labelled data, for either approach or both."""

    approach: Literal["auto", "1", "2", "both"] = "auto"  # auto: both when the study fine-tuned, else 1
    method: Literal["m1", "m2", "m3"] | None = None  # Approach 2's method; None: the study's best fine-tuned one
    fractions: list[float] = [0.05, 0.1, 0.25, 0.5, 1.0]  # of the train split, stratified
    seeds: int = Field(3, ge=1)  # subsets (and, for Approach 2, initialisations) per fraction
    protocol: Literal["image", "day"] = "image"  # the per-image split, or whole days (no near-duplicate leaks)

    @field_validator("approach", mode="before")
    @classmethod
    def _approach(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @field_validator("fractions", mode="before")
    @classmethod
    def _parse_fractions(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = [float(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ValueError(f"expected a comma list of numbers in (0, 1], e.g. 0.1,0.5,1.0, got {v!r}") from None
        return v

    @field_validator("fractions")
    @classmethod
    def _check_fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError(f"fractions must lie in (0, 1] (of the train split), got {v}")
        return sorted(set(v))


class RayConfig(_Section):
    address: str | None = None  # None: RAY_ADDRESS, a running local cluster, else a new local Ray; "local": new
    log_to_driver: bool = True  # workers' stdout/stderr on the driver's console
    num_cpus: int | None = None  # only for a new local Ray
    num_gpus: int | None = None
    progress_bars: bool = True


class OutputConfig(_Section):
    study: str | None = None  # the study directory: a local path or a URI (s3://bucket/study, gs://...)


class StorageConfig(_Section):
    # fsspec options per protocol, for every URI in the config (images, labels, study), e.g.
    # {"s3": {"endpoint_url": "http://minio:9000"}} or {"gs": {"project": "my-project"}}.
    # Credentials belong in the environment or the instance profile, not in a config file.
    options: dict[str, dict[str, Any]] = {}
    # One run per study stage: STUDY/_leases/<stage>[-<model>].json. A holder whose heartbeat is older
    # than this is dead (on its own host, a gone pid is dead at once); lease_wait (--wait) queues behind
    # a live holder instead of failing.
    lease_timeout_s: float = Field(120.0, gt=0)
    lease_wait: bool = False


SPLIT_NAMES = ("train", "val", "test")  # the manifest's split values, in data.split's order


class StudyConfig(_Section):
    data: DataConfig = DataConfig()
    extract: ExtractConfig = ExtractConfig()
    classify: ClassifyConfig = ClassifyConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    predict: PredictConfig = PredictConfig()
    curve: CurveConfig = CurveConfig()
    ray: RayConfig = RayConfig()
    output: OutputConfig = OutputConfig()
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _names_are_folder_names(self) -> StudyConfig:
        """Layer, classifier and prediction-set names become folder names inside the study: plain names only."""
        from .errors import LifelogError
        from .storage import plain_name

        named = [("extract.layers", n) for n in self.extract.layers]
        named += [("classify.layers", n) for n in self.classify.layers or []]
        named += [("classify.classifiers", n) for n in self.classify.classifiers]
        named += [("predict.name", self.predict.name)] if self.predict.name else []
        for key, name in named:
            try:
                plain_name(name, f"{key}:")
            except LifelogError as e:
                raise ValueError(str(e)) from None
        return self

    @property
    def study_dir(self) -> Path:
        """The study folder: a ``pathlib.Path``, or a ``UPath`` for a URI (same API)."""
        if not self.output.study:
            raise ConfigError("output.study: no study directory given (use --study DIR)")
        from .storage import to_path

        return to_path(self.output.study, self.storage.options)

    def path(self, p: str | os.PathLike) -> Path:
        """Any path or URI of this config (images root, labels CSV) with the storage options applied."""
        from .storage import to_path

        return to_path(p, self.storage.options)


def _format_errors(err: ValidationError, source: str) -> str:
    """One line (the CLI's contract for a user's mistake): every bad key with what is wrong."""
    issues = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        issues.append(f"{key}: {msg}")
    return f"invalid config ({source}): " + "; ".join(issues)


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
                explicit: dict[str, Any] | None = None) -> StudyConfig:
    """Read YAML (if any), apply dotted-key overrides (`data.top_k`), validate.

    A None in ``overrides`` means "flag not given"; ``explicit`` values (``--set``) apply even when None.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    items = [(k, v) for k, v in (overrides or {}).items() if v is not None] + list((explicit or {}).items())
    for key, value in items:
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: cannot override inside a non-mapping")
        node[parts[-1]] = value
        if not source.endswith("+ CLI"):
            source = f"{source} + CLI"
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


# Keys of storage.options that hold credentials (fsspec/s3fs/gcsfs/adlfs names: key, secret, token,
# aws_session_token, account_key, sas_token, password, ...): their values are never written anywhere.
_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|sas_|auth", re.IGNORECASE)
REDACTED = "<redacted>"


def redact_secrets(value: Any, key: str = "") -> Any:
    """``value`` (storage.options, or any part of it) with every credential-like key's value replaced."""
    if isinstance(value, dict):
        return {k: redact_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v, key) for v in value]
    return REDACTED if key and _SECRET_KEY.search(key) and value not in (None, "", False) else value


def config_to_yaml(cfg: StudyConfig) -> str:
    """The resolved config as every file and page the project writes shows it: credentials given as storage
    options are redacted (they belong in the environment; a study folder gets handed on)."""
    data = cfg.model_dump(mode="json")
    data["storage"]["options"] = redact_secrets(data["storage"]["options"])
    return yaml.safe_dump(data, sort_keys=False)


def write_resolved(cfg: StudyConfig, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a stage's outputs, so any result can be reproduced."""
    from .storage import to_path, write_bytes_atomic

    return write_bytes_atomic(config_to_yaml(cfg).encode("utf-8"), to_path(directory) / name)


# Config keys that hold a local path (or a URI, or a keyword such as `imagenet`, `paper`, `none`).
PATH_KEYS = ("data.root", "data.labels", "data.images_csv", "data.taxonomy", "output.study", "classify.search_space",
             "extract.weights", "finetune.weights", "predict.images")
_KEYWORDS = {"imagenet", "none", "paper"}


def rebase_paths(cfg: StudyConfig, base: str | os.PathLike) -> StudyConfig:
    """A copy of ``cfg`` whose relative local paths are taken from ``base`` instead of the working directory.

    A Ray job runs in a copy of the code (`ray job submit --working-dir .`), so `demo/lifelog` in a config
    would name a folder of that copy, which holds no data; `jobs/study.py --base-dir "$PWD"` names the
    folder the paths were written for.
    """
    out = cfg.model_copy(deep=True)
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(out, section), name)
        if not value or value.lower() in _KEYWORDS or "://" in value or os.path.isabs(value):
            continue
        setattr(getattr(out, section), name, os.path.join(os.fspath(base), value))
    return out
