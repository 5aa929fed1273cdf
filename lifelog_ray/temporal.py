"""Temporal smoothing of per-image class probabilities along each day's time-ordered sequence.

A wearable camera takes an image every 20-30 s, so an activity spans tens of frames. A centred window
averages each image's class probabilities with its neighbours'; an HMM decodes the most likely label
sequence (Viterbi) under a penalty for switching activity. Either works within a *sequence*: the images
of one day whose consecutive timestamps are at most ``max_gap_s`` apart, so a night, a camera switched
off or an image of another split never lends its label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

WINDOWS = (3, 5, 9, 15)  # centred window sizes tried on validation (images; 5 is ~2.5 min at 30 s)
PENALTIES = (1.0, 2.0, 4.0, 8.0)  # HMM switch penalties tried on validation (nats)


def sequences(day: np.ndarray, timestamp: np.ndarray, max_gap_s: float) -> list[np.ndarray]:
    """Index arrays, one per sequence, each in time order. Images without a timestamp stand alone."""
    frame = pd.DataFrame({"day": pd.Series(day, dtype="string").fillna(""),
                          "t": pd.to_datetime(pd.Series(timestamp), errors="coerce")})
    out: list[np.ndarray] = []
    for _, g in frame.groupby("day", sort=True):
        known = g[g["t"].notna()].sort_values("t", kind="stable")
        out += [np.array([i]) for i in g.index[g["t"].isna()]]
        if known.empty:
            continue
        gaps = known["t"].diff().dt.total_seconds().to_numpy()
        breaks = np.flatnonzero(gaps > max_gap_s)
        out += [np.asarray(part) for part in np.split(known.index.to_numpy(), breaks)]
    return out


def smooth_window(proba: np.ndarray, seqs: list[np.ndarray], window: int) -> np.ndarray:
    """Each image's probabilities averaged over the centred window of its sequence (shorter at the ends)."""
    out = proba.astype(np.float64).copy()
    half = window // 2
    for idx in seqs:
        p = proba[idx].astype(np.float64)
        c = np.vstack([np.zeros((1, p.shape[1])), np.cumsum(p, axis=0)])
        lo = np.clip(np.arange(len(idx)) - half, 0, len(idx))
        hi = np.clip(np.arange(len(idx)) + half + 1, 0, len(idx))
        out[idx] = (c[hi] - c[lo]) / (hi - lo)[:, None]
    return out


def viterbi(proba: np.ndarray, seqs: list[np.ndarray], penalty: float) -> np.ndarray:
    """The most likely label path per sequence: per-image log-probabilities, minus ``penalty`` per switch.
    Returns one-hot rows of the decoded labels."""
    logp = np.log(np.clip(proba, 1e-9, 1.0))
    k = proba.shape[1]
    out = np.zeros_like(proba, dtype=np.float64)
    switch = penalty * (1 - np.eye(k))
    for idx in seqs:
        score = logp[idx[0]].copy()
        back = np.zeros((len(idx), k), dtype=np.int64)
        for t in range(1, len(idx)):
            cand = score[:, None] - switch  # from state i (rows) to state j (columns)
            back[t] = np.argmax(cand, axis=0)
            score = cand[back[t], np.arange(k)] + logp[idx[t]]
        path = np.empty(len(idx), dtype=np.int64)
        path[-1] = int(np.argmax(score))
        for t in range(len(idx) - 1, 0, -1):
            path[t - 1] = back[t, path[t]]
        out[idx, path] = 1.0
    return out


@dataclass(frozen=True)
class Smoother:
    method: str  # window | hmm
    value: float  # window size, or switch penalty

    def describe(self) -> str:
        return f"window={int(self.value)}" if self.method == "window" else f"hmm_penalty={self.value:g}"

    def apply(self, proba: np.ndarray, seqs: list[np.ndarray]) -> np.ndarray:
        return smooth_window(proba, seqs, int(self.value)) if self.method == "window" else viterbi(proba, seqs, self.value)

    @classmethod
    def parse(cls, text: str) -> Smoother:
        name, _, value = text.partition("=")
        return cls("window" if name == "window" else "hmm", float(value))


def candidates(method: str) -> list[Smoother]:
    if method == "window":
        return [Smoother("window", w) for w in WINDOWS]
    if method == "hmm":
        return [Smoother("hmm", p) for p in PENALTIES]
    return []


def choose(method: str, proba: np.ndarray, y: np.ndarray, seqs: list[np.ndarray], score) -> Smoother | None:
    """The candidate with the best ``score(y, labels)`` on these (validation) images; ties go to the lighter
    smoothing (listed first). None when ``method`` is none or nothing is better than no smoothing."""
    best, best_score = None, score(y, np.argmax(proba, axis=1))
    for cand in candidates(method):
        s = score(y, np.argmax(cand.apply(proba, seqs), axis=1))
        if s > best_score:
            best, best_score = cand, s
    return best


def class_scores(estimator, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Per-class scores that sum to one: ``predict_proba`` where the estimator has it (an SVC only when
    built with ``probability=True``), else the softmax of ``decision_function``, else one-hot labels."""
    if hasattr(estimator, "predict_proba") and getattr(estimator, "probability", True):
        try:
            return np.asarray(estimator.predict_proba(X), dtype=np.float64)
        except AttributeError:
            pass
    if hasattr(estimator, "decision_function"):
        d = np.asarray(estimator.decision_function(X), dtype=np.float64)
        if d.ndim == 1:  # binary: the score of the second class
            d = np.column_stack([-d, d])
        if d.shape[1] == n_classes:
            e = np.exp(d - d.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
    onehot = np.zeros((len(X), n_classes))
    onehot[np.arange(len(X)), np.asarray(estimator.predict(X), dtype=int)] = 1.0
    return onehot
