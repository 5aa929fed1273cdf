"""`lifelog-ray predict`: label new lifelog images with a study's best pipeline, streamed through Ray Data.

Approach 1 pipelines (backbone tap -> PCA -> classifier) and fine-tuned models (Approach 2) both work.
Output: Parquet partitioned by day (`day=YYYY-MM-DD/`), one row per input image, bounded memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import events, placement, progress, storage
from .backbones import BackboneSpec, resolve_weights
from .classify.persist import pipeline_dir
from .config import StudyConfig
from .errors import LifelogError
from .extract import check_decode, model_stage, resolve_decode, where_phrase
from .finetune import checked_model_bytes
from .images import decoded_images
from .ingest import (
    day_of,
    derive_image_ids,
    exif_times,
    scan_images,
    shown_name,
    times_and_days,
    timestamp_from_exif,
)
from .lease import leased
from .results import best_row, of_protocol
from .temporal import Smoother, sequences

log = logging.getLogger(__name__)


def list_images(source: str, extensions: tuple[str, ...], options: storage.Options | None = None,
                cfg: StudyConfig | None = None) -> pd.DataFrame:
    """A folder (scanned recursively), a manifest Parquet, or a CSV with a `path` column; local or a URI.
    Ids, times and days are derived a column at a time, as ingest derives them (a multi-year folder holds
    millions of frames); EXIF is read only where a name carries no time, in Ray tasks when there are many
    (`ingest.exif_times`, given the study's `cfg`)."""
    p = storage.to_path(source, options)
    remote = storage.is_remote(p)

    def absolute(base: Path, x: str) -> str:
        if storage.is_uri(x) or Path(x).is_absolute():
            return x
        return str(base / x) if remote else str((base / x).resolve())

    if p.is_dir():
        rels = scan_images(p, extensions)  # a name that is not UTF-8 stays, escaped: its row gets a read error
        df = pd.DataFrame({"path": [shown_name(absolute(p, r)) for r in rels], "rel": [shown_name(r) for r in rels]})
    elif p.suffix == ".parquet":
        df = storage.read_parquet(p)
        df["rel"] = df["path"].map(lambda x: Path(x).name)
    elif p.suffix == ".csv":
        with p.open("rb") as f:
            df = pd.read_csv(f, dtype=str)
        if "path" not in df:
            raise LifelogError(f"{p}: needs a 'path' column")
        df["rel"] = df["path"]
        df["path"] = [absolute(p.parent, x) for x in df["path"]]
    else:
        raise LifelogError(f"--images {source}: expected a folder, a manifest .parquet or a .csv of paths")
    if df.empty:
        raise LifelogError(f"--images {source}: no images found")
    if "image_id" not in df:
        df["image_id"] = derive_image_ids(df["rel"], "lsc")
    if "timestamp" not in df:
        def read_exif(paths: list[str]) -> list:
            if cfg is not None:
                return exif_times(paths, cfg)  # Ray tasks when there are many
            return [timestamp_from_exif(storage.to_path(x, options)) for x in paths]

        df["timestamp"], df["day"] = times_and_days(df["rel"], df["path"], read_exif)
    elif "day" not in df:  # a list with times but no days: the day is the time's
        stamps = pd.to_datetime(df["timestamp"], errors="coerce")
        df["day"] = [day_of(None if pd.isna(t) else t, r) for t, r in zip(stamps, df["rel"])]
    # a day becomes a folder name (day=<day>/): from a column it must be a plain name, checked before any work
    for day in pd.unique(df["day"].astype(str)):
        storage.plain_name(day, f"--images {source}: the day column's value")
    return df[["image_id", "path", "timestamp", "day"]]


@dataclass
class PredictResult:
    output: Path
    images: int
    seconds: int
    where: str = ""  # where the model actors ran
    retried: dict[str, int] = field(default_factory=dict)  # object-store retries, per layer
    events: int = 0  # in events.parquet
    long_events: int = 0  # of them, not flagged short
    already: int = 0  # labelled by an earlier, interrupted run of the same command (resumed)

    def line(self) -> str:
        return (f"predict: {self.images} images labelled in {self.seconds}s ({self.already} already done), "
                f"{self.long_events} events "
                f"(+{self.events - self.long_events} short) -> {self.output} (partitioned by day"
                + (f"; {self.where}" if self.where else "") + ")"
                + (f"; {storage.describe_retries(self.retried)}" if sum(self.retried.values()) else ""))


@dataclass
class Choice:
    approach: int
    model: str
    variant: str  # "layer/classifier" or the fine-tuning method
    accuracy: float


def choose_pipeline(study: Path, which: str) -> Choice:
    """`auto`: the best pipeline over both approaches (`results.ranked`); `approach1` / `approach2`; or
    `model/layer/clf`."""
    if which.count("/") == 2:
        m, la, c = which.split("/")
        return Choice(1, m, f"{la}/{c}", float("nan"))
    if which not in ("auto", "approach1", "approach2"):
        raise LifelogError(f"--pipeline {which!r}: use auto, approach1, approach2 or MODEL/LAYER/CLASSIFIER")
    frames = []  # approach 1 rows first: a full tie goes to approach 1
    if (study / "classify" / "results.parquet").exists():
        r = of_protocol(storage.read_parquet(study / "classify" / "results.parquet"))
        frames.append(r.assign(approach=1, variant=r["layer"] + "/" + r["classifier"]))
    if (study / "finetune" / "results.parquet").exists():
        r = of_protocol(storage.read_parquet(study / "finetune" / "results.parquet"))
        frames.append(r.assign(approach=2, variant=r["method"]))
    cands = pd.concat([f[["approach", "model", "variant", "accuracy", "f1_macro"]] for f in frames],
                      ignore_index=True) if frames else pd.DataFrame()
    if which != "auto" and len(cands):
        cands = cands[cands["approach"] == int(which[-1])]
    if cands.empty:
        raise LifelogError(f"{study}: no trained pipeline for --pipeline {which} (run classify / finetune first)")
    b = best_row(cands)
    return Choice(int(b["approach"]), b["model"], b["variant"], float(b["accuracy"]))


class PipelineClassifier:
    """Approach 1 head: a saved PCA + classifier applied to one tap's features."""

    def __init__(self, study: Path, model: str, layer: str, classifier: str) -> None:
        from .classify.persist import load_pipeline

        self.pipe = load_pipeline(study, model, layer, classifier)
        self.layer = layer
        self.classes = self.pipe.meta["classes"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = batch.pop(f"feat__{self.layer}")
        return _label(batch, self.pipe.predict_proba(feats), self.classes)


class FinetunedClassifier:
    """Approach 2: the exported fine-tuned Keras model (saved by tf-keras inside Ray Train)."""

    def __init__(self, model_path: Path, model_name: str, meta: dict) -> None:
        import tensorflow as tf

        from .backbones import legacy_keras_module
        from .finetune import load_finetuned

        self.keras = legacy_keras_module()  # the Keras that wrote it (see finetune)
        self.model = load_finetuned(self.keras, model_path, model_name, meta)  # weights only, hash checked
        self.tf = tf
        self.model_name = model_name
        self.classes = meta["classes"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .backbones import preprocess

        ok = np.asarray(batch["error"]) == ""
        probs = np.zeros((len(ok), len(self.classes)), dtype=np.float32)
        if ok.any():
            x = preprocess(self.keras, self.model_name, self.tf.cast(batch["image"][ok], self.tf.float32))
            probs[ok] = np.asarray(self.model.predict_on_batch(x))
        batch.pop("image")
        return _label(batch, probs, self.classes)


def _label(batch: dict[str, np.ndarray], probs: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
    ok = np.asarray(batch["error"]) == ""
    best = np.argmax(probs, axis=1)
    out = {k: batch[k] for k in ("image_id", "path", "timestamp", "day", "error") + RETRIED if k in batch}
    out["predicted_label"] = np.where(ok, np.asarray(classes, dtype=object)[best], None).astype(object)
    out["confidence"] = np.where(ok, probs[np.arange(len(best)), best], np.nan).astype(np.float32)
    for i, c in enumerate(classes):
        out[f"prob__{c}"] = np.where(ok, probs[:, i], np.nan).astype(np.float32)
    return out


RETRIED = tuple(f"retried_{k}" for k in storage.RETRY_LAYERS)  # bookkeeping columns, never written


class PredictionWriter:
    """Writer stage of predict: a batch's rows as one Parquet part per day, `day=YYYY-MM-DD/part-<hash>.parquet`
    (the hive layout `pd.read_parquet` reads back with a `day` column), named by the rows' image ids, so a
    retried batch rewrites the same file. Returns how many rows it wrote, and the batch's object-store retries."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        before = storage.retry_counts()
        df = pd.DataFrame({k: v for k, v in batch.items() if k not in RETRIED})
        for day, g in df.groupby("day", sort=True):
            ids = "\n".join(map(str, g["image_id"]))
            name = f"part-{hashlib.sha1(ids.encode()).hexdigest()[:16]}.parquet"
            storage.write_df_atomic(g.drop(columns="day").reset_index(drop=True), self.out / f"day={day}" / name)
        carried = {k: [int(np.asarray(batch[k]).sum())] for k in RETRIED if k in batch}
        return {"rows": np.asarray([len(df)]), **storage.retry_columns(1, before, carried)}


def pipeline_smoother(study: Path, choice: Choice) -> Smoother | None:
    """The smoother chosen on validation when the pipeline was fitted: a classifier's pipeline.json, a
    fine-tuned model's metrics.json (none from a run made before smoothers were chosen)."""
    if choice.approach != 1:
        done = study / "finetune" / choice.model / choice.variant / "metrics.json"
        smoothing = json.loads(done.read_text("utf-8")).get("smoothing", "") if done.exists() else ""
        return Smoother.parse(smoothing) if smoothing else None
    layer, clf = choice.variant.split("/")
    meta = json.loads((pipeline_dir(study / "classify", choice.model, layer, clf) / "pipeline.json").read_text("utf-8"))
    return Smoother.parse(meta["smoothing"]) if meta.get("smoothing") else None


NOT_FRAMES = ["events", "summary_", "_", "."]  # files beside the day partitions: events.parquet, summary_by_*


def read_predictions(out: Path) -> pd.DataFrame:
    """Every frame of a prediction set, with its `day` (the day partitions only; events.parquet and the
    summaries beside them are other tables). Plain pandas: `pd.read_parquet(out, ignore_prefixes=NOT_FRAMES)`."""
    parts = [read_partition(p).assign(day=p.name.split("=", 1)[1])
             for p in sorted(out.iterdir()) if p.name.startswith("day=")]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def read_partition(part: Path) -> pd.DataFrame:
    """One day's predictions (a partition folder), read file by file: on S3/GCS a folder is a prefix."""
    return pd.concat([storage.read_parquet(f) for f in storage.files(part, (".parquet",))], ignore_index=True)


def smooth_days(out: Path, smoother: Smoother | None, max_gap_s: float) -> None:
    """Add `smoothed_label` and `smoothed_confidence` to each day's predictions, day after day in this process
    (run_predict does it, and draws each day's timeline, as a Ray task per day: `finish_days`)."""
    for part in day_parts(out):
        smooth_day(part, smoother, max_gap_s)


def day_parts(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.startswith("day="))


def smooth_day(part: Path, smoother: Smoother | None, max_gap_s: float) -> pd.DataFrame:
    """One day's probabilities smoothed along its time-ordered images (a day is one partition, so it is read
    whole). The day's parts become one file, `smoothed-0.parquet`, its rows in time order. Idempotent: a rerun
    after a kill between the write and the deletes reads each image once and writes the same file."""
    df = read_partition(part).drop_duplicates("image_id")  # a part per batch: never an image twice
    df = df.drop(columns=["smoothed_label", "smoothed_confidence"], errors="ignore")  # a resumed day: again
    df = df.iloc[np.argsort(pd.to_datetime(df["timestamp"], errors="coerce").to_numpy(), kind="stable")]
    df = df.reset_index(drop=True)
    classes = [c[len("prob__"):] for c in df.columns if c.startswith("prob__")]
    ok = (df["error"] == "").to_numpy()
    probs = df[[f"prob__{c}" for c in classes]].to_numpy(dtype=np.float64)[ok]
    labels = np.full(len(df), None, dtype=object)
    conf = np.full(len(df), np.nan, dtype=np.float32)
    if ok.any():
        smoothed = probs
        if smoother is not None:
            seqs = sequences(np.full(int(ok.sum()), part.name), df["timestamp"].to_numpy()[ok], max_gap_s)
            smoothed = smoother.apply(probs, seqs)
        best = np.argmax(smoothed, axis=1)
        labels[ok] = np.asarray(classes, dtype=object)[best]
        # an HMM decodes labels, not probabilities: its confidence is the image's own for that label
        conf[ok] = (probs if smoother is not None and smoother.method == "hmm" else smoothed)[np.arange(len(best)), best]
    at = df.columns.get_loc("confidence") + 1
    df.insert(at, "smoothed_label", labels)
    df.insert(at + 1, "smoothed_confidence", conf)
    old = list(storage.files(part, (".parquet",)))
    storage.write_df_atomic(df, part / "smoothed-0.parquet")
    for f in old:
        if f.name != "smoothed-0.parquet":
            storage.unlink(f)
    return df


def write_timeline(df: pd.DataFrame, day: str, out: Path, options: dict | None, smoothing: str) -> None:
    """The day's PNG, `_timelines/<YYYY-MM-DD>.png` (outside the Parquet partitions): the per-image and the
    smoothed labels along the day, with a few thumbnails."""
    from .timeline import day_timeline_png, thumbnails_of

    ok = df[df["error"] == ""]
    if ok.empty:
        return
    classes = sorted(c[len("prob__"):] for c in df.columns if c.startswith("prob__"))
    png = day_timeline_png(ok, [("per image", "predicted_label"), ("smoothed", "smoothed_label")], classes,
                           f"{day}: predicted activities ({smoothing})", thumbnails_of(ok, options=options))
    storage.write_bytes_atomic(png, out / "_timelines" / f"{day}.png")


def finish_day(part: Path, out: Path, smoother: Smoother | None, max_gap_s: float, options: dict | None,
               smoothing: str) -> tuple[int, dict[str, int]]:
    """A day's own work after labelling, as one Ray task per day (not serially in the driver: a timeline takes
    ~1.7 s, ~20 minutes for 700 days): smoothing along the day, then its timeline. Returns its frames and the
    object-store retries it saw (the run counts every retry, wherever it happened)."""
    storage.watch_retries()  # this worker process may not have opened a URI path yet
    before = storage.retry_counts()
    df = smooth_day(part, smoother, max_gap_s)
    write_timeline(df, part.name.split("=", 1)[1], out, options, smoothing)
    return len(df), storage.retried_since(before)


def finish_days(out: Path, smoother: Smoother | None, max_gap_s: float, options: dict | None) -> dict[str, int]:
    """Every day's `finish_day` as a Ray task (idempotent, so a task lost with its node is simply rerun).
    Returns the tasks' object-store retries."""
    import ray

    smoothing = smoother.describe() if smoother else "no smoother"
    task = ray.remote(num_cpus=1, max_retries=3)(finish_day)
    t0 = time.perf_counter()
    done = ray.get([task.remote(part, out, smoother, max_gap_s, options, smoothing) for part in day_parts(out)])
    log.info("predict: %d day(s), %d frames smoothed and drawn in %.1fs (a Ray task per day)", len(done),
             sum(n for n, _ in done), time.perf_counter() - t0)
    return {k: sum(r[k] for _, r in done) for k in storage.RETRY_LAYERS}


@leased("predict")
def run_predict(cfg: StudyConfig, images: str | None = None, which: str | None = None,
                name: str | None = None) -> PredictResult:
    """Label ``images`` (default ``predict.images``) with pipeline ``which`` (default ``predict.pipeline``) into
    STUDY/predictions/<name> (default ``predict.name``, else the images' folder or file name)."""
    import ray

    from .runtime import ensure_ray

    images = images or cfg.predict.images
    which = which or cfg.predict.pipeline
    name = name or cfg.predict.name
    if not images:
        raise LifelogError("predict: no images to label; pass --images DIR (or set predict.images)")
    # The output folder is deleted and rewritten below: its name must keep it inside STUDY/predictions/.
    if name:
        name = storage.plain_name(name, "predict --name")
    else:
        derived = Path(images.rstrip("/")).stem
        try:
            name = storage.plain_name(derived, "the prediction set name taken from the images' folder,")
        except LifelogError as e:
            raise LifelogError(f"{e}; pass --name NAME") from None
    study = cfg.study_dir
    choice = choose_pipeline(study, which)
    rows = list_images(images, cfg.data.extensions, cfg.storage.options, cfg)
    rows["timestamp"] = rows["timestamp"].astype(str)
    out = study / "predictions" / name
    e = cfg.extract
    if choice.approach == 1:
        layer, clf = choice.variant.split("/")
        sig = json.loads((study / "features" / choice.model / "_extract.json").read_text("utf-8"))
        spec = BackboneSpec(choice.model, (layer,), sig["weights"], sig["image_size"], sig["seed"], sig["precision"])
        size = spec.image_size
        weights = resolve_weights(spec)  # before Ray: a weights problem fails fast
    else:
        meta = json.loads((study / "finetune" / choice.model / choice.variant / "metrics.json").read_text("utf-8"))
        size = meta["image_size"]
        checked_model_bytes(study / "finetune" / choice.model / choice.variant / "model.keras", meta)  # fail fast
    ensure_ray(cfg.ray)
    t0 = time.perf_counter()
    plan = placement.plan_actors(e.device, e.num_actors, e.cpus_per_actor, placement.discover(), "predict")
    log.info("predict: %s", plan.describe())
    decode = None
    if choice.approach == 1:  # the study's decode path where it can be had (features decoded as the training ones)
        recorded = sig.get("decode", "cpu") if e.decode == "auto" else None
        check_decode(e.decode, recorded, plan.device)
    # The output is a function of the input and the pipeline: a rerun of the same command resumes (the frames
    # an interrupted run wrote are kept, as whole parts), anything else replaces it.
    signature = run_signature(study, choice, meta if choice.approach == 2 else None, rows)
    done = resumable_frames(out, signature)
    if done is None:
        storage.rmtree(out)
        storage.write_text_atomic(json.dumps({"signature": signature}), out / RUN_FILE)
        done = set()
    already = int(rows["image_id"].astype(str).isin(done).sum())
    todo = rows[~rows["image_id"].astype(str).isin(done)]
    driver_before = storage.retry_counts()
    written, retried = 0, dict.fromkeys(storage.RETRY_LAYERS, 0)
    watch = placement.ActorWatch("FeatureExtractor" if choice.approach == 1 else "FinetunedClassifier")
    with placement.provision(plan, e.gpu_wait_s) if len(todo) else contextlib.nullcontext() as got:
        if not len(todo):
            pass  # every frame was labelled by the interrupted run: only the per-day work is left
        elif choice.approach == 1:
            decode = resolve_decode(e.decode, recorded, plan.device, e.gpu_wait_s)[0]
            pe = e.model_copy(update={"image_size": size})
            ds = model_stage(todo, spec, weights, pe, decode, plan, got.ready, cfg.storage.options)
            # PCA and the classifier in a pool of their own that grows with the model actors' output (one
            # actor was the ceiling behind any number of GPUs: a paper-size RBF SVM labels a few hundred frames/s)
            ds = ds.map_batches(PipelineClassifier, fn_constructor_kwargs={
                "study": study, "model": choice.model, "layer": layer, "classifier": clf},
                batch_size=e.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
                num_cpus=0.25, batch_format="numpy")
        else:  # fine-tuned pipelines run on tf-keras, with CPU decode
            ds = decoded_images(todo, size, e.max_image_pixels, e.batch_size, e.jpeg_draft, cfg.storage.options)
            ds = ds.map_batches(FinetunedClassifier, fn_constructor_kwargs={
                "model_path": study / "finetune" / choice.model / choice.variant / "model.keras",
                "model_name": choice.model, "meta": meta},
                batch_size=e.batch_size, compute=plan.strategy(got.ready),
                num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, batch_format="numpy")
        if len(todo):
            ds = ds.map_batches(PredictionWriter, fn_constructor_kwargs={"out": out}, batch_size=4 * e.batch_size,
                                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
                                num_cpus=0.25, batch_format="numpy")
            for b in ds.iter_batches(batch_size=None, batch_format="pandas"):
                written += int(b["rows"].sum())
                got_retries = {k: int(b[f"retried_{k}"].sum()) for k in storage.RETRY_LAYERS}
                if sum(got_retries.values()):
                    log.info("storage: %s labelling a batch of images", storage.describe_retries(got_retries))
                retried = {k: retried[k] + got_retries[k] for k in retried}
                progress.report("predict", already + written, len(rows), "images")
    if already + written != len(rows):  # every input row is in the output, with its label or its error
        raise LifelogError(f"predict: {already + written} of {len(rows)} images were written; rerun the same "
                           f"command")
    where = where_phrase(plan, decode or "cpu", watch)
    smoother = pipeline_smoother(study, choice)
    days = finish_days(out, smoother, cfg.classify.temporal_max_gap_s, cfg.storage.options)  # a Ray task per day
    found = events.write_summaries(out, cfg.classify.temporal_max_gap_s, cfg.predict.min_event_s)
    mine = storage.retried_since(driver_before)
    retried = {k: retried[k] + mine[k] + days[k] for k in retried}
    storage.write_text_atomic(json.dumps({**choice.__dict__, "smoothing": smoother.describe() if smoother else "",
                                          "where": where}, default=float, indent=1), out / "_pipeline.json")
    n = len(rows)
    log.info("predicted %d images in %.1fs with %s (%s)", n, time.perf_counter() - t0, choice, where)
    if sum(retried.values()):
        log.info("storage: %s in this run", storage.describe_retries(retried))
    return PredictResult(out, n, int(time.perf_counter() - t0), where, retried, len(found),
                         int((~found["short"]).sum()) if len(found) else 0, already)


RUN_FILE = "_run.json"  # beside the day partitions: what this prediction set is a function of


def run_signature(study: Path, choice: Choice, finetuned: dict | None, rows: pd.DataFrame) -> str:
    """The pipeline (and its files' hashes) and the input frames: a rerun with the same signature resumes."""
    if finetuned is not None:
        model = finetuned.get("model_sha256", "")
    else:
        layer, clf = choice.variant.split("/")
        model = (pipeline_dir(study / "classify", choice.model, layer, clf) / "pipeline.json").read_text("utf-8")
    frames = "\n".join(f"{i}\t{p}\t{d}" for i, p, d in zip(rows["image_id"].astype(str), rows["path"].astype(str),
                                                          rows["day"].astype(str)))
    return hashlib.sha1(json.dumps([choice.__dict__, model, frames], default=str).encode()).hexdigest()


def resumable_frames(out: Path, signature: str) -> set[str] | None:
    """The image ids an interrupted run with this signature wrote (its parts are whole: each is written at
    once), or None when there is no such run to resume (nothing there, or another input or pipeline)."""
    try:
        recorded = json.loads((out / RUN_FILE).read_text("utf-8")).get("signature")
    except (FileNotFoundError, ValueError):
        return None
    if recorded != signature:
        return None
    done: set[str] = set()
    for part in (p for p in out.iterdir() if p.name.startswith("day=")):
        for f in storage.files(part, (".parquet",)):
            done.update(storage.read_parquet(f, columns=["image_id"])["image_id"].astype(str))
    return done
