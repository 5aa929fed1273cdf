"""Fitted Approach-1 pipelines on disk: PCA as .npz, XGBoost as UBJ, scikit-learn via skops, never pickle.

`pipeline.json` records the parameters, the classes and each file's SHA-256; a load refuses a file
whose hash differs, and skops refuses every type outside its defaults and ``TRUSTED_TYPES``.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import storage
from ..errors import LifelogError
from ..temporal import class_scores
from .data import FeatureSet
from .estimators import ClassifierSpec

# Types a saved scikit-learn pipeline may contain beyond skops' defaults: scikit-learn's own tree structure (a
# random forest's trees: arrays of nodes and values, which skops rebuilds without running code) and our own
# estimators. Without the first, predict refused every study whose best pipeline was a random forest.
TRUSTED_TYPES = ["sklearn.tree._tree.Tree", "lifelog_ray.classify.estimators.BayesianRidgeClassifier"]


def serialize(est: Any, is_xgboost: bool) -> tuple[bytes, str]:
    """A fitted estimator's bytes and their format name (XGBoost's own UBJ, else skops)."""
    if is_xgboost:
        return bytes(est.get_booster().save_raw("ubj")), "xgboost-classifier-ubj"
    import skops.io as sio

    return sio.dumps(est), "skops"


def pipeline_dir(out: Path, model: str, layer: str, classifier: str, protocol: str = "image") -> Path:
    """Where a saved pipeline lives: day-protocol pipelines apart from the paper's (per-image) ones."""
    return out / ("models" if protocol == "image" else f"models_{protocol}") / model / layer / classifier


def save_pipeline(out: Path, fs: FeatureSet, spec: ClassifierSpec, params: dict, fitted: dict,
                  protocol: str = "image", smoothing: str = "") -> Path:
    d = pipeline_dir(out, fs.model, fs.layer, spec.name, protocol)
    files = {}
    if fs.pca is not None:
        buf = io.BytesIO()
        np.savez(buf, components=fs.pca.components_, mean=fs.pca.mean_,
                 explained_variance_ratio=fs.pca.explained_variance_ratio_)
        storage.write_bytes_atomic(buf.getvalue(), d / "pca.npz")
        files["pca.npz"] = hashlib.sha256(buf.getvalue()).hexdigest()
    name = "model.ubj" if fitted["format"].startswith("xgboost") else "model.skops"
    storage.write_bytes_atomic(fitted["blob"], d / name)
    files[name] = hashlib.sha256(fitted["blob"]).hexdigest()
    meta = {"protocol": protocol, "smoothing": smoothing, "model": fs.model, "layer": fs.layer, "classifier": spec.name,
            "estimator": spec.estimator,
            "params": params, "fixed": spec.fixed, "classes": fs.classes, "feature_width": fs.width,
            "pca_components": fs.n_components if fs.pca is not None else None, "format": fitted["format"],
            "sha256": files}
    storage.write_text_atomic(json.dumps(meta, indent=1, default=str), d / "pipeline.json")
    return d


def load_pipeline(study: str | Path, model: str, layer: str, classifier: str, extra_trusted: list[str] | None = None):
    """Load a saved pipeline of the study the user named. Never unpickles: skops refuses unknown types,
    XGBoost loads its own format; files must match the hashes recorded when they were written."""
    d = pipeline_dir(storage.to_path(study) / "classify", model, layer, classifier)
    meta_path = d / "pipeline.json"
    if not meta_path.exists():
        raise LifelogError(f"{d}: no saved pipeline (run `lifelog-ray classify` first)")
    meta = json.loads(meta_path.read_text("utf-8"))
    blobs = {name: (d / name).read_bytes() for name in meta["sha256"]}  # read once: what is checked is what is loaded
    for name, digest in meta["sha256"].items():
        if hashlib.sha256(blobs[name]).hexdigest() != digest:
            raise LifelogError(f"{d / name}: content does not match the hash in pipeline.json; refusing to load")
    pca = None
    if "pca.npz" in blobs:
        with np.load(io.BytesIO(blobs["pca.npz"]), allow_pickle=False) as z:
            pca = {k: z[k] for k in z.files}
    if meta["format"].startswith("xgboost"):
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(bytearray(blobs["model.ubj"]))
        est = booster
    else:
        import skops.io as sio

        untrusted = sio.get_untrusted_types(data=blobs["model.skops"])
        allowed = set(TRUSTED_TYPES) | set(extra_trusted or [])
        refused = [t for t in untrusted if t not in allowed]
        if refused:
            raise LifelogError(f"{d / 'model.skops'} holds types not trusted by default: {refused}; "
                               f"pass them explicitly if you trust this file")
        est = sio.loads(blobs["model.skops"], trusted=untrusted)
    return SavedPipeline(meta, pca, est)


@dataclass
class SavedPipeline:
    meta: dict
    pca: dict | None
    estimator: Any

    def transform(self, X: np.ndarray) -> np.ndarray:
        if self.pca is None:
            return X.astype(np.float32)
        return ((X - self.pca["mean"]) @ self.pca["components"].T).astype(np.float32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        Z = self.transform(X)
        if self.meta["format"].startswith("xgboost"):
            import xgboost

            return self.estimator.predict(xgboost.DMatrix(Z))
        # The same scores the classify stage chose the smoother on (an SVC without probability=True: the
        # softmax of its one-vs-rest decision function), so predict smooths what was validated.
        return class_scores(self.estimator, Z, len(self.meta["classes"])).astype(np.float32)

    def predict(self, X: np.ndarray) -> list[str]:
        return [self.meta["classes"][i] for i in np.argmax(self.predict_proba(X), axis=1)]
