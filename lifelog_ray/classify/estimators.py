"""The classifier battery as data: search spaces from YAML, estimators built from dotted import paths."""

from __future__ import annotations

import importlib
import inspect
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import BayesianRidge
from sklearn.model_selection import ParameterGrid

from ..errors import LifelogError


class BayesianRidgeClassifier(ClassifierMixin, BaseEstimator):
    """Bayesian ridge regression used as a classifier: one regression per class on one-hot targets.

    The predicted class is the argmax of the per-class outputs (a one-vs-rest least-squares classifier
    with Bayesian shrinkage), the way the paper's regression model can label images at all.
    """

    def __init__(self, alpha_1: float = 1e-6, alpha_2: float = 1e-6, lambda_1: float = 1e-6,
                 lambda_2: float = 1e-6, max_iter: int = 300) -> None:
        self.alpha_1 = alpha_1
        self.alpha_2 = alpha_2
        self.lambda_1 = lambda_1
        self.lambda_2 = lambda_2
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> BayesianRidgeClassifier:
        self.classes_ = np.unique(y)
        self.estimators_ = []
        for c in self.classes_:
            reg = BayesianRidge(alpha_1=self.alpha_1, alpha_2=self.alpha_2, lambda_1=self.lambda_1,
                                lambda_2=self.lambda_2, max_iter=self.max_iter)
            self.estimators_.append(reg.fit(X, (y == c).astype(np.float64)))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        return np.column_stack([e.predict(X) for e in self.estimators_])

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Per-class regression outputs clipped at a small floor and normalised to sum to one."""
        d = np.clip(self.decision_function(X), 1e-6, None)
        return d / d.sum(axis=1, keepdims=True)


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
        module, _, cls = self.estimator.rpartition(".")
        try:
            est_cls = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            raise LifelogError(f"classifier {self.name}: cannot import {self.estimator} ({e})") from None
        kwargs = {**self.fixed, **params}
        accepted = inspect.signature(est_cls.__init__).parameters
        if "random_state" in accepted and "random_state" not in kwargs:
            kwargs["random_state"] = seed
        if "n_jobs" in accepted and "n_jobs" not in kwargs:
            kwargs["n_jobs"] = n_jobs
        return est_cls(**kwargs)


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
        out.append(ClassifierSpec(n, d["estimator"], d.get("grid") or {}, d.get("fixed") or {}))
    return out


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)
