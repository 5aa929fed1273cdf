"""Classifier-search benchmark: the same grid through Ray Tune vs GridSearchCV(n_jobs=-1, PredefinedSplit).

    .venv/bin/python benchmarks/classify.py            # digits as features (1797 x 64), paper-style grids

Prints the wall-time ratio (Tune / GridSearchCV), whether the best parameters are identical, and how the
Tune search's wall time changes with the CPUs Ray may use (each count in its own Ray instance).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, PredefinedSplit, train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRID = {
    "svm": {"estimator": "sklearn.svm.SVC", "grid": {"C": [0.1, 1, 10, 100], "gamma": ["scale", 0.001],
                                                      "kernel": ["rbf", "linear"]}},
    "random_forest": {"estimator": "sklearn.ensemble.RandomForestClassifier",
                      "grid": {"n_estimators": [50, 100], "max_depth": [None, 10], "criterion": ["gini", "entropy"]}},
    "xgboost": {"estimator": "xgboost.XGBClassifier", "fixed": {"tree_method": "hist"},
                "grid": {"max_depth": [3, 6], "n_estimators": [50], "learning_rate": [0.1, 0.3]}},
}


def data():
    X, y = load_digits(return_X_y=True)
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=0)
    va, _ = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    return X.astype(np.float32), y, np.sort(tr), np.sort(va)


def tune_search(cpus: int, grid_path: Path) -> dict:
    """Run in a fresh process so each CPU count gets its own Ray instance."""
    import ray

    from lifelog_ray.classify.data import FeatureSet
    from lifelog_ray.classify.estimators import load_search_space
    from lifelog_ray.classify.search import run_search

    X, y, tr, va = data()
    fs = FeatureSet("digits", "pixels", [str(i) for i in range(10)], {"train": X[tr], "val": X[va], "test": X[:0]},
                    {"train": y[tr], "val": y[va], "test": y[:0]}, {}, 64, None)
    specs = load_search_space(grid_path, list(GRID))
    points = [{"set": "d", "point": f"{s.name}/{i}", "params": p, "spec": s.__dict__, "seed": 0, "n_jobs": 1}
              for s in specs for i, p in enumerate(s.points())]
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import tempfile

    t0 = time.perf_counter()
    recs = run_search({"d": fs}, points, Path(tempfile.mkdtemp()), 1.0)
    secs = time.perf_counter() - t0
    ray.shutdown()
    best = {}
    by_point = {r["point"]: r for r in recs}
    for s in specs:
        scored = [(by_point[f"{s.name}/{i}"]["val_f1_macro"], -i, p) for i, p in enumerate(s.points())]
        best[s.name] = max(scored, key=lambda t: (t[0], t[1]))[2]
    return {"seconds": secs, "best": best, "trials": len(points)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpus", default="1,2")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/out/classify.json")
    args = ap.parse_args()
    grid_path = Path(args.out).parent / "classify_grid.yaml"
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    grid_path.write_text(yaml.safe_dump(GRID))
    if args.worker:
        print(json.dumps(tune_search(args.worker, grid_path), default=str))
        return 0
    from lifelog_ray.classify.estimators import load_search_space

    X, y, tr, va = data()
    idx = np.concatenate([tr, va])
    fold = np.r_[np.full(len(tr), -1), np.zeros(len(va))]
    t0 = time.perf_counter()
    gs_best = {}
    for s in load_search_space(grid_path, list(GRID)):
        gs = GridSearchCV(s.build({}, seed=0, n_jobs=1), {k: list(v) for k, v in s.grid.items()}, scoring="f1_macro",
                          cv=PredefinedSplit(fold), refit=False, n_jobs=-1)
        gs.fit(X[idx], y[idx])
        gs_best[s.name] = gs.best_params_
    gs_secs = time.perf_counter() - t0
    res = {"gridsearchcv_s": gs_secs, "tune": {}}
    for c in [int(x) for x in args.cpus.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--worker", str(c), "--out", args.out],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        res["tune"][c] = {"seconds": r["seconds"], "trials": r["trials"],
                          "same_best_params": json.dumps(r["best"], sort_keys=True, default=str)
                          == json.dumps(gs_best, sort_keys=True, default=str)}
    top = max(res["tune"])
    res["ratio_tune_over_gridsearchcv"] = res["tune"][top]["seconds"] / gs_secs
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
