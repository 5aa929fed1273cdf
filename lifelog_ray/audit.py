"""Beyond the paper: a label-noise audit (confident learning, cleanlab) and a data-availability curve.

`audit`: out-of-fold class probabilities for every labelled image (stratified K-fold on the chosen
features + classifier, one Ray task per fold), ranked by cleanlab's label quality. `curve`: the best
Approach-1 pipeline trained on growing stratified fractions of the train split, several seeds, scored on
the fixed test split, one Ray Tune trial per (fraction, seed).
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.model_selection import StratifiedKFold

from . import storage
from .classify.data import load_feature_set, parse_pca
from .classify.estimators import ClassifierSpec, load_search_space
from .config import StudyConfig
from .errors import LifelogError
from .io import atomic_write_df, atomic_write_text
from .metrics import scores

log = logging.getLogger(__name__)


@dataclass
class Choice:
    model: str
    layer: str
    classifier: str
    params: dict


def best_approach1(study: Path, model: str | None = None, layer: str | None = None,
                   classifier: str | None = None) -> Choice:
    path = study / "classify" / "results.parquet"
    if not path.exists():
        raise LifelogError(f"{study}: no classify results; run `lifelog-ray classify` first")
    r = storage.read_parquet(path)
    for col, v in (("model", model), ("layer", layer), ("classifier", classifier)):
        if v:
            r = r[r[col] == v]
    if r.empty:
        raise LifelogError(f"no classify result for model={model} layer={layer} classifier={classifier}")
    b = r.sort_values(["accuracy", "f1_macro"], ascending=False).iloc[0]
    return Choice(b["model"], b["layer"], b["classifier"], json.loads(b["params"]))


def _proba_estimator(spec: ClassifierSpec, params: dict, seed: int):
    extra = {"probability": True} if spec.estimator == "sklearn.svm.SVC" else {}
    return spec.build({**params, **extra}, seed=seed, n_jobs=1)


def _fold(X, y, train_idx, test_idx, spec, params, seed, n_classes, pca):
    Xtr, Xte = X[train_idx], X[test_idx]
    if pca is not None:
        p = PCA(n_components=pca, svd_solver="full", random_state=seed).fit(Xtr)
        Xtr, Xte = p.transform(Xtr), p.transform(Xte)
    est = _proba_estimator(spec, params, seed).fit(Xtr, y[train_idx])
    proba = np.zeros((len(test_idx), n_classes))
    proba[:, np.asarray(est.classes_, dtype=int)] = est.predict_proba(Xte)
    return test_idx, proba


def _raw_features(study: Path, model: str, layer: str):
    fs = load_feature_set(study, model, layer, None)  # raw: PCA is refitted inside every fold
    X = np.concatenate([fs.X[s] for s in ("train", "val", "test")])
    ids = np.concatenate([fs.ids[s] for s in ("train", "val", "test")])
    return fs, X, ids


def _fit_and_score(Xtr, ytr, Xte, yte, spec, params, seed, pca) -> dict[str, float]:
    if pca is not None:
        p = PCA(n_components=pca, svd_solver="full", random_state=seed).fit(Xtr)
        Xtr, Xte = p.transform(Xtr), p.transform(Xte)
    est = spec.build(params, seed=seed, n_jobs=1).fit(Xtr, ytr)
    return scores(yte, np.asarray(est.predict(Xte)))


def rerun_without_suspects(cfg: StudyConfig, fs, ch: Choice, spec: ClassifierSpec, suspects: set[str]) -> pd.DataFrame:
    """The chosen pipeline refitted on its training images with and without the flagged ones.

    Only training images are dropped; validation and test images and every label stay as they are,
    so the two rows are scored on the same test split with the same (possibly noisy) labels.
    """
    import ray

    parts = ["train", "val"] if cfg.classify.refit_on == "train+val" else ["train"]
    X = np.concatenate([fs.X[s] for s in parts])
    y = np.concatenate([fs.y[s] for s in parts])
    ids = np.concatenate([fs.ids[s] for s in parts])
    drop = np.isin(ids, list(suspects))
    pca = parse_pca(cfg.classify.pca)
    remote = ray.remote(num_cpus=cfg.classify.cpus_per_trial)(_fit_and_score)
    variants = {"all training images": np.ones(len(y), dtype=bool), "flagged training images removed": ~drop}
    jobs = {name: remote.remote(X[keep], y[keep], fs.X["test"], fs.y["test"], spec, ch.params, cfg.classify.seed, pca)
            for name, keep in variants.items()}
    rows = []
    for name, keep in variants.items():
        s = ray.get(jobs[name])
        rows.append({"variant": name, "n_train": int(keep.sum()), "removed": int((~keep).sum()),
                     "n_test": len(fs.y["test"]),
                     **{k: s[k] for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro")}})
    return pd.DataFrame(rows)


def run_audit(cfg: StudyConfig, folds: int = 5, model: str | None = None, layer: str | None = None,
              classifier: str | None = None, rerun: bool = False) -> pd.DataFrame:
    import ray
    from cleanlab.dataset import rank_classes_by_label_quality
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from .runtime import ensure_ray

    study = cfg.study_dir
    ch = best_approach1(study, model, layer, classifier)
    spec = load_search_space(cfg.classify.search_space, [ch.classifier])[0]
    fs, X, ids = _raw_features(study, ch.model, ch.layer)
    # Labels come from the manifest (the source of truth), joined on image_id.
    man = storage.read_parquet(study / "manifest.parquet", columns=["image_id", "label", "path"]).set_index("image_id")
    classes = sorted(man["label"].unique())
    keep = np.isin(ids, man.index)
    X, ids = X[keep], ids[keep]
    y = np.array([classes.index(v) for v in man.loc[ids, "label"]])
    ensure_ray(cfg.ray)
    n_splits = min(folds, int(np.bincount(y).min()))
    if n_splits < 2:
        raise LifelogError("audit: every category needs at least 2 images for cross-validation")
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=cfg.classify.seed)
    remote = ray.remote(num_cpus=cfg.classify.cpus_per_trial)(_fold)
    X_ref, y_ref = ray.put(X), ray.put(y)
    pca = cfg.classify.pca
    jobs = [remote.remote(X_ref, y_ref, tr, te, spec, ch.params, cfg.classify.seed, len(classes), pca)
            for tr, te in skf.split(X, y)]
    pred_probs = np.zeros((len(y), len(classes)))
    for idx, proba in ray.get(jobs):
        pred_probs[idx] = proba
    quality = get_label_quality_scores(y, pred_probs)
    issues = find_label_issues(y, pred_probs, filter_by="prune_by_noise_rate")
    out = pd.DataFrame({
        "image_id": ids, "given_label": [classes[i] for i in y],
        "suggested_label": [classes[i] for i in pred_probs.argmax(1)], "score": quality,
        "is_issue": issues, "path": man.loc[ids, "path"].to_numpy(),
    }).sort_values("score").reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    d = study / "audit"
    atomic_write_df(out, d / "label_issues.parquet")
    per_class = rank_classes_by_label_quality(labels=y, pred_probs=pred_probs)
    per_class.insert(0, "category", [classes[int(i)] for i in per_class["Class Index"]])
    atomic_write_text(per_class.to_csv(index=False), d / "per_category_noise.csv")
    atomic_write_text(json.dumps({"model": ch.model, "layer": ch.layer, "classifier": ch.classifier,
                                  "params": ch.params, "folds": n_splits, "issues": int(issues.sum()),
                                  "images": len(y)}, indent=1, default=str), d / "audit.json")
    before_after = None
    if rerun:
        before_after = rerun_without_suspects(cfg, fs, ch, spec, set(out.loc[out["is_issue"], "image_id"]))
        atomic_write_text(before_after.to_csv(index=False), d / "rerun.csv")
    elif (d / "rerun.csv").exists():
        storage.unlink(d / "rerun.csv")  # from an earlier audit: it would not match these suspects
    _audit_section(d, out, per_class, ch, cfg.storage.options, before_after)
    return out


def _audit_section(d: Path, issues: pd.DataFrame, per_class: pd.DataFrame, ch: Choice,
                   options: storage.Options | None = None, before_after: pd.DataFrame | None = None) -> None:
    from .report import _e, _table, _thumb

    figs = []
    for _, r in issues.head(16).iterrows():
        uri = _thumb(r["path"], options)
        img = f"<img alt='{_e(r['image_id'])}' src='{uri}'>" if uri else ""
        figs.append(f"<figure>{img}<figcaption><b>given:</b> {_e(r['given_label'])}<br><b>suggested:</b> "
                    f"{_e(r['suggested_label'])}<br>score {r['score']:.3f}</figcaption></figure>")
    html = (f"<h2 id='audit'>Label-noise audit</h2><p class='note'>Out-of-fold probabilities from "
            f"{_e(ch.model)}/{_e(ch.layer)} + {_e(ch.classifier)}, ranked with confident learning (cleanlab). "
            f"{int(issues['is_issue'].sum())} of {len(issues)} labels flagged. Test labels are never altered.</p>"
            + _table(per_class[["category", "Label Issues", "Label Noise", "Label Quality Score"]])
            + f"<h3>Top suspects</h3><div class='gallery'>{''.join(figs)}</div>")
    if before_after is not None:
        pct = before_after.copy()
        for c in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            pct[c] = (100 * pct[c]).round(2)
        html += ("<h3 id='audit-rerun'>Before / after removing flagged training images</h3><p class='note'>"
                 f"{_e(ch.model)}/{_e(ch.layer)} + {_e(ch.classifier)} refitted with the same parameters. Only "
                 "training images were removed; the test split and every label are unchanged, so both rows are "
                 "scored against the same, possibly noisy, test labels.</p>" + _table(pct))
    atomic_write_text(html, d / "section.html")


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
    Xs, Xt = X[idx], Xte
    if data["pca"] is not None:
        p = PCA(n_components=data["pca"], svd_solver="full", random_state=t["seed"]).fit(Xs)
        Xs, Xt = p.transform(Xs), p.transform(Xt)
    est = data["spec"].build(data["params"], seed=t["seed"], n_jobs=1).fit(Xs, y[idx])
    s = scores(yte, est.predict(Xt))
    tune.report({"n_train": len(idx), "accuracy": s["accuracy"], "f1_macro": s["f1_macro"]})


def run_curve(cfg: StudyConfig, fractions: list[float], seeds: int = 3) -> pd.DataFrame:
    from ray import tune

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
            run_config=tune.RunConfig(name="curve", storage_path=str(tune_dir), verbose=0))
        for r in tuner.fit():
            if r.error is None:
                rows.append({**r.config["trial"], **{k: r.metrics[k] for k in ("n_train", "accuracy", "f1_macro")}})
    raw = pd.DataFrame(rows)
    summary = (raw.groupby("fraction").agg(n_train=("n_train", "mean"), accuracy_mean=("accuracy", "mean"),
                                            accuracy_std=("accuracy", "std"), f1_mean=("f1_macro", "mean"),
                                            f1_std=("f1_macro", "std"), runs=("seed", "count"))
               .reset_index().fillna(0.0))
    atomic_write_df(raw, d / "curve_runs.parquet")
    atomic_write_text(summary.to_csv(index=False), d / "curve.csv")
    png = _plot_curve(summary, d / "curve.png", ch)
    from .report import _e, _table

    html = (f"<h2 id='curve'>Data-availability curve</h2><p class='note'>{_e(ch.model)}/{_e(ch.layer)} + "
            f"{_e(ch.classifier)} trained on stratified fractions of the train split ({seeds} seeds each), "
            f"scored on the fixed test split. Error bars: one standard deviation.</p>"
            f"<img alt='data-availability curve' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            + _table(summary))
    atomic_write_text(html, d / "section.html")
    return summary


def _plot_curve(summary: pd.DataFrame, path: Path, ch: Choice) -> bytes:
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
    return buf.getvalue()
