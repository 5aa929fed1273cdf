"""Feature sets for the study: discover (model, layer) shards, load them, reduce them with PCA fitted on train."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from sklearn.decomposition import PCA, IncrementalPCA

from .. import storage
from ..config import SPLIT_NAMES
from ..errors import LifelogError

log = logging.getLogger(__name__)



@dataclass
class FeatureSet:
    """One (model, layer): PCA-reduced arrays per split, integer labels, and the class names."""

    model: str
    layer: str
    classes: list[str]
    X: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    ids: dict[str, np.ndarray]
    width: int
    pca: PCA | IncrementalPCA | None

    @property
    def n_components(self) -> int:
        return self.X["train"].shape[1]

    def light(self) -> FeatureSet:
        """This set without its feature rows (each split's matrix kept as 0 rows of its width): what the driver
        needs to plan the trials and write the results (labels, ids, classes, the fitted PCA)."""
        return replace(self, X={s: np.empty((0, v.shape[1]), np.float32) for s, v in self.X.items()})


def discover(study: Path, models: list[str] | None, layers: list[str] | None) -> list[tuple[str, str]]:
    """Every <model>/<layer> folder under features/ holding Parquet, whatever their names."""
    root = study / "features"
    found = []
    if root.exists():
        for mdir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
            for ldir in sorted(p for p in mdir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
                if next(storage.files(ldir, (".parquet",)), None) is not None:
                    found.append((mdir.name, ldir.name))
    chosen = [(m, la) for m, la in found if (not models or m in models) and (not layers or la in layers)]
    if not chosen:
        raise LifelogError(
            f"{root}: no feature shards for models={models or 'any'} layers={layers or 'any'} "
            f"(found {found or 'none'}); run `lifelog-ray extract` first"
        )
    return chosen


def _to_matrix(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column of fixed-size lists -> a (rows, width) float32 matrix, with no Python loop over the values.
    (Wrapping a table's ChunkedArray in `pa.chunked_array([...])` made pyarrow convert it value by value:
    24 s for 1,000 x 25,088 where pyarrow's own read takes 0.65 s.)"""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(arr.type, pa.FixedSizeListType):
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.float32, copy=False).reshape(len(arr), arr.type.list_size)
    return np.asarray(arr.to_pylist(), dtype=np.float32)  # variable-size lists from another tool


def _strings(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A string column as a NumPy unicode array (what `np.asarray(col.to_pylist())` gave, without the list)."""
    return np.asarray(col.to_numpy(zero_copy_only=False)).astype(str)


def _dataset(study: Path, model: str, layer: str) -> pads.Dataset:
    fs, path = storage.arrow_filesystem(study / "features" / model / layer)
    return pads.dataset(path, format="parquet", filesystem=fs)


def _choose_k(evr: np.ndarray, spec: float | int) -> int:
    if isinstance(spec, float) and 0 < spec < 1:
        return int(min(np.searchsorted(np.cumsum(evr), spec) + 1, len(evr)))
    return int(min(int(spec), len(evr)))


def _short(evr: np.ndarray, spec: float | int) -> bool:
    """True when the components fitted so far explain less than a variance share asked for (`pca: 0.95`)."""
    return isinstance(spec, float) and 0 < spec < 1 and float(np.sum(evr)) < spec


def _fit_share(fit, n: int, limit: int, spec: float | int) -> PCA | IncrementalPCA:
    """``fit(n)`` with n components, then twice as many until they explain the variance share asked for (a float
    spec) or ``limit`` is reached (where they explain all of it); cut to the components the spec keeps. The one
    meaning of `pca` for the solvers that fit a fixed number of components (randomized, incremental)."""
    n = min(n, limit)
    while True:
        fitted = fit(n)
        if not _short(fitted.explained_variance_ratio_, spec) or n >= limit:
            break
        log.info("PCA: %d components explain %.1f%% of the variance, under the %.0f%% asked: refitting with %d",
                 n, 100 * float(np.sum(fitted.explained_variance_ratio_)), 100 * spec, min(2 * n, limit))
        n = min(2 * n, limit)
    _truncate(fitted, _choose_k(fitted.explained_variance_ratio_, spec))
    return fitted


def _truncate(fitted: PCA | IncrementalPCA, k: int) -> None:
    fitted.components_ = fitted.components_[:k]
    fitted.n_components_ = k
    if isinstance(fitted, IncrementalPCA):
        fitted.n_components = k
    fitted.explained_variance_ = fitted.explained_variance_[:k]
    fitted.explained_variance_ratio_ = fitted.explained_variance_ratio_[:k]
    fitted.singular_values_ = fitted.singular_values_[:k]


def fit_pca_streaming(ds: pads.Dataset, spec: float | int, batch_rows: int, max_components: int,
                      train: pc.Expression | None = None, limit: int | None = None) -> IncrementalPCA:
    """Incremental PCA over the train split, batch by batch from disk: memory is bounded by a batch (of at least
    as many rows as components). A variance share (`pca: 0.95`) means the same as on the in-memory paths: when
    ``max_components`` explain less, the fit is redone with twice as many, up to ``limit`` (the train rows or
    the width, where the components explain all of it)."""
    train = pc.field("split") == "train" if train is None else train

    def fit(n: int) -> IncrementalPCA:
        ipca = IncrementalPCA(n_components=n)
        pending: list[np.ndarray] = []
        rows = 0
        for b in ds.to_batches(columns=["features"], filter=train, batch_size=batch_rows):
            pending.append(_to_matrix(b.column(0)))
            rows += len(pending[-1])
            if rows >= max(batch_rows, n):
                ipca.partial_fit(np.concatenate(pending))
                pending, rows = [], 0
        if pending:  # the last rows too (only the first call needs as many rows as components)
            ipca.partial_fit(np.concatenate(pending))
        return ipca

    return _fit_share(fit, max_components, limit or max_components, spec)


def load_feature_set(
    study: Path, model: str, layer: str, pca: float | int | None, solver: str = "auto", seed: int = 0,
    memory_limit_bytes: int = 4 << 30, batch_rows: int = 20_000, max_components: int = 1024,
    splits: dict[str, str] | None = None,
) -> FeatureSet:
    """``splits`` (image_id -> split, e.g. the manifest's `split_day`) replaces the shards' `split` column,
    which stays informational: another protocol needs no re-extraction."""
    return load_feature_sets(study, model, layer, pca, solver, seed, memory_limit_bytes, batch_rows, max_components,
                             [splits])[0]


def load_feature_sets(
    study: Path, model: str, layer: str, pca: float | int | None, solver: str = "auto", seed: int = 0,
    memory_limit_bytes: int = 4 << 30, batch_rows: int = 20_000, max_components: int = 1024,
    protocols: list[dict[str, str] | None] | None = None,
) -> list[FeatureSet]:
    """One (model, layer) under each protocol's splits, from **one read** of its features (`protocol: both`):
    each protocol's PCA is fitted on its own train split. A protocol is None (the shards' `split` column) or an
    image_id -> split map (the manifest's `split_day`).

    In memory (the full and randomized solvers), the rows are read once into the first protocol's split matrices;
    another protocol's splits are gathered from them (its train split is a copy while its PCA is fitted), and the
    first protocol is reduced last, in place. Sets too big for memory (the incremental solver) are fitted from
    disk, one streaming pass over each protocol's train rows, then read once and reduced by every protocol's PCA
    batch by batch: no full-width matrix is held."""
    protocols = [None] if protocols is None else list(protocols)
    ds = _dataset(study, model, layer)
    meta = ds.to_table(columns=["image_id", "label", "split"])
    n = meta.num_rows
    width = ds.schema.field("features").type.list_size if isinstance(
        ds.schema.field("features").type, pa.FixedSizeListType) else None
    classes = sorted(set(meta.column("label").to_pylist()))
    big = width is not None and n * width * 4 > memory_limit_bytes
    if solver == "auto":
        solver = "incremental" if big else "full"
    streamed = pca is not None and solver == "incremental"
    sorted_classes = np.asarray(classes)  # sorted: a label's index is where it sorts among them
    all_ids = _strings(meta.column("image_id"))
    shard_split = _strings(meta.column("split"))
    labels = np.searchsorted(sorted_classes, _strings(meta.column("label")))  # no Python loop over rows
    splits_of, rows_of, ranks = [], [], []
    for splits in protocols:
        split = shard_split if splits is None else (
            pd.Series(all_ids).map(splits).fillna(pd.Series(shard_split)).to_numpy().astype(str))
        rows = {s: np.flatnonzero(split == s) for s in SPLIT_NAMES}
        rank = np.zeros(n, np.int64)  # a row's place in its split's matrix
        for r in rows.values():
            rank[r] = np.arange(len(r))
        splits_of.append(split)
        rows_of.append(rows)
        ranks.append(rank)
    for rows in rows_of:
        if len(rows["train"]) == 0 or len(rows["val"]) == 0:
            raise LifelogError(f"features {model}/{layer}: the train and val splits must both have rows")
    fitted: list[PCA | IncrementalPCA | None] = [None] * len(protocols)
    if streamed:
        for i, splits in enumerate(protocols):
            train = (pc.field("split") == "train" if splits is None else
                     pc.field("image_id").isin(pa.array([k for k, v in splits.items() if v == "train"], pa.string())))
            n_train = ds.count_rows(filter=train)
            fitted[i] = fit_pca_streaming(ds, pca, batch_rows, min(max_components, width or max_components), train,
                                          limit=min(n_train, width or n_train))
    # Each matrix is allocated once and the features are read batch by batch straight into it (a file at a time):
    # the peak is the matrices' own bytes and a batch, never a whole Arrow table beside its copies. Streamed: every
    # protocol's reduced matrices; in memory: the first protocol's full-width ones.
    held = range(len(protocols)) if streamed else range(1)
    index = pd.Index(all_ids)
    X: list[dict[str, np.ndarray]] = [{} for _ in protocols]
    seen = 0
    for b in ds.to_batches(columns=["image_id", "features"], batch_size=batch_rows):
        if not b.num_rows:
            continue
        feats = _to_matrix(b.column("features"))
        at = (index.get_indexer(_strings(b.column("image_id"))) if index.is_unique
              else np.arange(seen, seen + b.num_rows))  # the same scan order as `meta` otherwise
        seen += b.num_rows
        if (at < 0).any():
            seen = -1  # a row not listed a moment ago: the set changed while it was read
            break
        for i in held:
            part = fitted[i].transform(feats).astype(np.float32) if streamed else feats
            if not X[i]:
                X[i] = {s: np.empty((len(r), part.shape[1]), np.float32) for s, r in rows_of[i].items()}
            for s in SPLIT_NAMES:
                m = splits_of[i][at] == s
                X[i][s][ranks[i][at[m]]] = part[m]
    if seen != n:
        raise LifelogError(f"features {model}/{layer}: the rows read differ from the {n} listed a moment before "
                           f"(a study being written?); run again")
    for i in held:
        X[i] = X[i] or {s: np.zeros((len(r), 0), np.float32) for s, r in rows_of[i].items()}
    full_width = X[0]["train"].shape[1]

    def gathered(i: int, s: str) -> np.ndarray:
        """Protocol i's split s, gathered from the first protocol's matrices (a copy)."""
        rows = rows_of[i][s]
        out = np.empty((len(rows), full_width), np.float32)
        for home in SPLIT_NAMES:
            m = splits_of[0][rows] == home
            out[m] = X[0][home][ranks[0][rows[m]]]
        return out

    order = [] if streamed else [*range(1, len(protocols)), 0]  # the first last: the others gather from its matrices
    for i in order:
        train = X[0]["train"] if i == 0 else gathered(i, "train")
        fitted[i] = None if pca is None else _fit_in_memory(train, pca, solver, seed, max_components)
        reduced = {"train": _reduced(fitted[i], train)}
        del train  # a protocol's full-width copies go split by split, as each is reduced
        for s in SPLIT_NAMES:
            if s != "train":
                reduced[s] = _reduced(fitted[i], X[0][s] if i == 0 else gathered(i, s))
        X[i] = reduced
    sets: list[FeatureSet] = []
    for i in range(len(protocols)):
        Xs = X[i]
        kept = (f" ({100 * float(np.sum(fitted[i].explained_variance_ratio_)):.1f}% of the variance)"
                if fitted[i] is not None else "")
        log.info("%s/%s: %d rows, width %s -> %d components%s", model, layer, n, width or full_width,
                 Xs["train"].shape[1], kept)
        rows = rows_of[i]
        sets.append(FeatureSet(model, layer, classes, Xs, {s: labels[r] for s, r in rows.items()},
                               {s: all_ids[r] for s, r in rows.items()}, int(width or full_width), fitted[i]))
    return sets


def _reduced(fitted: PCA | None, v: np.ndarray) -> np.ndarray:
    """A split's rows through the fitted PCA (an empty split keeps its shape, as before)."""
    return fitted.transform(v).astype(np.float32) if fitted is not None and len(v) else v


def _fit_in_memory(train: np.ndarray, pca: float | int, solver: str, seed: int, max_components: int) -> PCA:
    if solver == "randomized":  # the same meaning as "full": twice the components until the share is reached
        return _fit_share(lambda k: PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(train),
                          max_components, min(train.shape), pca)
    n_comp = pca if isinstance(pca, float) and pca < 1 else min(int(pca), *train.shape)
    return PCA(n_components=n_comp, svd_solver="full", random_state=seed).fit(train)
