"""Approach 2: fine-tune VGG (M1 / M2 / M3) with Ray Train's TensorflowTrainer, images streamed by Ray Data.

M1: new softmax prediction layer, only it trains.  M2: new prediction layer, the last N layers train
(N = 8 in the paper: block5_conv2..4, pool, flatten, fc1, fc2, predictions).  M3: the dense top is
replaced by Dense(ReLU) + softmax on the frozen convolutional base, only the new top trains.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import storage
from .backbones import BackboneSpec, _build_base, legacy_keras_module, preprocess, resolve_weights
from .config import FinetuneConfig, StudyConfig, write_resolved
from .errors import LifelogError
from .images import decode_batch
from .io import atomic_write_df, atomic_write_text
from .metrics import full_report

log = logging.getLogger(__name__)

HEAD = "predictions_lifelog"
FAULT_ENV = "LIFELOG_RAY_FAULT_AFTER_EPOCH"  # test hook: a worker raises after this epoch's checkpoint


def needs_full_input(method: str) -> bool:
    """M1/M2 keep fc1/fc2, whose shapes fix the input size; M3 keeps only the convolutional base."""
    return method in ("m1", "m2")


def build_method_model(keras, spec: BackboneSpec, method: str, n_classes: int, weights: list[np.ndarray] | None,
                       m2_trainable_layers: int = 8, m3_units: int = 1024):
    """The method's model with exactly the layers it trains left trainable."""
    if needs_full_input(method):
        base = _build_base(keras, spec, None)
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
    app = {"vgg19": keras.applications.VGG19, "vgg16": keras.applications.VGG16}[spec.model]
    conv = app(include_top=False, weights=None, input_shape=(spec.image_size, spec.image_size, 3))
    if weights is not None:
        conv.set_weights(weights[: len(conv.get_weights())])  # the conv part leads the full weight list
    conv.trainable = False
    x = keras.layers.Flatten(name="flatten_lifelog")(conv.output)
    x = keras.layers.Dense(m3_units, activation="relu", name="fc_lifelog")(x)
    out = keras.layers.Dense(n_classes, activation="softmax", name=HEAD)(x)
    return keras.Model(conv.inputs, out, name=f"{spec.model}_m3")


def _weight_spec(f: FinetuneConfig, model: str, method: str) -> BackboneSpec:
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
                  shuffle: bool, options: dict | None = None):
    """Manifest rows -> a streaming Ray Dataset of (image uint8, label int), decoded like extraction."""
    import ray

    rows = rows[["image_id", "path", "label"]].astype(str).copy()
    rows["label_idx"] = rows["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    if shuffle:
        rows = rows.sample(frac=1.0, random_state=seed)
    step = 4 * batch
    ds = ray.data.from_pandas([rows.iloc[i: i + step] for i in range(0, len(rows), step)])
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": size, "max_pixels": max_pixels, "options": options},
                        batch_size=batch,
                        num_cpus=0.5, batch_format="numpy")
    return ds.map_batches(_keep_decoded, batch_format="numpy", batch_size=batch)


def _to_tf(shard, keras, model_name: str, batch: int, shuffle_seed: int | None):
    import tensorflow as tf

    ds = shard.to_tf(feature_columns="image", label_columns="label", batch_size=batch,
                     local_shuffle_buffer_size=4 * batch if shuffle_seed is not None else None,
                     local_shuffle_seed=shuffle_seed)
    ds = ds.map(lambda x, y: (preprocess(keras, model_name, tf.cast(x, tf.float32)), y))
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF  # Ray shards
    return ds.with_options(opts)


def _inject_fault(epoch: int) -> None:
    """Test hook: crash the worker early in epoch ``epoch + 1``, as a lost node would.

    The controller registers a checkpoint only once it has polled every rank's report
    (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), so a crash right after ``report``
    can beat the registration and lose the checkpoint, which no real crash mid-epoch
    does. Waiting three poll intervals first makes the hook test resumption, not that race.
    """
    time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
    raise RuntimeError(f"injected fault in epoch {epoch + 1}, after epoch {epoch}'s checkpoint ({FAULT_ENV})")


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker (tf-keras, MultiWorkerMirroredStrategy)."""
    import ray
    import ray.train
    import tensorflow as tf
    from ray.train import Checkpoint

    keras = legacy_keras_module()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    f = FinetuneConfig(**config["finetune"])
    spec = BackboneSpec(**config["spec"])
    method, classes = config["method"], config["classes"]
    weights = config["weights"]
    if weights is not None and type(weights).__name__ == "ObjectRef":
        weights = ray.get(weights)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_method_model(keras, spec, method, len(classes), weights, f.m2_trainable_layers, f.m3_units)
        opt = (keras.optimizers.SGD(learning_rate=f.learning_rate, momentum=f.momentum) if f.optimizer == "sgd"
               else keras.optimizers.Adam(learning_rate=f.learning_rate))
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    monitor = f.early_stopping_metric
    lower_is_better = "loss" in monitor
    state = {"epoch": 0, "history": [], "best": None, "best_epoch": None, "wait": 0, "stopped": False,
             "resumed_at": []}
    work = Path(tempfile.mkdtemp(prefix="lifelog-ft-"))
    best_file = work / "best.weights.h5"
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            model.load_weights(str(Path(d) / "latest.weights.h5"))
            state = json.loads((Path(d) / "state.json").read_text())
            if (Path(d) / "best.weights.h5").exists():
                shutil.copy(Path(d) / "best.weights.h5", best_file)
        state["resumed_at"].append(state["epoch"])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(state["epoch"], f.epochs):
        if state["stopped"]:
            break
        if config.get("fault_after_epoch") == epoch and not state["resumed_at"]:
            _inject_fault(epoch)
        t0 = time.perf_counter()
        train_tf = _to_tf(train_shard, keras, spec.model, f.batch_size, f.seed + epoch)
        val_tf = _to_tf(val_shard, keras, spec.model, f.batch_size, None)
        h = model.fit(train_tf, validation_data=val_tf, epochs=1, verbose=0)
        secs = time.perf_counter() - t0
        m = {k: float(v[-1]) for k, v in h.history.items()}
        n_seen = config["n_train"] / ctx.get_world_size()
        m.update({"epoch": epoch + 1, "epoch_s": secs, "images_per_s_per_worker": n_seen / secs})
        value = m.get(monitor)
        improved = value is not None and (state["best"] is None or
                                          (value < state["best"] if lower_is_better else value > state["best"]))
        if improved:
            state.update(best=value, best_epoch=epoch + 1, wait=0)
            model.save_weights(str(best_file))
        else:
            state["wait"] += 1
            state["stopped"] = state["wait"] >= f.patience  # a good fit: stop, keep the best epoch
        state["epoch"] = epoch + 1
        state["history"].append(m)
        with tempfile.TemporaryDirectory() as d:
            model.save_weights(str(Path(d) / "latest.weights.h5"))
            if best_file.exists():
                shutil.copy(best_file, Path(d) / "best.weights.h5")
            (Path(d) / "state.json").write_text(json.dumps(state))
            ray.train.report(m, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
    if rank != 0:
        # ray.train.report is a barrier across the group: every rank reports, rank 0 with the results.
        ray.train.report({"final": 1.0}, checkpoint=None)
        return
    # Test once, with the best epoch's weights, on a plain (non-distributed) copy of the model.
    plain = build_method_model(keras, spec, method, len(classes), None, f.m2_trainable_layers, f.m3_units)
    if best_file.exists():
        plain.load_weights(str(best_file))  # the best epoch, never assigned into the distributed model
    else:
        plain.set_weights(model.get_weights())
    y_true, y_pred, ids = [], [], []
    for b in ray.train.get_dataset_shard("test").iter_batches(batch_size=f.batch_size, batch_format="numpy"):
        x = preprocess(keras, spec.model, tf.cast(b["image"], tf.float32))
        y_pred.append(np.argmax(plain.predict_on_batch(x), axis=1))
        y_true.append(b["label"])
        ids.append(b["image_id"])
    with tempfile.TemporaryDirectory() as d:
        plain.save(str(Path(d) / "model.keras"))
        np.savez(Path(d) / "test.npz", y_true=np.concatenate(y_true), y_pred=np.concatenate(y_pred),
                 image_id=np.concatenate(ids).astype(str))
        (Path(d) / "state.json").write_text(json.dumps({**state, "final": True}))
        ray.train.report({"final": 1.0}, checkpoint=Checkpoint.from_directory(d))


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


def _signature(cfg: StudyConfig, model: str, method: str, manifest: pd.DataFrame) -> str:
    f = cfg.finetune.model_dump(mode="json")
    for k in ("models", "methods", "workers", "gpus_per_worker", "cpus_per_worker", "max_failures"):
        f.pop(k)  # how it runs, not what it learns
    ids = hashlib.sha1("\n".join(manifest["image_id"] + manifest["split"]).encode()).hexdigest()
    return hashlib.sha1(json.dumps([model, method, f, ids], sort_keys=True).encode()).hexdigest()[:12]


def plot_history(history: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def finetune_one(cfg: StudyConfig, model: str, method: str, manifest: pd.DataFrame, classes: list[str],
                 weights: list[np.ndarray]) -> FinetuneRun:
    import ray
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    f = cfg.finetune
    study = cfg.study_dir
    out = study / "finetune" / model / method
    sig = _signature(cfg, model, method, manifest)
    done = out / "metrics.json"
    if done.exists() and json.loads(done.read_text()).get("signature") == sig:
        m = json.loads(done.read_text())
        return FinetuneRun(model, method, out, m["epochs"], m["best_epoch"], m["resumed_at"], True, m["scores"])
    # Weights travel as arrays; the spec only shapes the model (hence "none" here).
    spec = BackboneSpec(model, ("fc2",), "none", f.image_size, f.seed, "float32")
    max_px, opts = cfg.extract.max_image_pixels, cfg.storage.options
    datasets = {
        s: image_dataset(manifest[manifest["split"] == s], classes, f.image_size, max_px, f.batch_size, f.seed,
                         shuffle=(s == "train"), options=opts)
        for s in ("train", "val", "test")
    }
    # Checkpoints live with the study: on a multi-node cluster that must be S3/GCS or a shared filesystem.
    ray_fs, ray_path = storage.arrow_filesystem(study / "finetune" / "_ray")
    if ray_fs is None:
        ray_path = str(Path(ray_path).resolve())
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={"finetune": f.model_dump(), "spec": asdict(spec), "method": method, "classes": classes,
                           "weights": ray.put(weights), "n_train": int((manifest["split"] == "train").sum()),
                           "fault_after_epoch": int(os.environ[FAULT_ENV]) if os.environ.get(FAULT_ENV) else None},
        scaling_config=ray.train.ScalingConfig(
            num_workers=f.workers, use_gpu=f.gpus_per_worker > 0,
            resources_per_worker={"CPU": f.cpus_per_worker, **({"GPU": f.gpus_per_worker} if f.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=f"{model}-{method}-{sig}", storage_path=ray_path, storage_filesystem=ray_fs,
            failure_config=ray.train.FailureConfig(max_failures=f.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train", "val"]),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / "state.json").read_text())
        if not state.get("final"):
            raise LifelogError(f"fine-tuning {model}/{method} ended without its final checkpoint")
        storage.write_bytes_atomic((d / "model.keras").read_bytes(), out / "model.keras")
        with np.load(d / "test.npz", allow_pickle=False) as z:
            y_true, y_pred, ids = z["y_true"], z["y_pred"], z["image_id"]
    history = pd.DataFrame(state["history"])
    atomic_write_text(history.to_csv(index=False), out / "history.csv")
    plot_history(history, out / "learning_curves.png", f"{model} {method.upper()}")
    rep = full_report(y_true, y_pred, classes)
    cm = pd.DataFrame(rep["confusion"], index=classes, columns=classes)
    atomic_write_text(cm.to_csv(index_label="true\\predicted"), out / "confusion.csv")
    atomic_write_df(pd.DataFrame({"model": model, "method": method, "image_id": ids,
                                  "true": [classes[i] for i in y_true], "pred": [classes[i] for i in y_pred]}),
                    out / "predictions.parquet")
    keys = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted", "recall_weighted",
            "f1_weighted")
    scores_ = {k: rep[k] for k in keys}
    meta = {"signature": sig, "epochs": state["epoch"], "best_epoch": state["best_epoch"],
            "resumed_at": state["resumed_at"], "scores": scores_, "report": rep, "classes": classes,
            "image_size": f.image_size, "preprocess": f"keras.applications.{model}.preprocess_input"}
    write_resolved(cfg, out)
    atomic_write_text(json.dumps(meta, indent=1), done)  # last: marks the run complete
    return FinetuneRun(model, method, out, state["epoch"], state["best_epoch"], state["resumed_at"], False, scores_)


def table4(runs: list[FinetuneRun]) -> tuple[str, pd.DataFrame]:
    rows = [{"model": r.model, "method": r.method.upper(),
             **{k: round(100 * r.metrics[k], 2) for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}}
            for r in runs]
    df = pd.DataFrame(rows)
    md = ["# Table 4: Approach 2 (fine-tuning), test split, percent (precision/recall/F1 macro)\n",
          "| Model | Method | Accuracy | Precision | Recall | F1-Score |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['method']} | {r['accuracy']:.2f} | {r['precision_macro']:.2f} | "
                  f"{r['recall_macro']:.2f} | {r['f1_macro']:.2f} |")
    return "\n".join(md) + "\n", df


def run_finetune(cfg: StudyConfig) -> list[FinetuneRun]:
    from .runtime import ensure_ray

    study = cfg.study_dir
    f = cfg.finetune
    if not (study / "manifest.parquet").exists():
        raise LifelogError(f"{study}: no manifest.parquet; run `lifelog-ray manifest` first")
    manifest = storage.read_parquet(study / "manifest.parquet")
    classes = sorted(manifest["label"].unique())
    # Resolve weights first (before Ray): one load per distinct spec, fail fast on a bad weights spec.
    cache: dict[tuple, Any] = {}
    plan = []
    for model in f.models:
        for method in f.methods:
            ws = _weight_spec(f, model, method)
            key = (ws.model, ws.weights, ws.image_size)
            if key not in cache:
                cache[key] = resolve_weights(ws)
            plan.append((model, method, cache[key]))
    ensure_ray(cfg.ray)
    from .runtime import cluster_resources

    cpus, _ = cluster_resources()
    if f.workers * f.cpus_per_worker > cpus - 0.5:
        raise LifelogError(
            f"finetune: {f.workers} worker(s) x {f.cpus_per_worker} CPU leave no CPU for decoding images on a "
            f"cluster of {cpus:g} CPUs; lower finetune.cpus_per_worker or finetune.workers")
    runs = [finetune_one(cfg, model, method, manifest, classes, w) for model, method, w in plan]
    md, df = table4(runs)
    atomic_write_text(md, study / "finetune" / "table4.md")
    atomic_write_text(df.to_csv(index=False), study / "finetune" / "table4.csv")
    atomic_write_df(pd.DataFrame([{"model": r.model, "method": r.method, **r.metrics, "epochs": r.epochs,
                                   "best_epoch": r.best_epoch} for r in runs]),
                    study / "finetune" / "results.parquet")
    return runs
