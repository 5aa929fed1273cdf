"""The grid search as one Ray Tune run: a trial per (model, layer, classifier, grid point), data placed once."""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .. import progress
from ..metrics import scores
from .data import FeatureSet
from .estimators import ClassifierSpec

log = logging.getLogger(__name__)


def evaluate_point(fs: FeatureSet, spec: ClassifierSpec, params: dict[str, Any], seed: int, n_jobs: int) -> dict:
    """Fit on train, score on validation: one grid point, the unit of work of the search."""
    t0 = time.perf_counter()
    est = spec.build(params, seed=seed, n_jobs=n_jobs)
    est.fit(fs.X["train"], fs.y["train"])
    pred = est.predict(fs.X["val"])
    out = {f"val_{k}": v for k, v in scores(fs.y["val"], np.asarray(pred)).items()}
    out["fit_s"] = time.perf_counter() - t0
    return out


def _trial(config: dict, sets: dict[str, Any]) -> None:
    """One grid point. ``sets``: each feature set, or the reference to it in Ray's object store (classify's: a
    trial then fetches its own set only, from the worker that prepared it, never every set)."""
    import ray
    from ray import tune

    t = config["trial"]
    spec = ClassifierSpec(**t["spec"])
    fs = sets[t["set"]]
    if isinstance(fs, ray.ObjectRef):
        fs = ray.get(fs)
    tune.report(evaluate_point(fs, spec, t["params"], t["seed"], t["n_jobs"]))


def run_search(
    sets: dict[str, Any], points: list[dict], storage: Path, cpus_per_trial: float, name: str = "search"
) -> list[dict]:
    """Run every point as a Tune trial; return one record per point (metrics, or the error and status).
    ``sets``: feature sets (FeatureSet) or references to them (ray.ObjectRef) by name."""
    from ray import tune

    if not points:
        return []
    trainable = tune.with_resources(tune.with_parameters(_trial, sets=sets), {"cpu": cpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(points)},
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage.resolve()), verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),  # a failing grid point fails alone
            callbacks=[progress.tune_callback("classify", len(points))],
        ),
    )
    results = tuner.fit()
    records = []
    for r in results:
        t = r.config["trial"]
        rec = {"point": t["point"], "status": "ok", "error": ""}
        if r.error is not None:
            rec["status"] = "error"
            err = r.error
            rec["error"] = "".join(traceback.format_exception_only(type(err), err)).strip()[-2000:]
        else:
            rec.update({k: v for k, v in (r.metrics or {}).items() if k.startswith("val_") or k == "fit_s"})
        records.append(rec)
    return records
