"""Test metrics shared by both approaches: accuracy, macro/weighted P/R/F1, per-class report, confusion."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    precision_recall_fscore_support,
)

METRIC_COLUMNS = ["accuracy", "precision_macro", "recall_macro", "f1_macro",
                  "precision_weighted", "recall_weighted", "f1_weighted"]
TABLE_METRICS = METRIC_COLUMNS[:4]  # the paper's tables: accuracy and macro precision / recall / F1


def scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    out = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    return out


def full_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Scores plus the per-class report and the confusion matrix (rows = true, columns = predicted)."""
    labels = list(range(len(classes)))
    return {
        **scores(y_true, y_pred),
        "per_class": classification_report(y_true, y_pred, labels=labels, target_names=classes,
                                           output_dict=True, zero_division=0),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": classes,
    }
