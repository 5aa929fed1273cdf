"""A saturating power law through a learning curve, its spread over seeds, and where two curves cross.

accuracy(n) = a - b * n ** -c, with a in [0, 1] the ceiling, b > 0 and c > 0 (the exponent: how fast more
labelled images help). Fitted by least squares on every run's (n_train, accuracy). The spread comes from a
bootstrap over seeds (whole seeds resampled with replacement, each refitted). A crossing is reported only
within 10x the largest measured size, and it is labelled an extrapolation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_EXTRAPOLATION = 10.0  # never beyond 10x the largest measured training set


@dataclass
class Fit:
    a: float
    b: float
    c: float
    points: int  # distinct training-set sizes
    note: str = ""  # why the fit is weak (exactly determined, one seed)
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # 5th-95th percentile over seed bootstraps

    def __call__(self, n) -> np.ndarray:
        return self.a - self.b * np.power(np.asarray(n, dtype=np.float64), -self.c)


def _model(n, a, b, c):
    return a - b * np.power(n, -c)


def fit_power_law(n: np.ndarray, acc: np.ndarray) -> Fit | None:
    """The least-squares fit, or None with fewer than 3 distinct sizes (3 parameters)."""
    from scipy.optimize import curve_fit

    n, acc = np.asarray(n, dtype=np.float64), np.asarray(acc, dtype=np.float64)
    sizes = len(np.unique(n))
    if sizes < 3:
        return None
    a0 = min(1.0, float(acc.max()) + 0.02)
    try:
        (a, b, c), _ = curve_fit(_model, n, acc, p0=(a0, max(a0 - float(acc.min()), 1e-3) * float(n.min()) ** 0.5, 0.5),
                                 bounds=([0.0, 0.0, 1e-3], [1.0, np.inf, 5.0]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    note = "exactly determined by 3 sizes: no residual to judge it by" if sizes == 3 else ""
    return Fit(float(a), float(b), float(c), sizes, note)


def bootstrap(runs_n: np.ndarray, runs_acc: np.ndarray, runs_seed: np.ndarray, fit: Fit, rounds: int = 200,
              seed: int = 0) -> Fit:
    """``fit`` with the 5th-95th percentile of its parameters over bootstraps of whole seeds."""
    seeds = np.unique(runs_seed)
    if len(seeds) < 2:
        fit.note = "; ".join(x for x in (fit.note, "one seed: no spread over seeds") if x)
        return fit
    rng = np.random.default_rng(seed)
    params = []
    for _ in range(rounds):
        pick = rng.choice(seeds, size=len(seeds), replace=True)
        idx = np.concatenate([np.flatnonzero(runs_seed == s) for s in pick])
        f = fit_power_law(runs_n[idx], runs_acc[idx])
        if f is not None:
            params.append((f.a, f.b, f.c))
    if params:
        p = np.asarray(params)
        fit.spread = {k: (float(np.percentile(p[:, i], 5)), float(np.percentile(p[:, i], 95)))
                      for i, k in enumerate("abc")}
    return fit


def crossing(first: Fit, second: Fit, n_max: float) -> float | None:
    """The training-set size in (n_max, 10 n_max] where ``second`` climbs to ``first``, if the fits say it does."""
    from scipy.optimize import brentq

    hi = MAX_EXTRAPOLATION * n_max
    gap = lambda n: float(first(n) - second(n))  # noqa: E731
    if gap(n_max) <= 0 or gap(hi) > 0:
        return None
    return float(brentq(gap, n_max, hi))


__all__ = ["Fit", "fit_power_law", "bootstrap", "crossing", "MAX_EXTRAPOLATION"]
