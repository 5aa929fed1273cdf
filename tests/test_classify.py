"""Classifier study: same choice and test scores as GridSearchCV, failures recorded, safe saved pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, PredefinedSplit, train_test_split

from lifelog_ray import storage
from lifelog_ray.classify.data import load_feature_set
from lifelog_ray.classify.estimators import load_search_space
from lifelog_ray.classify.persist import load_pipeline
from lifelog_ray.classify.study import run_classify
from lifelog_ray.config import load_config
from lifelog_ray.errors import LifelogError
from lifelog_ray.metrics import scores

GRID = """
svm: {estimator: sklearn.svm.SVC, grid: {C: [0.1, 1, 10], gamma: [scale, 0.001], kernel: [rbf, linear]}}
random_forest:
  estimator: sklearn.ensemble.RandomForestClassifier
  grid: {n_estimators: [20, 40], max_depth: [null, 5], criterion: [gini, entropy]}
naive_bayes: {estimator: sklearn.naive_bayes.GaussianNB, grid: {var_smoothing: [1.0e-9, 1.0e-2]}}
xgboost:
  estimator: xgboost.XGBClassifier
  fixed: {tree_method: hist}
  grid: {max_depth: [2, 4], n_estimators: [10], learning_rate: [0.3]}
bayesian_ridge: {estimator: lifelog_ray.classify.estimators.BayesianRidgeClassifier, grid: {lambda_1: [1.0e-6, 1.0]}}
broken_svm: {estimator: sklearn.svm.SVC, grid: {C: [1], kernel: [rbf, no_such_kernel]}}
"""


def write_digits(study: Path, model: str = "digits", layer: str = "pixels", n: int | None = 600) -> dict:
    X, y = load_digits(return_X_y=True)
    X, y = X[:n].astype(np.float32), y[:n]
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=0)
    va, te = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=0)
    tr, va, te = np.sort(tr), np.sort(va), np.sort(te)  # file order, as the study reads them
    split = np.empty(len(y), dtype=object)
    split[tr], split[va], split[te] = "train", "val", "test"
    labels = np.array([f"digit{d}" for d in y])
    table = pa.table({
        "image_id": [f"img{i:04d}" for i in idx], "label": labels, "split": split.astype(str),
        "day": ["2020-01-01"] * len(y),
        "features": pa.FixedSizeListArray.from_arrays(X.reshape(-1), X.shape[1]),
    })
    storage.write_table_atomic(table, study / "features" / model / layer / "2020-01" / "part0.parquet")
    classes = sorted(set(labels))
    enc = np.array([classes.index(v) for v in labels])
    return {"X": X, "y": enc, "tr": tr, "va": va, "te": te}


def cfg(study: Path, grid: Path, classifiers: str, **kw):
    over = {"output.study": str(study), "classify.search_space": str(grid), "classify.classifiers": classifiers,
            "classify.pca": "off", "classify.refit_on": "train+val", "ray.progress_bars": False}
    over.update({f"classify.{k}": v for k, v in kw.items()})
    return load_config(None, over)


@pytest.fixture(scope="module")
def digits_study(tmp_path_factory, ray_local):
    study = tmp_path_factory.mktemp("digits")
    d = write_digits(study)
    grid = study / "grid.yaml"
    grid.write_text(GRID)
    res = run_classify(cfg(study, grid, "svm,random_forest,naive_bayes,xgboost,bayesian_ridge,broken_svm"))
    return study, grid, d, res


def test_same_choice_and_scores_as_gridsearchcv(digits_study):
    study, grid, d, res = digits_study
    X, y = d["X"], d["y"]
    fit_idx = np.concatenate([d["tr"], d["va"]])
    fold = np.r_[np.full(len(d["tr"]), -1), np.zeros(len(d["va"]))]
    for spec in load_search_space(grid, ["svm", "random_forest", "naive_bayes", "xgboost", "bayesian_ridge"]):
        est = spec.build({}, seed=0, n_jobs=1)
        gs = GridSearchCV(est, {k: list(v) for k, v in spec.grid.items()}, scoring="f1_macro",
                          cv=PredefinedSplit(fold), refit=True, n_jobs=1)
        gs.fit(X[fit_idx], y[fit_idx])
        row = res.results[res.results["classifier"] == spec.name].iloc[0]
        assert json.loads(row["params"]) == json.loads(json.dumps(gs.best_params_)), spec.name
        want = scores(y[d["te"]], gs.predict(X[d["te"]]))
        for k in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            assert row[k] == pytest.approx(want[k], abs=1e-9), (spec.name, k)


def test_failed_trials_are_recorded_and_the_rest_completes(digits_study):
    study, _, _, res = digits_study
    trials = pd.read_parquet(study / "classify" / "trials.parquet")
    for col in ("model", "layer", "classifier", "params", "val_f1_macro", "status", "error"):
        assert col in trials.columns
    broken = trials[trials["classifier"] == "broken_svm"]
    assert broken["status"].tolist() == ["ok", "error"]
    assert "no_such_kernel" in broken[broken["status"] == "error"]["error"].iloc[0]
    assert (trials[trials["classifier"] != "broken_svm"]["status"] == "ok").all()
    results = pd.read_parquet(study / "classify" / "results.parquet")
    assert len(results) == 6 and results["accuracy"].between(0.8, 1.0).all()
    md = (study / "classify" / "table3.md").read_text()
    for block in ("**Accuracy**", "**Precision**", "**Recall**", "**F1 Score**"):
        assert block in md
    t3 = pd.read_csv(study / "classify" / "table3.csv")
    assert list(t3.columns[:3]) == ["metric", "model", "layer"] and len(t3) == 4
    acc = t3[t3["metric"] == "Accuracy"].iloc[0]
    assert acc["svm"] == round(100 * results.set_index("classifier").loc["svm", "accuracy"], 2)
    cm = pd.read_csv(study / "classify" / "confusion" / "digits__pixels__svm.csv", index_col=0)
    assert cm.to_numpy().sum() == results["n_test"].iloc[0]


def test_saved_pipelines_reload_safely(digits_study):
    study, _, d, res = digits_study
    preds = pd.read_parquet(study / "classify" / "predictions.parquet")
    X_test = d["X"][d["te"]]
    for clf in ("svm", "random_forest", "naive_bayes", "xgboost", "bayesian_ridge"):  # every classifier of the paper
        pipe = load_pipeline(study, "digits", "pixels", clf)
        got = pipe.predict(X_test)
        want = preds[preds["classifier"] == clf]["pred"].tolist()
        assert got == want, clf
        proba = pipe.predict_proba(X_test)  # scores predict smooths: a distribution, never a one-hot stand-in
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
        assert (proba.max(axis=1) < 0.999).any(), clf
    model_file = study / "classify" / "models" / "digits" / "pixels" / "svm" / "model.skops"
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(LifelogError, match="does not match the hash"):
        load_pipeline(study, "digits", "pixels", "svm")


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_distributed_xgboost_matches_single_node(tmp_path, ray_local):
    study = tmp_path / "s"
    write_digits(study, n=400)
    grid = tmp_path / "g.yaml"
    grid.write_text("xgboost: {estimator: xgboost.XGBClassifier, fixed: {tree_method: hist}, "
                    "grid: {max_depth: [3], n_estimators: [8], learning_rate: [0.3]}}\n")
    single = run_classify(cfg(study, grid, "xgboost", xgboost_distributed="never")).results.iloc[0]
    dist = run_classify(cfg(study, grid, "xgboost", xgboost_distributed="always", xgboost_workers=2)).results.iloc[0]
    assert bool(dist["distributed"]) and not bool(single["distributed"])
    assert abs(dist["accuracy"] - single["accuracy"]) <= 0.03
    assert load_pipeline(study, "digits", "pixels", "xgboost").meta["format"] == "xgboost-booster-ubj"


def test_pca_variance_and_streaming_solver(tmp_path):
    write_digits(tmp_path, n=None)
    full = load_feature_set(tmp_path, "digits", "pixels", 0.95, "full")
    evr = full.pca.explained_variance_ratio_
    assert evr.sum() >= 0.95 and evr[:-1].sum() < 0.95
    assert full.n_components < full.width == 64
    # Pretend the data are too big for memory: incremental PCA over on-disk batches, same dimensionality.
    inc = load_feature_set(tmp_path, "digits", "pixels", 0.95, "auto", memory_limit_bytes=1, batch_rows=200)
    assert abs(inc.n_components - full.n_components) <= 2
    assert sum(len(v) for v in inc.y.values()) == 1797
    fixed = load_feature_set(tmp_path, "digits", "pixels", 10, "randomized")
    assert fixed.n_components == 10
    # one meaning of `pca: 0.95` on every path: the cap on components (1,024 by default, 8 here) is where the
    # incremental and randomized fits start, never where the share of the variance they keep ends
    for solver, kw in (("incremental", {"batch_rows": 200}), ("randomized", {})):
        capped = load_feature_set(tmp_path, "digits", "pixels", 0.95, solver, max_components=8, **kw)
        kept = capped.pca.explained_variance_ratio_
        assert kept.sum() >= 0.95 and kept[:-1].sum() < 0.95, (solver, kept.sum())
        assert abs(capped.n_components - full.n_components) <= 2, (solver, capped.n_components, full.n_components)
        assert sum(len(v) for v in capped.y.values()) == 1797


def test_both_protocols_come_from_one_read_and_equal_each_protocols_own(tmp_path, monkeypatch):
    """`protocol: both` reads a feature set once: each protocol's set (its splits, its PCA fitted on its own train
    split) equals the one read for that protocol alone, in memory and on the streaming (incremental) path."""
    from lifelog_ray.classify import data

    write_digits(tmp_path, n=None)
    ids = sorted(load_feature_set(tmp_path, "digits", "pixels", None).ids["train"])  # the day protocol's stand-in:
    days = {i: ("train", "train", "val", "test", "train")[k % 5] for k, i in enumerate(ids)}  # other splits, some
    # rows absent (they keep the shards' split, as the manifest's split_day map does for no day)
    read = []
    to_matrix = data._to_matrix
    monkeypatch.setattr(data, "_to_matrix", lambda col: read.append(len(col)) or to_matrix(col))
    for solver in ("full", "incremental"):
        read.clear()
        both = data.load_feature_sets(tmp_path, "digits", "pixels", 0.95, solver, batch_rows=200,
                                      protocols=[None, days])
        if solver == "full":
            assert sum(read) == 1797, read  # every row converted once for both protocols
        for fs, splits in zip(both, (None, days)):
            alone = load_feature_set(tmp_path, "digits", "pixels", 0.95, solver, batch_rows=200, splits=splits)
            assert fs.n_components == alone.n_components and fs.classes == alone.classes
            for s in ("train", "val", "test"):
                assert list(fs.ids[s]) == list(alone.ids[s]) and np.array_equal(fs.y[s], alone.y[s]), (solver, s)
                np.testing.assert_allclose(fs.X[s], alone.X[s], rtol=0, atol=1e-4, err_msg=f"{solver} {s}")
        assert len(both[0].ids["train"]) != len(both[1].ids["train"])  # two protocols, not one twice


def test_bayesian_ridge_classifier_passes_scikit_learns_checks():
    from sklearn.utils.estimator_checks import check_estimator

    from lifelog_ray.classify.estimators import BayesianRidgeClassifier

    results = check_estimator(BayesianRidgeClassifier(), on_fail=None)
    failed = [f"{r['check_name']}: {r['exception']}" for r in results if r["status"] == "failed"]
    assert len(results) > 40 and not failed, failed


def test_bayesian_ridge_classifier_is_per_class_regression_argmax():
    """The paper's regression model as a classifier: unchanged by following scikit-learn's conventions."""
    from sklearn.linear_model import BayesianRidge

    from lifelog_ray.classify.estimators import BayesianRidgeClassifier

    X, y = load_digits(return_X_y=True)
    X, y = X[:400], y[:400]
    clf = BayesianRidgeClassifier().fit(X[:300], y[:300])
    by_hand = np.column_stack([BayesianRidge().fit(X[:300], (y[:300] == c).astype(float)).predict(X[300:])
                               for c in np.unique(y)])
    assert np.array_equal(clf.predict(X[300:]), np.unique(y)[by_hand.argmax(axis=1)])
    assert np.allclose(clf.predict_proba(X[300:]).sum(axis=1), 1.0)
