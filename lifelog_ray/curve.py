"""Beyond the paper: the data-availability curve.

The best Approach-1 pipeline trained on growing stratified fractions of the train split, several seeds,
scored on the fixed test split, one Ray Tune trial per (fraction, seed). It writes data only (`curve/`);
the report renders it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import progress, storage
from .classify.data import load_feature_set
from .classify.estimators import fit_pca_classifier, load_search_space
from .config import StudyConfig
from .errors import LifelogError
from .lease import leased
from .metrics import scores
from .results import Choice, best_approach1


def _curve_trial(config: dict, data: dict) -> None:
    from ray import tune

    t = config["trial"]
    X, y, Xte, yte = data["X"], data["y"], data["Xte"], data["yte"]
    rng = np.random.default_rng([t["seed"], int(t["fraction"] * 1000)])
    idx = []
    for c in np.unique(y):  # stratified: each category keeps its share, at least one image
        members = np.flatnonzero(y == c)
        k = max(1, int(round(t["fraction"] * len(members))))
        idx.extend(rng.choice(members, size=k, replace=False))
    idx = np.sort(np.asarray(idx))
    project, est = fit_pca_classifier(X[idx], y[idx], data["spec"], data["params"], t["seed"], data["pca"])
    s = scores(yte, est.predict(project(Xte)))
    tune.report({"n_train": len(idx), "accuracy": s["accuracy"], "f1_macro": s["f1_macro"]})


@leased("curve")
def run_curve(cfg: StudyConfig, fractions: list[float], seeds: int = 3) -> pd.DataFrame:
    from ray import tune

    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise LifelogError(f"curve: fractions must lie in (0, 1]; got {fractions}")
    if seeds < 1:
        raise LifelogError(f"curve: --seeds must be at least 1; got {seeds}")
    from .runtime import ensure_ray

    study = cfg.study_dir
    ch = best_approach1(study)
    spec = load_search_space(cfg.classify.search_space, [ch.classifier])[0]
    fs = load_feature_set(study, ch.model, ch.layer, None)
    ensure_ray(cfg.ray)
    data = {"X": fs.X["train"], "y": fs.y["train"], "Xte": fs.X["test"], "yte": fs.y["test"], "spec": spec,
            "params": ch.params, "pca": cfg.classify.pca}
    points = [{"fraction": f, "seed": s} for f in fractions for s in range(seeds)]
    d = study / "curve"
    rows = []
    with storage.scratch_dir(d / "tune") as tune_dir:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_curve_trial, data=data), {"cpu": cfg.classify.cpus_per_trial}),
            param_space={"trial": tune.grid_search(points)}, tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(name="curve", storage_path=str(tune_dir), verbose=0,
                                      callbacks=[progress.tune_callback("curve", len(points))]))
        for r in tuner.fit():
            if r.error is None:
                rows.append({**r.config["trial"], **{k: r.metrics[k] for k in ("n_train", "accuracy", "f1_macro")}})
    raw = pd.DataFrame(rows)
    summary = (raw.groupby("fraction").agg(n_train=("n_train", "mean"), accuracy_mean=("accuracy", "mean"),
                                            accuracy_std=("accuracy", "std"), f1_mean=("f1_macro", "mean"),
                                            f1_std=("f1_macro", "std"), runs=("seed", "count"))
               .reset_index().fillna(0.0))
    storage.write_df_atomic(raw, d / "curve_runs.parquet")
    storage.write_text_atomic(summary.to_csv(index=False), d / "curve.csv")
    _plot_curve(summary, d / "curve.png", ch)
    storage.write_text_atomic(json.dumps({"model": ch.model, "layer": ch.layer, "classifier": ch.classifier,
                                  "params": ch.params, "fractions": fractions, "seeds": seeds}, indent=1,
                                 default=str), d / "curve.json")
    return summary


def _plot_curve(summary: pd.DataFrame, path: Path, ch: Choice) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar(summary["n_train"], 100 * summary["accuracy_mean"], yerr=100 * summary["accuracy_std"],
                marker="o", capsize=3, label="accuracy")
    ax.errorbar(summary["n_train"], 100 * summary["f1_mean"], yerr=100 * summary["f1_std"], marker="s",
                capsize=3, label="macro F1")
    ax.set_xscale("log")
    ax.set_xlabel("training images")
    ax.set_ylabel("test score (%)")
    ax.set_title(f"{ch.model}/{ch.layer} + {ch.classifier}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes_atomic(buf.getvalue(), path)
