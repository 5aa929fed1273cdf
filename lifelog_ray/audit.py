"""Beyond the paper: a label-noise audit (confident learning, cleanlab).

Out-of-fold class probabilities for every labelled image (stratified K-fold on the chosen features +
classifier, one Ray task per fold), ranked by cleanlab's label quality. It writes data only
(`audit/`); the report renders it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold

from . import storage
from .classify.data import load_feature_set
from .classify.estimators import ClassifierSpec, fit_pca_classifier, load_search_space
from .config import SPLIT_NAMES, StudyConfig
from .errors import LifelogError
from .lease import leased
from .metrics import TABLE_METRICS, scores
from .results import Choice, best_approach1

log = logging.getLogger(__name__)


def _fold(X, y, train_idx, test_idx, spec, params, seed, n_classes, pca):
    project, est = fit_pca_classifier(X[train_idx], y[train_idx], spec, params, seed, pca, proba=True)
    proba = np.zeros((len(test_idx), n_classes))
    proba[:, np.asarray(est.classes_, dtype=int)] = est.predict_proba(project(X[test_idx]))
    return test_idx, proba


def _raw_features(study: Path, model: str, layer: str):
    fs = load_feature_set(study, model, layer, None)  # raw: PCA is refitted inside every fold
    X = np.concatenate([fs.X[s] for s in SPLIT_NAMES])
    ids = np.concatenate([fs.ids[s] for s in SPLIT_NAMES])
    return fs, X, ids


def _fit_and_score(Xtr, ytr, Xte, yte, spec, params, seed, pca) -> dict[str, float]:
    project, est = fit_pca_classifier(Xtr, ytr, spec, params, seed, pca)
    return scores(yte, np.asarray(est.predict(project(Xte))))


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
    pca = cfg.classify.pca
    remote = ray.remote(num_cpus=cfg.classify.cpus_per_trial)(_fit_and_score)
    variants = {"all training images": np.ones(len(y), dtype=bool), "flagged training images removed": ~drop}
    jobs = {name: remote.remote(X[keep], y[keep], fs.X["test"], fs.y["test"], spec, ch.params, cfg.classify.seed, pca)
            for name, keep in variants.items()}
    rows = []
    for name, keep in variants.items():
        s = ray.get(jobs[name])
        rows.append({"variant": name, "n_train": int(keep.sum()), "removed": int((~keep).sum()),
                     "n_test": len(fs.y["test"]),
                     **{k: s[k] for k in TABLE_METRICS}})
    return pd.DataFrame(rows)


@leased("audit")
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
    storage.write_df_atomic(out, d / "label_issues.parquet")
    per_class = rank_classes_by_label_quality(labels=y, pred_probs=pred_probs)
    per_class.insert(0, "category", [classes[int(i)] for i in per_class["Class Index"]])
    storage.write_text_atomic(per_class.to_csv(index=False), d / "per_category_noise.csv")
    storage.write_text_atomic(json.dumps({"model": ch.model, "layer": ch.layer, "classifier": ch.classifier,
                                  "params": ch.params, "folds": n_splits, "issues": int(issues.sum()),
                                  "images": len(y)}, indent=1, default=str), d / "audit.json")
    before_after = None
    if rerun:
        before_after = rerun_without_suspects(cfg, fs, ch, spec, set(out.loc[out["is_issue"], "image_id"]))
        storage.write_text_atomic(before_after.to_csv(index=False), d / "rerun.csv")
    elif (d / "rerun.csv").exists():
        storage.unlink(d / "rerun.csv")  # from an earlier audit: it would not match these suspects
    return out
