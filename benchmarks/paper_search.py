"""Ray Tune against scikit-learn's GridSearchCV on one layer at the paper's size (issue 29).

    .venv/bin/python benchmarks/paper_search.py                               # 19,527 x 4,096 (fc1), 3 grids
    .venv/bin/python benchmarks/paper_search.py --images 3000 --classifiers naive_bayes   # a quick look

The data cannot be downloaded here, so the features are synthetic, shaped as VGG19's `fc1` on the paper's
19,527 images: 4,096 wide, non-negative (fc1 follows a ReLU), 10 classes, the 60/20/20 split, written as
extraction writes them (one Parquet file per 512-image unit). Uniform noise would need ~4,000 components for 95 %
of its variance; deep features are far more compressible, so each row is 256 latent factors of decaying scale
(its class's mean plus a per-image draw) mapped to 4,096 ReLU units. (On 4,000 rows PCA 0.95 keeps ~430
components and Naive Bayes scores ~0.9; these settings are chosen, not measured on LSC features.)

Steps, timed on this machine, in this process (the driver) and its Ray:
1. `load_feature_set(..., pca=0.95)`: what classify's `_prepare_set` task runs (read, PCA fit, reduce);
2. for each classifier, the bundled paper grid (`lifelog_ray/resources/search_space.yaml`) on the reduced set:
   `GridSearchCV(n_jobs=-1, PredefinedSplit)` (fit on train, score on validation, no refit: what a Tune trial
   does), then `run_search` (what classify runs: one Tune trial per point, 1 CPU each, the set in Ray's object
   store, on a local Ray of every CPU here). Both score the same fits; the best parameters are compared.
SVM's and Random Forest's paper grids are left out by default (`--classifiers` adds them): on 2 cores they run for
hours (SVM's linear kernel at C=100 on 11,700 rows) and about half an hour per search (300 unpruned trees).
Writes benchmarks/results/paper_search.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTH = 4_096  # VGG19 fc1


def write_structured_set(study: Path, images: int, width: int, latent: int = 256, unit: int = 512,
                         seed: int = 0) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    scale = (np.arange(1, latent + 1) ** -0.75).astype(np.float32)  # variance falling as 1/j^1.5
    means = rng.standard_normal((10, latent)).astype(np.float32) * scale * 0.25  # classes that overlap
    mix = rng.standard_normal((latent, width)).astype(np.float32) / np.sqrt(latent)
    out = study / "features" / "vgg19" / "fc1"
    out.mkdir(parents=True, exist_ok=True)
    splits = np.array(["train"] * 60 + ["val"] * 20 + ["test"] * 20)
    for start in range(0, images, unit):
        n = min(unit, images - start)
        idx = np.arange(start, start + n)
        z = means[idx % 10] + rng.standard_normal((n, latent)).astype(np.float32) * scale
        x = np.maximum(z @ mix, 0).astype(np.float32)
        pq.write_table(pa.table({
            "image_id": pa.array([f"img{i:07d}" for i in idx], pa.string()),
            "label": pa.array([f"class{i % 10}" for i in idx], pa.string()),
            "split": pa.array(splits[(idx * 7919) % 100].tolist(), pa.string()),  # every class in every split
            "day": pa.array(["2016-08-15"] * n, pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(x.reshape(-1), width),
        }), out / f"unit{start // unit:05d}.parquet")
    return images * width * 4


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=19_527)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--classifiers", default="naive_bayes,bayesian_ridge,xgboost")
    ap.add_argument("--pca", type=float, default=0.95)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_search.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import numpy as np
    import ray
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    from lifelog_ray.classify.data import load_feature_set
    from lifelog_ray.classify.estimators import load_search_space
    from lifelog_ray.classify.search import run_search

    names = args.classifiers.split(",")
    specs = load_search_space(ROOT / "lifelog_ray" / "resources" / "search_space.yaml", names)
    res: dict = {"images": args.images, "width": args.width, "pca": args.pca, "cpus": os.cpu_count(),
                 "classifiers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        t0 = time.perf_counter()
        raw = write_structured_set(study, args.images, args.width)
        res["write_s"] = round(time.perf_counter() - t0, 1)
        res["raw_mb"] = round(raw / 2**20, 1)
        print(f"wrote {args.images} x {args.width} ({raw / 2**20:.0f} MB raw) in {res['write_s']} s", flush=True)
        before = peak_mb()
        t0 = time.perf_counter()
        fs = load_feature_set(study, "vgg19", "fc1", args.pca)
        res["load_and_pca_s"] = round(time.perf_counter() - t0, 1)
        res["load_and_pca_peak_mb"] = round(max(peak_mb() - before, 0), 1)
        res["components"] = fs.n_components
        res["rows"] = {s: int(len(v)) for s, v in fs.X.items()}
        print(f"read and PCA {args.pca}: {res['load_and_pca_s']} s, {fs.n_components} components, rows {res['rows']}",
              flush=True)
    X = np.concatenate([fs.X["train"], fs.X["val"]])
    y = np.concatenate([fs.y["train"], fs.y["val"]])
    fold = np.r_[np.full(len(fs.X["train"]), -1), np.zeros(len(fs.X["val"]))]
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    ref = ray.put(fs)
    for s in specs:
        t0 = time.perf_counter()
        gs = GridSearchCV(s.build({}, seed=0, n_jobs=1), {k: list(v) for k, v in s.grid.items()}, scoring="f1_macro",
                          cv=PredefinedSplit(fold), refit=False, n_jobs=-1)
        gs.fit(X, y)
        gs_s = time.perf_counter() - t0
        points = [{"set": "fc1", "point": f"{s.name}/{i}", "params": p, "spec": s.__dict__, "seed": 0, "n_jobs": 1}
                  for i, p in enumerate(s.points())]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tune_dir:
            recs = run_search({"fc1": ref}, points, Path(tune_dir), 1.0, name=s.name)
        tune_s = time.perf_counter() - t0
        by_point = {r["point"]: r for r in recs}
        scored = [(by_point[f"{s.name}/{i}"].get("val_f1_macro", -1), -i, p) for i, p in enumerate(s.points())]
        tune_best = max(scored, key=lambda t: (t[0], t[1]))[2]
        row = {"points": len(points), "gridsearchcv_s": round(gs_s, 1), "tune_s": round(tune_s, 1),
               "ratio_tune_over_gridsearchcv": round(tune_s / gs_s, 2),
               "mean_fit_s": round(float(np.mean([r.get("fit_s", 0) for r in recs])), 2),
               "errors": sum(r["status"] != "ok" for r in recs),
               "same_best_params": json.dumps(tune_best, sort_keys=True, default=str)
               == json.dumps(gs.best_params_, sort_keys=True, default=str),
               "best_val_f1_macro": round(float(max(t[0] for t in scored)), 4)}
        res["classifiers"][s.name] = row
        print(s.name, row, flush=True)
    ray.shutdown()
    total_gs = sum(r["gridsearchcv_s"] for r in res["classifiers"].values())
    total_tune = sum(r["tune_s"] for r in res["classifiers"].values())
    res["total"] = {"gridsearchcv_s": round(total_gs, 1), "tune_s": round(total_tune, 1),
                    "ratio_tune_over_gridsearchcv": round(total_tune / total_gs, 2)}
    res["driver_peak_rss_mb"] = round(peak_mb(), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res["total"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
