"""The study's rejects table: every input row ends in an output or here, with its stage and reason."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .lease import Lease
from .storage import read_parquet, to_path, write_df_atomic

REJECT_COLUMNS = ["image_id", "path", "row", "stage", "reason", "detail"]


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": pd.Series(dtype="string"),
            "path": pd.Series(dtype="string"),
            "row": pd.Series(dtype="Int64"),
            "stage": pd.Series(dtype="string"),
            "reason": pd.Series(dtype="string"),
            "detail": pd.Series(dtype="string"),
        }
    )


def normalize_rejects(df: pd.DataFrame) -> pd.DataFrame:
    out = empty_rejects()
    if df is None or df.empty:
        return out
    df = df.copy()
    for c in REJECT_COLUMNS:
        if c not in df:
            df[c] = None
    df = df[REJECT_COLUMNS]
    return pd.concat([out, df.astype(out.dtypes.to_dict())], ignore_index=True)


def read_rejects(study: str | os.PathLike) -> pd.DataFrame:
    p = to_path(study) / "rejects.parquet"
    if not p.exists():
        return empty_rejects()
    return normalize_rejects(read_parquet(p))


def replace_stage_rejects(study: str | os.PathLike, stage: str, rejects: pd.DataFrame) -> Path:
    """Replace one stage's rows of rejects.parquet (a rerun of a stage must not duplicate its rejects).

    Two stages may finish at once (extracts of two backbones): the read-modify-write holds the short
    `rejects` lease, waiting for the other writer."""
    with Lease(to_path(study), "rejects", wait=True):
        current = read_rejects(study)
        kept = current[current["stage"] != stage]
        new = normalize_rejects(rejects)
        new["stage"] = stage
        merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        return write_df_atomic(merged, to_path(study) / "rejects.parquet")
