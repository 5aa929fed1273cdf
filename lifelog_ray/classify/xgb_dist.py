"""Distributed XGBoost with Ray Train's XGBoostTrainer (xgboost_ray is unmaintained and breaks on XGBoost >= 2.1)."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

import numpy as np
import pandas as pd

from .. import placement

log = logging.getLogger(__name__)


MODEL_FILE = "model.ubj"


def _train_loop(config: dict) -> None:
    import os

    import ray.train
    import xgboost

    shard = ray.train.get_dataset_shard("train").materialize().to_pandas()
    X = np.stack(shard["features"].to_numpy()).astype(np.float32)
    dtrain = xgboost.DMatrix(X, label=shard["label"].to_numpy())
    booster = xgboost.train(config["params"], dtrain, num_boost_round=config["rounds"])
    # One report, at the end. A Ray Train report is a barrier across the workers and the controller (~2 s
    # here), and RayTrainReportCallback reports after every round even with checkpoints off: 100 rounds
    # took minutes. Rank 0 holds the model (every rank has the same one after the allreduce).
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            booster.save_model(os.path.join(d, MODEL_FILE))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({"rounds": booster.num_boosted_rounds()}, checkpoint=checkpoint)


def xgb_params(params: dict[str, Any], n_classes: int, seed: int, fixed: dict[str, Any] | None = None) -> tuple[dict, int]:
    """XGBClassifier-style grid params -> native xgboost.train params and the number of rounds."""
    p = {**(fixed or {}), **params}
    rounds = int(p.pop("n_estimators", 100))
    native = {"objective": "multi:softprob", "num_class": n_classes, "seed": seed,
              "tree_method": p.pop("tree_method", "hist"), "eval_metric": "mlogloss"}
    if "learning_rate" in p:
        native["eta"] = p.pop("learning_rate")
    native.update(p)
    return native, rounds


def fit_distributed(X: np.ndarray, y: np.ndarray, params: dict[str, Any], n_classes: int, workers: int,
                    seed: int = 0, fixed: dict[str, Any] | None = None, cpus_per_worker: float = 1):
    """Train one booster data-parallel over `workers` Ray Train workers; return the xgboost.Booster."""
    import ray.data
    import ray.train
    from ray.train.xgboost import XGBoostTrainer

    native, rounds = xgb_params(params, n_classes, seed, fixed)
    df = pd.DataFrame({"features": list(X.astype(np.float32)), "label": y.astype(np.int32)})
    ds = ray.data.from_pandas(df)
    with tempfile.TemporaryDirectory(prefix="lifelog-xgb-") as tmp:
        trainer = XGBoostTrainer(
            _train_loop,
            train_loop_config={"params": native, "rounds": rounds},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=ray.train.RunConfig(storage_path=tmp, name="xgb"),
            datasets={"train": ds},
        )
        with placement.reserve([{"CPU": cpus_per_worker}] * workers, "distributed xgboost"):
            result = trainer.fit()
        import xgboost

        booster = xgboost.Booster()
        with result.checkpoint.as_directory() as d:
            booster.load_model(f"{d}/{MODEL_FILE}")
    return booster


def booster_proba(booster, X: np.ndarray) -> np.ndarray:
    """Class probabilities (softprob) of a multi-class booster; a binary one gives one column."""
    import xgboost

    prob = np.asarray(booster.predict(xgboost.DMatrix(X.astype(np.float32))), dtype=np.float64)
    return prob if prob.ndim == 2 else np.column_stack([1 - prob, prob])


def predict_booster(booster, X: np.ndarray) -> np.ndarray:
    import xgboost

    prob = booster.predict(xgboost.DMatrix(X.astype(np.float32)))
    return np.argmax(prob, axis=1) if prob.ndim == 2 else prob.astype(int)
