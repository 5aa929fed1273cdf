"""Approach 2: fine-tune VGG (M1 / M2 / M3) with Ray Train's TensorflowTrainer, images streamed by Ray Data.

M1: new softmax prediction layer, only it trains.  M2: new prediction layer, the last N layers train
(N = 8 in the paper: block5_conv2..4, pool, flatten, fc1, fc2, predictions).  M3: the dense top is
replaced by Dense(ReLU) + softmax on the frozen convolutional base, only the new top trains.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import checkpoints, placement, progress, storage
from .backbones import BackboneSpec, application, build_base, legacy_keras_module, preprocess, resolve_weights
from .config import SPLIT_NAMES, FinetuneConfig, StudyConfig, write_resolved
from .errors import LifelogError
from .events import summary_metrics
from .images import decoded_images
from .lease import leased
from .metrics import METRIC_COLUMNS, TABLE_METRICS, full_report, scores
from .temporal import Smoother, choose, sequences

log = logging.getLogger(__name__)

HEAD = "predictions_lifelog"
FAULT_ENV = "LIFELOG_RAY_FAULT_AFTER_EPOCH"  # test hook: a worker raises after this epoch's checkpoint ("E", or
# "E:J" for the run's job J, counted from 0 among the jobs it trains), once: not in a resumed job
WHOLE_VAL = "val_whole"  # the validation split unsplit, for rank 0 to score after training
RESULTS = "results"  # in a run's folder: each job's tested model and scores, written when the job ends


def needs_full_input(method: str) -> bool:
    """M1/M2 keep fc1/fc2, whose shapes fix the input size; M3 keeps only the convolutional base."""
    return method in ("m1", "m2")


def build_method_model(keras, spec: BackboneSpec, method: str, n_classes: int, weights: list[np.ndarray] | None,
                       m2_trainable_layers: int = 8, m3_units: int = 1024):
    """The method's model with exactly the layers it trains left trainable."""
    if needs_full_input(method):
        base = build_base(keras, spec, None)
        if weights is not None:
            base.set_weights(weights)
        x = base.get_layer("fc2").output
        out = keras.layers.Dense(n_classes, activation="softmax", name=HEAD)(x)
        model = keras.Model(base.inputs, out, name=f"{spec.model}_{method}")
        for layer in model.layers:
            layer.trainable = False
        train_from = 1 if method == "m1" else m2_trainable_layers
        for layer in model.layers[-train_from:]:
            layer.trainable = True
        return model
    if method != "m3":
        raise LifelogError(f"unknown fine-tuning method {method!r} (m1, m2, m3)")
    conv = application(keras, spec.model)(include_top=False, weights=None, input_shape=(spec.image_size, spec.image_size, 3))
    if weights is not None:
        conv.set_weights(weights[: len(conv.get_weights())])  # the conv part leads the full weight list
    conv.trainable = False
    x = keras.layers.Flatten(name="flatten_lifelog")(conv.output)
    x = keras.layers.Dense(m3_units, activation="relu", name="fc_lifelog")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name=HEAD)(x)
    return keras.Model(conv.inputs, out, name=f"{spec.model}_m3")


def weight_spec(f: FinetuneConfig, model: str, method: str) -> BackboneSpec:
    size = f.image_size
    if not needs_full_input(method) and f.weights.lower() != "none":
        size = 224  # pretrained files hold the 224 top; M3 uses only their (size-free) conv part
    elif needs_full_input(method) and f.weights.lower() != "none" and size != 224:
        raise LifelogError(f"{method} keeps the pretrained fc layers, so it needs --image-size 224 "
                           f"(or --weights none); m3 works at any size >= 32")
    return BackboneSpec(model, ("fc2",), f.weights, size, f.seed, "float32")


def _keep_decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ok = np.asarray(batch["error"]) == ""  # undecodable files are extract rejects already
    return {"image": batch["image"][ok], "label": batch["label_idx"][ok].astype(np.int64),
            "image_id": batch["image_id"][ok]}


def image_dataset(rows: pd.DataFrame, classes: list[str], size: int, max_pixels: int, batch: int, seed: int,
                  shuffle: bool, jpeg_draft: bool = True, options: dict | None = None):
    """Manifest rows -> a streaming Ray Dataset of (image uint8, label int), decoded like extraction."""
    rows = rows[["image_id", "path", "label"]].astype(str).copy()
    rows["label_idx"] = rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    if shuffle:
        rows = rows.sample(frac=1.0, random_state=seed)
    ds = decoded_images(rows, size, max_pixels, batch, jpeg_draft, options)
    ds = ds.map_batches(_keep_decoded, batch_format="numpy", batch_size=batch)
    ds.context.execution_options.preserve_order = True  # the same seed gives the same batches, resumed or not
    return ds


def _to_tf(shard, keras, model_name: str, batch: int, shuffle_seed: int | None, size: int):
    import tensorflow as tf

    # The types are known (decoded_images: (S, S, 3) uint8, labels int64): given, Ray Data need not infer them
    # from the shard's schema, which runs the decode pipeline once more before the first epoch (~3 s a split).
    ds = shard.to_tf(feature_columns="image", label_columns="label", batch_size=batch,
                     local_shuffle_buffer_size=4 * batch if shuffle_seed is not None else None,
                     local_shuffle_seed=shuffle_seed,
                     feature_type_spec=tf.TensorSpec((None, size, size, 3), tf.uint8),
                     label_type_spec=tf.TensorSpec((None,), tf.int64))
    return ds.map(lambda x, y: (preprocess(keras, model_name, tf.cast(x, tf.float32)), y))


def replica_batches(strategy, shard, keras, model_name: str, batch: int, shuffle_seed: int | None, size: int):
    """One worker's Ray shard as its replica's batches, handed to Keras already distributed.

    Given a plain dataset, MultiWorkerMirroredStrategy rebatches each local batch into one piece per
    worker, so a last local batch smaller than the worker count gives some replica an *empty* batch,
    and TensorFlow's oneDNN fused Conv2D+BiasAdd+Relu returns a wrongly shaped tensor for an empty batch
    ("input depth must be evenly divisible by filter depth: 3 vs 64" in block1_conv2). Ray Train splits
    with ``equal=True``, so with no rebatching every worker runs the same steps and no batch is empty.
    ``batch`` is the global batch; each replica takes its share.
    """
    per_replica = per_replica_batch(batch, strategy.num_replicas_in_sync)
    return strategy.distribute_datasets_from_function(
        lambda _ctx: _to_tf(shard, keras, model_name, per_replica, shuffle_seed, size))


def per_replica_batch(batch: int, workers: int) -> int:
    """Each replica's share of the global batch (one replica per worker)."""
    return max(1, batch // workers)


def replica_steps(n_rows: int, workers: int, batch: int) -> int:
    """Keras needs a step count for a distributed dataset: an upper bound from the manifest's rows (each
    worker holds at most ceil(n / workers) of them). Rows that fail to decode end the epoch early,
    on every worker at the same step, since the shards are equal."""
    return max(1, math.ceil(math.ceil(n_rows / workers) / per_replica_batch(batch, workers)))


def _sum_over_workers(strategy, values: list[int]) -> list[int]:
    import tensorflow as tf

    local = tf.constant(values, tf.int64)
    return [int(v) for v in strategy.reduce("SUM", strategy.run(lambda: tf.identity(local)), axis=None).numpy()]


def _inject_fault(epoch: int, run_dir: str, options: dict | None, job: int, timeout_s: float = 300.0) -> None:
    """Test hook: crash the worker early in epoch ``epoch + 1``, as a lost node would.

    It first waits until the controller has registered epoch ``epoch``'s checkpoint (its snapshot file
    names it): a crash right after ``report`` could otherwise beat the registration, which no real
    crash in the middle of an epoch does. Waiting on that file, not on a clock, makes the hook the
    same on every machine.
    """
    snapshot = storage.to_path(run_dir, options) / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            snap = json.loads(snapshot.read_text())
            if any((r.get("metrics") or {}).get("epoch", 0) >= epoch and (r.get("metrics") or {}).get("job") == job
                   for r in snap.get("checkpoint_results", [])):
                break
        except (OSError, ValueError):
            pass  # not written yet, or caught mid-write
        time.sleep(0.2)
    else:
        log.warning("fault hook: epoch %d's checkpoint not registered after %.0fs; crashing anyway", epoch, timeout_s)
    raise RuntimeError(f"injected fault in epoch {epoch + 1}, after epoch {epoch}'s checkpoint ({FAULT_ENV})")


def _fault_hook() -> list[int] | None:
    """FAULT_ENV as [epoch, job]."""
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    epoch, _, job = value.partition(":")
    return [int(epoch), int(job or 0)]


def checkpoint_state(ckpt: Any) -> dict:
    """A Ray Train checkpoint's state file alone, where the checkpoint lies (a node's disk or a bucket): which job
    and epoch it is of. The restore fetches the whole checkpoint once; this never downloads its weights."""
    with ckpt.filesystem.open_input_file(Path(ckpt.path, checkpoints.STATE).as_posix()) as fh:
        return json.loads(fh.readall().decode("utf-8"))


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (tf-keras, MultiWorkerMirroredStrategy): the run's jobs (a model and a
    method each) one after another, in one worker group. A job whose results are written is done: after a
    failure the run resumes at the job in progress, from its last checkpoint."""
    import ray
    import ray.train
    import tensorflow as tf

    keras = legacy_keras_module()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    f = FinetuneConfig(**config["finetune"])
    classes = config["classes"]
    results = storage.to_path(config["run_dir"], config.get("storage_options")) / RESULTS
    # Once per process: TensorFlow configures its collectives when the strategy is made. Every job trains under it.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ckpt = ray.train.get_checkpoint()
    in_progress = None  # the job the last checkpoint belongs to
    if ckpt:
        saved = checkpoint_state(ckpt)
        # a checkpoint from before runs held several jobs names none: it is the one job's of its run
        in_progress = saved.get("job", config["jobs"][0]["key"] if len(config["jobs"]) == 1 else None)
    for index, job in enumerate(config["jobs"]):
        if (results / job["key"] / checkpoints.STATE).exists():
            continue  # trained and tested before a failure; its results are written
        spec = BackboneSpec(**job["spec"])
        weights = job["weights"]
        if weights is not None and type(weights).__name__ == "ObjectRef":
            weights = ray.get(weights)
        keras.utils.set_random_seed(f.seed)  # the new layers start alike in every attempt of the run
        with strategy.scope():
            model = build_method_model(keras, spec, job["method"], len(classes), weights, f.m2_trainable_layers,
                                       f.m3_units)
            opt = (keras.optimizers.SGD(learning_rate=f.learning_rate, momentum=f.momentum) if f.optimizer == "sgd"
                   else keras.optimizers.Adam(learning_rate=f.learning_rate))
            model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            opt.build(model.trainable_variables)  # its state exists now, so a checkpoint can restore it by name
        work = Path(tempfile.mkdtemp(prefix="lifelog-ft-"))  # the best epoch's weights: removed when the job ends
        try:
            _train_and_test(config, job, index, ctx, rank, f, spec, classes, weights, strategy, model, opt, work,
                            ckpt if in_progress == job["key"] else None, results / job["key"])
        finally:
            shutil.rmtree(work, ignore_errors=True)  # ~100 MB a run (M1, 32 px): never left on a node's disk
        del model, opt


def _train_and_test(config: dict, job: dict, index: int, ctx: Any, rank: int, f: FinetuneConfig, spec: BackboneSpec,
                    classes: list[str], weights: Any, strategy: Any, model: Any, opt: Any, work: Path, ckpt: Any,
                    results: Path) -> None:
    import ray.train
    import tensorflow as tf
    from ray.train import Checkpoint

    keras = legacy_keras_module()
    method = job["method"]
    monitor = f.early_stopping_metric
    lower_is_better = "loss" in monitor
    state = {"checkpoint_format": checkpoints.FORMAT, "job": job["key"], "epoch": 0, "history": [], "best": None,
             "best_epoch": None, "wait": 0, "stopped": False, "resumed_at": [], "restores": []}
    best_file = work / checkpoints.BEST
    if ckpt:
        with ckpt.as_directory() as d:
            saved = checkpoints.read_state(Path(d))
            checkpoints.check_format(saved, "this run's checkpoint")
            initial = {k: v.numpy() for k, v in checkpoints.model_variables(model, trainable=False).items()}
            arrays = checkpoints.load(Path(d) / checkpoints.LATEST)
            checkpoints.restore(arrays, model, opt)
            checked = checkpoints.verify(model, initial, arrays)
            del initial, arrays
            state = saved
            if rank == 0 and (Path(d) / checkpoints.BEST).exists():
                shutil.copy(Path(d) / checkpoints.BEST, best_file)
        state["resumed_at"].append(state["epoch"])
        # Every rank restored and verified its own copy; the sum says how many did, and how many weights each.
        workers, frozen, trainable = _sum_over_workers(strategy, [1, checked["frozen"], checked["trainable"]])
        state["restores"].append({"epoch": state["epoch"], "workers_verified": workers,
                                  "frozen": frozen // workers, "trainable": trainable // workers})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(state["epoch"], f.epochs):
        if state["stopped"]:
            break
        if config.get("fault_after_epoch") == [epoch, index] and not state["resumed_at"]:
            _inject_fault(epoch, config["run_dir"], config.get("storage_options"), index)
        t0 = time.perf_counter()
        train_tf = replica_batches(strategy, train_shard, keras, spec.model, f.batch_size, f.seed + epoch,
                                   f.image_size)
        val_tf = replica_batches(strategy, val_shard, keras, spec.model, f.batch_size, None, f.image_size)
        world = ctx.get_world_size()
        h = model.fit(train_tf, validation_data=val_tf, epochs=1, verbose=0,
                      steps_per_epoch=replica_steps(config["n_train"], world, f.batch_size),
                      validation_steps=replica_steps(config["n_val"], world, f.batch_size))
        secs = time.perf_counter() - t0
        m = {k: float(v[-1]) for k, v in h.history.items()}
        n_seen = config["n_train"] / ctx.get_world_size()
        m.update({"epoch": epoch + 1, "epoch_s": secs, "images_per_s_per_worker": n_seen / secs})
        value = m.get(monitor)
        improved = value is not None and (state["best"] is None or
                                          (value < state["best"] if lower_is_better else value > state["best"]))
        if improved:
            state.update(best=value, best_epoch=epoch + 1, wait=0)
            if rank == 0:  # only rank 0 checkpoints and tests the best epoch
                checkpoints.save(best_file, model)
        else:
            state["wait"] += 1
            state["stopped"] = state["wait"] >= f.patience  # a good fit: stop, keep the best epoch
        state["epoch"] = epoch + 1
        state["history"].append(m)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                checkpoints.save(Path(d) / checkpoints.LATEST, model, opt)
                if best_file.exists():
                    shutil.copy(best_file, Path(d) / checkpoints.BEST)
                (Path(d) / checkpoints.STATE).write_text(json.dumps(state))
            # the job's index too: the driver's progress line names the job by it
            ray.train.report({**m, "job": index},
                             checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
    if rank != 0:
        # ray.train.report is a barrier across the group: every rank reports, rank 0 once its results are written.
        ray.train.report({"job_done": index}, checkpoint=None)
        return
    # Test once, with the best epoch's weights, on a plain (non-distributed) copy of the model.
    plain = build_method_model(keras, spec, method, len(classes), weights, f.m2_trainable_layers, f.m3_units)
    checkpoints.restore(checkpoints.load(best_file) if best_file.exists()
                        else checkpoints.named_arrays(model), plain)  # never assigned into the distributed model
    def scored(split: str) -> dict[str, np.ndarray]:  # the class probabilities of a whole split, in rank 0
        y_true, proba, ids = [np.zeros(0, np.int64)], [np.zeros((0, len(classes)), np.float32)], [np.zeros(0, str)]
        for b in ray.train.get_dataset_shard(split).iter_batches(batch_size=f.batch_size, batch_format="numpy"):
            x = preprocess(keras, spec.model, tf.cast(b["image"], tf.float32))
            proba.append(np.asarray(plain.predict_on_batch(x), dtype=np.float32))
            y_true.append(b["label"])
            ids.append(b["image_id"])
        proba_ = np.concatenate(proba)
        return {"y_true": np.concatenate(y_true), "y_pred": np.argmax(proba_, axis=1), "proba": proba_,
                "image_id": np.concatenate(ids).astype(str)}

    # The job's results, beside the run's checkpoints (shared storage, as Ray Train's own), its state last: once
    # that is there the job is done, and a resumed run goes on with the next one.
    with tempfile.TemporaryDirectory() as d:
        plain.save(str(Path(d) / "model.keras"))
        names = ["model.keras", "test.npz", "val.npz"]
        if not config.get("light"):  # the Keras 3 copy, from the weights in memory (the driver would load the file)
            export_keras3(plain, spec, method, len(classes), f, Path(d) / KERAS3_FILE)
            names.append(KERAS3_FILE)
        np.savez(Path(d) / "test.npz", **scored("test"))
        np.savez(Path(d) / "val.npz", **scored(WHOLE_VAL))  # to choose a temporal smoother on
        for name in names:
            storage.write_bytes_atomic((Path(d) / name).read_bytes(), results / name)
    storage.write_text_atomic(json.dumps({**state, "final": True}), results / checkpoints.STATE)
    ray.train.report({"job_done": index}, checkpoint=None)


def smooth_on_validation(manifest: pd.DataFrame, method: str, max_gap_s: float, val: dict, test: dict
                         ) -> tuple[Smoother | None, np.ndarray]:
    """The temporal smoother (classify.temporal) chosen on the validation images by macro-F1, as for
    Approach 1, and the test labels it gives; per-image labels when none beats them. Each split is
    smoothed alone, along its own images' days and times from the manifest."""
    if method == "none" or not len(val["y_true"]) or not len(test["y_true"]):
        return None, test["y_pred"]
    times = manifest.assign(image_id=manifest["image_id"].astype(str)).set_index("image_id")[["day", "timestamp"]]

    def seqs(ids: np.ndarray) -> list[np.ndarray]:
        t = times.reindex(ids)
        return sequences(t["day"].to_numpy(), t["timestamp"].to_numpy(), max_gap_s)

    smoother = choose(method, val["proba"].astype(np.float64), val["y_true"], seqs(val["image_id"]),
                      lambda y, p: scores(y, p)["f1_macro"])
    if smoother is None:
        return None, test["y_pred"]
    return smoother, np.argmax(smoother.apply(test["proba"].astype(np.float64), seqs(test["image_id"])), axis=1)


def split_column(f: FinetuneConfig) -> str:
    """The manifest column of the chosen protocol: the paper's per-image `split`, or whole days (`split_day`)."""
    return "split" if f.protocol == "image" else "split_day"


def load_finetuned(keras: Any, model_path: Path, model_name: str, meta: dict) -> Any:
    """A fine-tuned model as data, never code: the architecture is rebuilt here from the run's recorded method
    and sizes, and only the weights are read from ``model.keras`` (its `model.weights.h5`), after the file's
    SHA-256 matched the one ``metrics.json`` recorded when the run wrote it. A legacy HDF5 model, a pickle or
    a `.keras` whose config names a `Lambda` or any other class is never deserialised."""
    data = checked_model_bytes(model_path, meta)
    arch = meta["architecture"]
    spec = BackboneSpec(model_name, ("fc2",), "none", int(meta["image_size"]), 0, "float32")
    model = build_method_model(keras, spec, arch["method"], len(meta["classes"]), None,
                               int(arch["m2_trainable_layers"]), int(arch["m3_units"]))
    with tempfile.TemporaryDirectory(prefix="lifelog-ray-model-") as d:
        local = Path(d) / "model.keras"  # the bytes just checked, not the path again
        local.write_bytes(data)
        model.load_weights(str(local))
    return model


def checked_model_bytes(model_path: Path, meta: dict) -> bytes:
    """``model.keras``'s bytes, once its recorded hash matched and it is a zip archive (else one-line error)."""
    arch, want = meta.get("architecture"), meta.get("model_sha256")
    if not arch or not want:
        raise LifelogError(f"{model_path}: this fine-tuned model has no recorded architecture and hash (written "
                           f"by an older version); rerun `lifelog-ray finetune` on the study to load it safely")
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:
        raise LifelogError(f"{model_path}: the fine-tuned model is missing") from None
    if hashlib.sha256(data).hexdigest() != want:
        raise LifelogError(f"{model_path}: its SHA-256 differs from the one recorded when it was trained; "
                           f"refusing to load it")
    if not data.startswith(b"PK\x03\x04"):
        raise LifelogError(f"{model_path}: not a Keras zip archive (.keras); refusing to load it")
    return data


def run_dir_name(method: str, protocol: str) -> str:
    """finetune/<model>/<this>: the paper's protocol keeps the plain method name; the day protocol's runs sit apart."""
    return method if protocol == "image" else f"{method}__{protocol}"


@dataclass
class FinetuneRun:
    model: str
    method: str
    output: Path
    epochs: int
    best_epoch: int | None
    resumed_at: list[int]
    skipped: bool
    metrics: dict[str, float]
    protocol: str = "image"


def _signature(f: FinetuneConfig, model: str, method: str, manifest: pd.DataFrame) -> str:
    col = split_column(f)
    f = f.model_dump(mode="json")
    for k in ("models", "methods", "workers", "gpus_per_worker", "cpus_per_worker", "max_failures"):
        f.pop(k)  # how it runs, not what it learns
    ids = hashlib.sha1("\n".join(manifest["image_id"] + manifest[col]).encode()).hexdigest()
    return hashlib.sha1(json.dumps([model, method, f, ids], sort_keys=True).encode()).hexdigest()[:12]


def plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    from .plotting import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key in zip(axes, ("accuracy", "loss")):
        ax.plot(history["epoch"], history[key], marker="o", label="train")
        if f"val_{key}" in history:
            ax.plot(history["epoch"], history[f"val_{key}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes_atomic(buf.getvalue(), path)


KERAS3_FILE = "model_keras3.keras"  # the fine-tuned model for Keras 3 (`import keras`), beside tf-keras' model.keras


def export_keras3(model: Any, spec: BackboneSpec, method: str, n_classes: int, f: FinetuneConfig, dest: Path) -> None:
    """Rebuild a trained tf-keras method model in Keras 3 and copy its weights by layer and weight name.

    Keras 3's `load_model` cannot open tf-keras' `.keras` file (`Could not locate class 'Functional'`);
    this one it can. Inputs are preprocessed as for the tf-keras model
    (`keras.applications.<model>.preprocess_input`).
    """
    import keras  # Keras 3 by name: in a Ray Train worker `tf.keras` is tf-keras

    rebuilt = build_method_model(keras, spec, method, n_classes, None, f.m2_trainable_layers, f.m3_units)
    checkpoints.copy_weights(model, rebuilt)
    with tempfile.TemporaryDirectory() as d:
        rebuilt.save(str(Path(d) / KERAS3_FILE))
        storage.write_bytes_atomic((Path(d) / KERAS3_FILE).read_bytes(), dest)


@contextlib.contextmanager
def _epoch_progress(run_dir: str, options: dict | None, labels: list[str], epochs: int) -> Iterator[None]:
    """Report finished epochs while Ray Train runs: the controller names each registered checkpoint,
    with its epoch and its job's index, in the run's snapshot file (the driver has no other view into a
    running fit). ``labels``: the progress line of each job of the run."""
    snapshot = storage.to_path(run_dir, options) / "checkpoint_manager_snapshot.json"
    stop = threading.Event()

    def poll() -> None:
        last = None
        while True:
            try:
                metrics = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("metrics") or {}
                now = (int(metrics.get("job", 0)), int(metrics.get("epoch", 0)))
            except (OSError, ValueError):
                now = None  # not written yet, or caught mid-write
            if now is not None and now != last and now[0] < len(labels):
                last = now
                progress.report(labels[now[0]], min(now[1], epochs), epochs, "epochs")
            if stop.wait(1.0):
                return

    thread = threading.Thread(target=poll, name="epoch-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def refuse_old_checkpoints(run_dir: Path) -> None:
    """A run checkpointed before named checkpoints (format 1) is refused before it can resume by position."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return
    latest = (json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    if latest and (run_dir / latest / checkpoints.STATE).exists():
        checkpoints.check_format(checkpoints.read_state(run_dir / latest), str(run_dir))


UNUSED = "unused"  # the split value of train images a subset run leaves out


def finetune_one(cfg: StudyConfig, model: str, method: str, manifest: pd.DataFrame, classes: list[str],
                 weights: list[np.ndarray], train_ids: set[str] | None = None, seed: int | None = None,
                 out: Path | None = None, ray_dir: Path | None = None, light: bool = False) -> FinetuneRun:
    """One fine-tuning run (finetune_runs with one job): ``out`` is its folder."""
    return finetune_runs(cfg, [(model, method, weights)], manifest, classes, train_ids, seed,
                         [out] if out is not None else None, ray_dir, light)[0]


@dataclass
class _Job:
    index: int  # in the plan
    model: str
    method: str
    weights: list[np.ndarray]
    out: Path
    sig: str

    @property
    def key(self) -> str:
        return f"{self.model}-{self.method}-{self.sig}"


def _run_name(jobs: list[_Job]) -> str:
    """The Ray Train run's name, from every job of the plan (those already done too): a rerun of the same
    plan finds the same run and resumes it. One job keeps the name it always had."""
    if len(jobs) == 1:
        return jobs[0].key
    models = "+".join(dict.fromkeys(j.model for j in jobs))
    methods = "+".join(dict.fromkeys(j.method for j in jobs))
    return f"{models}-{methods}-{hashlib.sha1(' '.join(j.sig for j in jobs).encode()).hexdigest()[:12]}"


def finetune_runs(cfg: StudyConfig, plan: list[tuple[str, str, list[np.ndarray]]], manifest: pd.DataFrame,
                  classes: list[str], train_ids: set[str] | None = None, seed: int | None = None,
                  outs: list[Path] | None = None, ray_dir: Path | None = None, light: bool = False) -> list[FinetuneRun]:
    """Fine-tune each (model, method, weights) of ``plan``, all in one Ray Train run: one worker group, its
    TensorFlow and its data pipelines started once, the jobs trained one after another. A job whose
    metrics.json is current is skipped; an interrupted run resumes at the job in progress, from its last
    checkpoint, and the jobs it finished are not trained again. ``train_ids``: train on these images of the
    train split only (the data-availability curve); validation and test stay whole. ``seed`` replaces
    finetune.seed; ``outs`` and ``ray_dir`` the jobs' and the run's folders; ``light`` keeps the scores and
    the history, not the model files."""
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    from .tf_backend import TFConfig

    f = cfg.finetune if seed is None else cfg.finetune.model_copy(update={"seed": seed})
    study = cfg.study_dir
    col = split_column(f)
    if train_ids is not None:  # the left-out train images get a split of their own: no dataset reads them
        manifest = manifest.copy()
        manifest.loc[(manifest[col] == "train") & ~manifest["image_id"].astype(str).isin(train_ids), col] = UNUSED
    jobs = [_Job(i, model, method, w, (outs[i] if outs else None) or
                 study / "finetune" / model / run_dir_name(method, f.protocol), _signature(f, model, method, manifest))
            for i, (model, method, w) in enumerate(plan)]
    runs: dict[int, FinetuneRun] = {}
    for job in jobs:
        done = job.out / "metrics.json"
        if done.exists() and json.loads(done.read_text()).get("signature") == job.sig:
            m = json.loads(done.read_text())
            runs[job.index] = FinetuneRun(job.model, job.method, job.out, m["epochs"], m["best_epoch"], m["resumed_at"],
                                          True, m["scores"], f.protocol)
    todo = [j for j in jobs if j.index not in runs]
    if not todo:
        return [runs[j.index] for j in jobs]
    max_px, opts = cfg.extract.max_image_pixels, cfg.storage.options
    datasets = {
        s: image_dataset(manifest[manifest[col] == s], classes, f.image_size, max_px, f.batch_size, f.seed,
                         shuffle=(s == "train"), jpeg_draft=cfg.extract.jpeg_draft, options=opts)
        for s in SPLIT_NAMES
    }
    datasets[WHOLE_VAL] = image_dataset(manifest[manifest[col] == "val"], classes, f.image_size, max_px, f.batch_size,
                                        f.seed, shuffle=False, jpeg_draft=cfg.extract.jpeg_draft, options=opts)
    # Checkpoints live with the study: on a multi-node cluster that must be S3/GCS or a shared filesystem.
    name = _run_name(jobs)
    ray_dir = ray_dir or study / "finetune" / "_ray"
    refuse_old_checkpoints(ray_dir / name)
    ray_fs, ray_path = storage.arrow_filesystem(ray_dir)
    if ray_fs is None:
        ray_path = str(Path(ray_path).resolve())
    run_dir = str(ray_dir / name) if storage.is_remote(study) else str(Path(ray_path) / name)
    refs: dict[int, Any] = {}  # each distinct weight list once in the object store
    for j in todo:
        if id(j.weights) not in refs:
            refs[id(j.weights)] = ray.put(j.weights)
    # Weights travel as arrays; the spec only shapes the model (hence "none" here).
    specs = {j.index: BackboneSpec(j.model, ("fc2",), "none", f.image_size, f.seed, "float32") for j in todo}
    trainer = TensorflowTrainer(
        train_loop_per_worker, tensorflow_config=TFConfig(),
        train_loop_config={"finetune": f.model_dump(), "classes": classes,
                           "jobs": [{"key": j.key, "method": j.method, "spec": asdict(specs[j.index]),
                                     "weights": refs[id(j.weights)]} for j in todo],
                           "n_train": int((manifest[col] == "train").sum()), "n_val": int((manifest[col] == "val").sum()),
                           "fault_after_epoch": _fault_hook(), "run_dir": run_dir, "light": light,
                           "storage_options": cfg.storage.options},
        scaling_config=ray.train.ScalingConfig(
            num_workers=f.workers, use_gpu=f.gpus_per_worker > 0,
            resources_per_worker={"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if f.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=ray_path, storage_filesystem=ray_fs,
            failure_config=ray.train.FailureConfig(max_failures=f.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
    )
    worker = {"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if f.gpus_per_worker else {})}
    labels = [f"finetune {j.model}/{j.method}" for j in todo]
    with placement.reserve([worker] * f.workers, ", ".join(labels)), \
            _epoch_progress(run_dir, cfg.storage.options, labels, f.epochs):
        trainer.fit()
    for j in todo:
        results = storage.to_path(run_dir, opts) / RESULTS / j.key
        if not (results / checkpoints.STATE).exists():
            raise LifelogError(f"fine-tuning {j.model}/{j.method} ended without its results ({results})")
        with storage.local_copy(results) as d:
            runs[j.index] = _finish_job(cfg, f, j, specs[j.index], Path(d), manifest, classes, col, light)
    return [runs[j.index] for j in jobs]


def _finish_job(cfg: StudyConfig, f: FinetuneConfig, job: _Job, spec: BackboneSpec, d: Path, manifest: pd.DataFrame,
                classes: list[str], col: str, light: bool) -> FinetuneRun:
    """A trained job's results (``d``: its tested model, scores and state) -> the run's folder: the model and its
    Keras 3 export, history, curves, confusion, predictions, and metrics.json last (it marks the run complete)."""
    model, method, out = job.model, job.method, job.out
    state = json.loads((d / checkpoints.STATE).read_text())
    if not state.get("final"):
        raise LifelogError(f"fine-tuning {model}/{method} ended without its final results")
    data = (d / "model.keras").read_bytes()
    model_sha256 = hashlib.sha256(data).hexdigest()
    if not light:
        storage.write_bytes_atomic(data, out / "model.keras")
        if (d / KERAS3_FILE).exists():  # exported by the worker that trained it
            storage.write_bytes_atomic((d / KERAS3_FILE).read_bytes(), out / KERAS3_FILE)
        else:  # results a run of an earlier version wrote before it was interrupted
            trained = legacy_keras_module().models.load_model(str(d / "model.keras"), compile=False)
            export_keras3(trained, spec, method, len(classes), f, out / KERAS3_FILE)
            del trained
    del data
    with np.load(d / "test.npz", allow_pickle=False) as z:
        test = {k: z[k] for k in z.files}
    with np.load(d / "val.npz", allow_pickle=False) as z:
        val = {k: z[k] for k in z.files}
    sig, done = job.sig, out / "metrics.json"
    y_true, y_pred, ids = test["y_true"], test["y_pred"], test["image_id"]
    smoother, smoothed = smooth_on_validation(manifest, cfg.classify.temporal, cfg.classify.temporal_max_gap_s,
                                              val, test)
    history = pd.DataFrame(state["history"])
    storage.write_text_atomic(history.to_csv(index=False), out / "history.csv")
    if not light:
        plot_history(history, out / "learning_curves.png", f"{model} {method.upper()}")
    rep = full_report(y_true, y_pred, classes)
    cm = pd.DataFrame(rep["confusion"], index=classes, columns=classes)
    storage.write_text_atomic(cm.to_csv(index_label="true\\predicted"), out / "confusion.csv")
    storage.write_df_atomic(pd.DataFrame({"model": model, "method": method, "image_id": ids,
                                  "true": [classes[i] for i in y_true], "pred": [classes[i] for i in y_pred],
                                  "smoothed": [classes[i] for i in smoothed]}),
                    out / "predictions.parquet")
    times = manifest.assign(image_id=manifest["image_id"].astype(str)).set_index("image_id").reindex(ids.astype(str))
    frames = pd.DataFrame({"image_id": ids.astype(str), "day": times["day"].to_numpy(),
                           "timestamp": times["timestamp"].to_numpy(), "true": [classes[i] for i in y_true],
                           "pred": [classes[i] for i in y_pred], "smoothed": [classes[i] for i in smoothed]})
    gap = cfg.classify.temporal_max_gap_s  # the test split's events and time budgets, true against predicted
    scores_ = {**{k: rep[k] for k in METRIC_COLUMNS}, **summary_metrics(frames, "true", "pred", gap)}
    smoothed_rep = full_report(y_true, smoothed, classes)
    trained_on = sorted(manifest.loc[manifest[col] == "train", "image_id"].astype(str))
    meta = {"signature": sig, "epochs": state["epoch"], "best_epoch": state["best_epoch"],
            "n_train": len(trained_on), "train_ids_sha1": hashlib.sha1("\n".join(trained_on).encode()).hexdigest(),
            "protocol": f.protocol, "resumed_at": state["resumed_at"], "restores": state.get("restores", []), "scores": scores_, "report": rep, "classes": classes,
            "smoothing": smoother.describe() if smoother else "",
            "smoothed_scores": {**{k: smoothed_rep[k] for k in METRIC_COLUMNS},
                                **summary_metrics(frames, "true", "smoothed", gap)},
            "image_size": f.image_size, "preprocess": f"keras.applications.{model}.preprocess_input",
            # what predict rebuilds the model from (load_finetuned), and the file's hash it checks first
            "architecture": {"method": method, "m2_trainable_layers": f.m2_trainable_layers, "m3_units": f.m3_units},
            "model_sha256": model_sha256}
    write_resolved(cfg, out)
    storage.write_text_atomic(json.dumps(meta, indent=1), done)  # last: marks the run complete
    return FinetuneRun(model, method, out, state["epoch"], state["best_epoch"], state["resumed_at"], False, scores_,
                       f.protocol)


def table4(runs: list[FinetuneRun]) -> tuple[str, pd.DataFrame]:
    rows = [{"model": r.model, "method": r.method.upper(),
             **{k: round(100 * r.metrics[k], 2) for k in TABLE_METRICS}}
            for r in runs]
    df = pd.DataFrame(rows)
    protocols = sorted({r.protocol for r in runs} - {"image"})
    md = ["# Table 4: Approach 2 (fine-tuning), test split, percent (precision/recall/F1 macro)\n",
          *([f"Protocol: {', '.join(protocols)} (whole days per split).\n"] if protocols else []),
          "| Model | Method | Accuracy | Precision | Recall | F1-Score |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['method']} | {r['accuracy']:.2f} | {r['precision_macro']:.2f} | "
                  f"{r['recall_macro']:.2f} | {r['f1_macro']:.2f} |")
    return "\n".join(md) + "\n", df


@leased("finetune")
def run_finetune(cfg: StudyConfig) -> list[FinetuneRun]:
    from .runtime import ensure_ray

    study = cfg.study_dir
    f = cfg.finetune
    if not (study / "manifest.parquet").exists():
        raise LifelogError(f"{study}: no manifest.parquet; run `lifelog-ray manifest` first")
    manifest = storage.read_parquet(study / "manifest.parquet")
    if split_column(f) not in manifest:
        raise LifelogError(f"{study}/manifest.parquet has no {split_column(f)} column (built by an older version); "
                           f"rerun `lifelog-ray manifest` (the per-image splits are kept)")
    classes = sorted(manifest["label"].unique())
    # Resolve weights first (before Ray): one load per distinct spec, fail fast on a bad weights spec.
    cache: dict[tuple, Any] = {}
    plan = []
    for model in f.models:
        for method in f.methods:
            ws = weight_spec(f, model, method)
            key = (ws.model, ws.weights, ws.image_size)
            if key not in cache:
                cache[key] = resolve_weights(ws)
            plan.append((model, method, cache[key]))
    ensure_ray(cfg.ray)
    # Judged on what the cluster can become: Ray Train's placement group makes the autoscaler add the nodes.
    shape = placement.discover()
    worker = {"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if f.gpus_per_worker else {})}
    placement.check_capacity(shape, worker, f.workers, "finetune", spare_cpus=0.5)
    log.info("finetune: %d worker(s) of %s on the %s", f.workers, worker, shape.describe())
    runs = finetune_runs(cfg, plan, manifest, classes)  # every model and method in one Ray Train run
    md, df = table4(runs)
    storage.write_text_atomic(md, study / "finetune" / "table4.md")
    storage.write_text_atomic(df.to_csv(index=False), study / "finetune" / "table4.csv")
    storage.write_df_atomic(pd.DataFrame([{"protocol": r.protocol, "model": r.model, "method": r.method, **r.metrics, "epochs": r.epochs,
                                   "best_epoch": r.best_epoch} for r in runs]),
                    study / "finetune" / "results.parquet")
    return runs
