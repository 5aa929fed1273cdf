"""The one rule that picks "the best pipeline", for every stage that needs one.

Best first: the higher test accuracy, then the higher macro-F1; rows still tied keep their order in
the results table (a stable sort), so the choice never depends on the sorting algorithm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import storage
from .errors import LifelogError

RANK_BY = ["accuracy", "f1_macro"]
DEFAULT_PROTOCOL = "image"  # the paper's per-image split: Table 3 and every "best pipeline" use it by default


def of_protocol(results: pd.DataFrame, protocol: str = DEFAULT_PROTOCOL, temporal: str = "none") -> pd.DataFrame:
    """The rows of one evaluation protocol, per image (temporal none) or smoothed. Results written before
    these columns existed are per-image split, unsmoothed."""
    keep = pd.Series(True, index=results.index)
    for col, value, default in (("protocol", protocol, DEFAULT_PROTOCOL), ("temporal", temporal, "none")):
        keep &= results[col] == value if col in results else pd.Series(value == default, index=results.index)
    return results[keep]


def ranked(results: pd.DataFrame) -> pd.DataFrame:
    """The rows best first (see the module docstring)."""
    return results.sort_values(RANK_BY, ascending=False, kind="stable")


def best_row(results: pd.DataFrame) -> pd.Series:
    return ranked(results).iloc[0]


@dataclass
class Choice:
    model: str
    layer: str
    classifier: str
    params: dict


def best_approach1(study: Path, model: str | None = None, layer: str | None = None,
                   classifier: str | None = None, protocol: str = DEFAULT_PROTOCOL) -> Choice:
    """The best Approach-1 pipeline of the study under ``protocol``, optionally among one model, layer or
    classifier."""
    path = study / "classify" / "results.parquet"
    if not path.exists():
        raise LifelogError(f"{study}: no classify results; run `lifelog-ray classify` first")
    r = of_protocol(storage.read_parquet(path), protocol)
    if r.empty:
        raise LifelogError(f"{study}: no classify results under the {protocol} protocol; run `lifelog-ray classify "
                           f"--protocol {protocol}` (or both) first")
    for col, v in (("model", model), ("layer", layer), ("classifier", classifier)):
        if v:
            r = r[r[col] == v]
    if r.empty:
        raise LifelogError(f"no classify result for model={model} layer={layer} classifier={classifier}")
    b = best_row(r)
    return Choice(b["model"], b["layer"], b["classifier"], json.loads(b["params"]))
