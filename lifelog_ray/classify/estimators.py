"""The classifier battery as data: search spaces from YAML, estimators built from dotted import paths."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import BayesianRidge
from sklearn.model_selection import ParameterGrid
from sklearn.preprocessing import LabelBinarizer
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import LifelogError


class BayesianRidgeClassifier(ClassifierMixin, BaseEstimator):
    """Bayesian ridge regression used as a classifier: one regression per class on one-hot targets.

    The predicted class is the argmax of the per-class outputs (a one-vs-rest least-squares classifier
    with Bayesian shrinkage), the way the paper's regression model can label images at all. With two
    classes one regression on -1/+1 targets gives a 1-D ``decision_function`` whose sign is the class,
    as scikit-learn expects of a binary classifier.
    """

    def __init__(self, alpha_1: float = 1e-6, alpha_2: float = 1e-6, lambda_1: float = 1e-6,
                 lambda_2: float = 1e-6, max_iter: int = 300) -> None:
        self.alpha_1 = alpha_1
        self.alpha_2 = alpha_2
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> BayesianRidgeClassifier:
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        binary = len(np.unique(y)) == 2
        self.label_binarizer_ = LabelBinarizer(neg_label=-1 if binary else 0, pos_label=1)
        targets = self.label_binarizer_.fit_transform(y).astype(np.float64)
        self.classes_ = self.label_binarizer_.classes_
        if len(self.classes_) < 2:
            raise ValueError(f"BayesianRidgeClassifier needs at least 2 classes in y; got 1 class ({self.classes_[0]!r})")
        self.estimators_ = [
            BayesianRidge(alpha_1=self.alpha_1, alpha_2=self.alpha_2, lambda_1=self.lambda_1,
                          lambda_2=self.lambda_2, max_iter=self.max_iter).fit(X, targets[:, j])
            for j in range(targets.shape[1])
        ]
        self.n_iter_ = max(e.n_iter_ for e in self.estimators_)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        d = np.column_stack([e.predict(X) for e in self.estimators_])
        return d[:, 0] if len(self.classes_) == 2 else d

    def predict(self, X: np.ndarray) -> np.ndarray:
        d = self.decision_function(X)
        return self.classes_[(d > 0).astype(int)] if d.ndim == 1 else self.classes_[np.argmax(d, axis=1)]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Per-class regression outputs clipped at a small floor and normalised to sum to one (two classes:
        the -1..+1 output mapped onto 0..1 for the second class)."""
        d = self.decision_function(X)
        if d.ndim == 1:
            d = np.column_stack([1 - (d + 1) / 2, (d + 1) / 2])
        d = np.clip(d, 1e-6, None)
        return d / d.sum(axis=1, keepdims=True)


# A search space is data a colleague may hand over with a study: it may name estimator classes of these
# packages only, and only scikit-learn estimators (subclasses of BaseEstimator), never any other callable.
ESTIMATOR_PACKAGES = ("sklearn", "xgboost", "lifelog_ray")


def estimator_class(path: Any, what: str) -> type:
    """The estimator class a search space names, checked before anything of it is imported or called."""
    if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", path):
        raise LifelogError(f"{what}: estimator {path!r} is not a dotted class path such as "
                           f"sklearn.svm.SVC")
    module, _, name = path.rpartition(".")
    if module.split(".", 1)[0] not in ESTIMATOR_PACKAGES or name.startswith("_"):
        raise LifelogError(f"{what}: estimator {path} is refused: a search space may name estimator classes of "
                           f"{', '.join(ESTIMATOR_PACKAGES)} only")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise LifelogError(f"{what}: cannot import {path} ({e})") from None
    if not (inspect.isclass(cls) and issubclass(cls, BaseEstimator)):
        raise LifelogError(f"{what}: {path} is not a scikit-learn estimator class (a subclass of BaseEstimator)")
    return cls


@dataclass
class ClassifierSpec:
    name: str
    estimator: str  # dotted path
    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)

    def points(self) -> list[dict[str, Any]]:
        """Grid points in scikit-learn's ParameterGrid order (the order GridSearchCV breaks ties by)."""
        return list(ParameterGrid({k: list(v) for k, v in self.grid.items()})) if self.grid else [{}]

    def build(self, params: dict[str, Any], seed: int = 0, n_jobs: int = 1) -> Any:
        est_cls = estimator_class(self.estimator, f"classifier {self.name}")
        kwargs = {**self.fixed, **params}
        accepted = inspect.signature(est_cls.__init__).parameters
        if "random_state" in accepted and "random_state" not in kwargs:
            kwargs["random_state"] = seed
        if "n_jobs" in accepted and "n_jobs" not in kwargs:
            kwargs["n_jobs"] = n_jobs
        return est_cls(**kwargs)


def fit_pca_classifier(X: np.ndarray, y: np.ndarray, spec: ClassifierSpec, params: dict[str, Any], seed: int,
                       pca: float | int | None, proba: bool = False, n_jobs: int = 1) -> tuple[Any, Any]:
    """PCA fitted on these training rows (when ``pca`` is set), then the classifier on the projection.

    Returns ``(project, estimator)``: apply ``project`` to any other rows before the estimator. With
    ``proba`` an SVC is built with probability estimates.
    """
    from sklearn.decomposition import PCA

    p = PCA(n_components=pca, svd_solver="full", random_state=seed).fit(X) if pca is not None else None
    project = p.transform if p is not None else (lambda Z: Z)
    extra = {"probability": True} if proba and spec.estimator == "sklearn.svm.SVC" else {}
    est = spec.build({**params, **extra}, seed=seed, n_jobs=n_jobs).fit(project(X), y)
    return project, est


def load_search_space(path: str | Path | None, names: list[str]) -> list[ClassifierSpec]:
    if path is None:
        text = resources.files("lifelog_ray.resources").joinpath("search_space.yaml").read_text("utf-8")
        source = "bundled search space"
    else:
        try:
            text = Path(path).read_text("utf-8")
        except FileNotFoundError:
            raise LifelogError(f"search space file not found: {path}") from None
        source = str(path)
    data = yaml.safe_load(text) or {}
    missing = [n for n in names if n not in data]
    if missing:
        raise LifelogError(f"{source}: no search space for classifier(s) {missing}; it has {sorted(data)}")
    out = []
    for n in names:
        d = data[n]
        if not isinstance(d, dict) or "estimator" not in d:
            raise LifelogError(f"{source}: {n} needs an 'estimator' (dotted path) and a 'grid'")
        estimator_class(d["estimator"], f"{source}: classifier {n}")  # refused here, before any trial runs
        out.append(ClassifierSpec(n, d["estimator"], d.get("grid") or {}, d.get("fixed") or {}))
    return out


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)
