"""Ingest: a lifelog on disk (LSC, NTCIR-14, CSV or ImageFolder) -> the study manifest, rejects and Table 2."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from . import storage
from .config import SPLIT_NAMES, DataConfig, StudyConfig, write_resolved
from .errors import LifelogError
from .lease import leased
from .rejects import normalize_rejects, replace_stage_rejects
from .storage import Options, to_path
from .taxonomy import Taxonomy

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "path", "rel_path", "raw_label", "label", "split", "split_day", "timestamp", "day"]
_TIME_IN_NAME = re.compile(r"(?<!\d)(\d{8})_(\d{6})(?!\d)")
_DAY_FOLDER = re.compile(r"^(\d{4})[-_](\d{2})[-_](\d{2})$")
_MISSING = {"", "null", "none", "nan", "na", "n/a"}


class IngestError(LifelogError):
    """Input that cannot be read at all (a bad CSV, an empty dataset): names the file and the fix."""


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    categories: pd.DataFrame
    input_rows: int
    study: Path
    kept_splits: int = 0  # images whose split came from an earlier manifest

    def accounting(self) -> str:
        by_reason = self.rejects["reason"].value_counts().sort_index()
        parts = ", ".join(f"{r}={n}" for r, n in by_reason.items()) or "none"
        return (
            f"input rows: {self.input_rows} = manifest {len(self.manifest)} + rejects {len(self.rejects)} "
            f"({parts}); splits kept from earlier manifest: {self.kept_splits}"
        )


# ---------------------------------------------------------------- reading the layouts


def _read_csv_at(path: str | os.PathLike, encoding: str, required: list[str], options: Options | None = None) -> pd.DataFrame:
    p = to_path(path, options)
    if not p.is_file():
        raise IngestError(f"{p}: file not found")
    try:
        with p.open("rb") as f:
            df = pd.read_csv(f, dtype=str, keep_default_na=False, encoding=encoding, skipinitialspace=False)
    except UnicodeDecodeError as e:
        raise IngestError(
            f"{p}: not valid {encoding} text ({e.reason} at byte {e.start}); re-save it as UTF-8 "
            f"or pass its encoding in the config (data.encoding, e.g. latin-1)"
        ) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise IngestError(f"{p}: not a readable CSV ({e})") from None
    df.columns = [c.strip() for c in df.columns]  # NTCIR-14 has ' scan_glucose (mmol/L)'
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise IngestError(
            f"{p}: missing column(s) {missing}; found {list(df.columns)}. "
            f"Set the column names in the config (data.path_column / data.label_column / ...)"
        )
    return df


def _is_missing(v: object) -> bool:
    if type(v) is str:  # a CSV cell: only a short one, or one with spaces around it, can be a missing marker
        return (len(v) < 8 or v[0].isspace() or v[-1].isspace()) and v.strip().lower() in _MISSING
    return v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip().lower() in _MISSING


def _missing(values: pd.Series) -> pd.Series:
    """_is_missing over a column."""
    return pd.Series(np.fromiter(map(_is_missing, values.tolist()), bool, len(values)), index=values.index)


def _extension(path: str) -> str:
    """os.path.splitext(path)[1] for a POSIX path, without its per-call overhead (called for every file of a
    lifelog): the last component's last dot, unless only dots come before it in that component."""
    dot = path.rfind(".")
    start = path.rfind("/") + 1
    return path[dot:] if dot > start and path[start:dot].strip(".") else ""


def scan_images(root: Path, extensions: tuple[str, ...]) -> list[str]:
    """Image paths under root, relative to it (one recursive listing, also on S3/GCS)."""
    return list_root(root).images(extensions)


@dataclass
class RootListing:
    """The dataset root, listed once: every file (relative POSIX paths) and, on local disk, the entries that are
    symbolic links (files or folders), whose targets only a per-path resolve can place inside or outside the root."""

    files: set[str]
    links: set[str]

    def images(self, extensions: tuple[str, ...], unless_in: set[str] | None = None) -> list[str]:
        """The image files, sorted; ``unless_in``: leaving out these (looked up first: at a lifelog's size, the
        labelled files are nearly all of them, and need no extension test and no sort)."""
        exts = tuple(e.lower() for e in extensions)
        files = self.files if unless_in is None else (f for f in self.files if f not in unless_in)
        return sorted(f for f in files if _extension(f).lower() in exts)


def list_root(root: Path) -> RootListing:
    """One listing of the root: one `find` on an object store (its listing cache released afterwards: at a
    million keys it holds about a gigabyte), one `os.scandir` walk locally (symlinked folders not entered, as
    `os.walk` does)."""
    if storage.is_remote(root):
        if not root.exists():
            return RootListing(set(), set())
        base = root.path.rstrip("/")
        keys = root.fs.find(base)
        storage.forget(root)
        return RootListing({k[len(base) + 1:] for k in keys}, set())
    files: set[str] = set()
    links: set[str] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            it = os.scandir(os.path.join(root, rel) if rel else root)
        except OSError:  # unreadable folder: os.walk skips it too
            continue
        with it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    links.add(r)
                if e.is_dir():  # follows a link, as os.walk's classification does ...
                    if not e.is_symlink():  # ... but does not enter it
                        stack.append(r)
                else:
                    files.add(r)
    return RootListing(files, links)


def dataset_root(data: DataConfig, options: Options | None = None) -> Path:
    """``data.root`` as a path with the storage options, or a one-line error if it is not a readable folder."""
    if not data.root:
        raise IngestError("data.root: no dataset root given (use --root DIR)")
    root = to_path(data.root, options)
    if not root.is_dir():
        raise IngestError(f"{root}: dataset root is not a directory (or not readable with these credentials)")
    return root


def read_candidates(data: DataConfig, options: Options | None = None, listing: RootListing | None = None
                    ) -> pd.DataFrame:
    """One row per input row: `row`, `rel_path` (as given), `raw_label`, optional `image_id`. ``listing``: the
    root's, when the caller has it (build_manifest lists the root once for all it does)."""
    root = dataset_root(data, options)
    if listing is None and data.layout in ("folder", "lsc"):
        listing = list_root(root)
    enc = data.encoding

    def _read_csv(path: str, encoding: str, required: list[str]) -> pd.DataFrame:
        return _read_csv_at(path, encoding, required, options)

    if data.layout == "folder":
        rels = listing.images(data.extensions)
        rows = [(r, r.split("/")[0]) for r in rels if "/" in r]
        return pd.DataFrame(
            {"row": range(len(rows)), "rel_path": [shown_name(r) for r, _ in rows],
             "raw_label": [shown_name(lab) for _, lab in rows], NOT_UTF8: [shown_name(r) != r for r, _ in rows]}
        )
    if not data.labels:
        raise IngestError(f"data.labels: layout {data.layout!r} needs a labels CSV (use --labels CSV)")
    if data.layout in ("lsc", "csv"):
        path_col = data.path_column
        if data.layout == "csv":
            head = _read_csv(data.labels, enc, [])
            if path_col not in head.columns and "path" in head.columns:
                path_col = "path"
        df = _read_csv(data.labels, enc, [path_col, data.label_column])
        out = pd.DataFrame(
            {"row": range(len(df)), "rel_path": df[path_col].str.strip(), "raw_label": df[data.label_column]}
        )
        if data.layout == "lsc":
            # Images on disk that no CSV row names are unlabeled: report them rather than drop them silently.
            extra = listing.images(data.extensions, unless_in=set(_normalised(out["rel_path"])))
            if extra:
                out = pd.concat(
                    [out, pd.DataFrame({"row": pd.NA, "rel_path": [shown_name(r) for r in extra], "raw_label": None,
                                        NOT_UTF8: [shown_name(r) != r for r in extra]})], ignore_index=True
                )
        return out
    # NTCIR-14: minute table (labels) x per-image CSV (images_csv).
    if not data.images_csv:
        raise IngestError("data.images_csv: layout 'ntcir14' needs the per-image CSV (image_id, image_path)")
    minutes = _read_csv(data.labels, enc, [data.minute_id_column])
    img_cols = [c for c in minutes.columns if re.fullmatch(r"img\d+_id", c)]
    if not img_cols:
        raise IngestError(f"{data.labels}: no imgNN_id columns; is this an NTCIR-14 minute-based table?")
    need = [data.image_id_column, data.path_column]
    if data.label_source == "image":
        need.append(data.label_column)
    elif data.label_column not in minutes.columns:
        raise IngestError(f"{data.labels}: missing label column {data.label_column!r} (data.label_column)")
    images = _read_csv(data.images_csv, enc, need)
    long = minutes.melt(id_vars=[data.minute_id_column], value_vars=img_cols, value_name="image_id")
    long = long[~long["image_id"].map(_is_missing)]
    labels_by_image: dict[str, str] = {}
    if data.label_source == "minute":
        lab = minutes.set_index(data.minute_id_column)[data.label_column]
        for mid, iid in zip(long[data.minute_id_column], long["image_id"]):
            labels_by_image.setdefault(iid.strip(), lab.get(mid))
    else:
        labels_by_image = dict(zip(images[data.image_id_column].str.strip(), images[data.label_column]))
    ids = images[data.image_id_column].str.strip()
    return pd.DataFrame(
        {
            "row": range(len(images)),
            "rel_path": images[data.path_column].str.strip(),
            "raw_label": [labels_by_image.get(i) for i in ids],
            "image_id": ids,
        }
    )


# ---------------------------------------------------------------- timestamps


def timestamp_from_name(name: str) -> datetime | None:
    m = _TIME_IN_NAME.search(Path(name).name)
    if not m:
        return None
    try:
        return datetime.strptime(m.group(1) + m.group(2), "%Y%m%d%H%M%S")
    except ValueError:
        return None


def timestamp_from_exif(path: Path) -> datetime | None:
    from PIL import Image

    try:
        with path.open("rb") as f, Image.open(f) as im:
            exif = im.getexif()
            value = exif.get_ifd(0x8769).get(36867) or exif.get(306)  # DateTimeOriginal, else DateTime
    except Exception:  # noqa: BLE001 - an unreadable file has no timestamp; extract will reject it
        return None
    if not value:
        return None
    try:
        return datetime.strptime(str(value).strip("\x00 "), "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None


EXIF_TASK_SIZE = 1000  # frames per Ray task when more than this many names carry no time


def _exif_chunk(paths: list[str], options: Options | None) -> list[datetime | None]:
    return [timestamp_from_exif(to_path(p, options)) for p in paths]


def exif_times(paths: list[str], cfg: StudyConfig) -> list[datetime | None]:
    """The EXIF time of each file (None where it has none): read here for a few files, else in Ray tasks of
    EXIF_TASK_SIZE files each (a folder of phone photos holds millions of frames whose names carry no time,
    and each read is a file open, on an object store a request)."""
    options = cfg.storage.options
    if len(paths) <= EXIF_TASK_SIZE:
        return _exif_chunk(paths, options)
    import ray

    from .runtime import ensure_ray

    ensure_ray(cfg.ray)
    task = ray.remote(num_cpus=1, max_retries=3)(_exif_chunk)
    chunks = [paths[i: i + EXIF_TASK_SIZE] for i in range(0, len(paths), EXIF_TASK_SIZE)]
    log.info("manifest: reading the EXIF time of %d frame(s) in %d Ray task(s)", len(paths), len(chunks))
    return [t for part in ray.get([task.remote(c, options) for c in chunks]) for t in part]


def times_and_days(rels: pd.Series, paths: pd.Series, read_exif: Callable[[list[str]], list[datetime | None]]
                   ) -> tuple[pd.Series, pd.Series]:
    """Each frame's time and day, a column at a time (ingest's manifest, predict's new frames). The time: from
    the file name (LSC / NTCIR), else EXIF DateTimeOriginal (``read_exif``, called only with the paths whose
    names carry none), else NaT. The day: the time's, else a day folder in the path, else "unknown"."""
    ts = timestamps_from_names(rels)
    no_time = ts.isna()
    if no_time.any():
        exif = read_exif(paths[no_time].tolist())
        ts[no_time] = pd.to_datetime(pd.Series(exif, index=ts[no_time].index, dtype=object), errors="coerce")
    days = ts.dt.strftime("%Y-%m-%d").astype(object)
    undated = days.isna()
    days[undated] = [day_of(None, r) for r in rels[undated]]
    return ts, days


def day_of(ts: datetime | None, rel_path: str) -> str:
    if ts is not None:
        return ts.strftime("%Y-%m-%d")
    for part in reversed(Path(rel_path).parts[:-1]):
        m = _DAY_FOLDER.match(part)
        if m:
            return "-".join(m.groups())
    return "unknown"


# ---------------------------------------------------------------- split


def largest_remainder(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Integer counts summing to n, each within 1 of n * fraction."""
    exact = [n * f for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def assign_splits(
    df: pd.DataFrame, fractions: tuple[float, float, float], seed: int, existing: dict[str, str] | None = None
) -> pd.Series:
    """Stratified split per label. Images in `existing` keep their split; new ones fill each split's deficit."""
    existing = existing or {}
    result = pd.Series(index=df.index, dtype=object)
    for label, group in df.groupby("label", sort=True):
        ids = group["image_id"]
        kept = ids.map(existing)
        result.loc[kept.dropna().index] = kept.dropna()
        targets = largest_remainder(len(group), fractions)
        have = [int((kept == s).sum()) for s in SPLIT_NAMES]
        new_idx = group.index[kept.isna().to_numpy()]
        if len(new_idx) == 0:
            continue
        # Order new images reproducibly: sort by id, then a permutation seeded by (seed, label).
        new_idx = new_idx[np.argsort(ids.loc[new_idx].to_numpy(), kind="stable")]
        rng = np.random.default_rng([seed, zlib.crc32(str(label).encode())])
        new_idx = new_idx[rng.permutation(len(new_idx))]
        deficit = [max(0, t - h) for t, h in zip(targets, have)]
        if sum(deficit) < len(new_idx):  # earlier splits over target: spread the rest by the fractions
            extra = largest_remainder(len(new_idx) - sum(deficit), fractions)
            deficit = [d + e for d, e in zip(deficit, extra)]
        labels_for_new: list[str] = []
        for s, d in zip(SPLIT_NAMES, deficit):
            labels_for_new += [s] * d
        result.loc[new_idx] = labels_for_new[: len(new_idx)]
    return result


# A category with no test (or validation) day cannot be scored there: worse than any imbalance (at most 2).
MISSING_SPLIT_COST = 3.0


def assign_day_splits(df: pd.DataFrame, fractions: tuple[float, float, float], seed: int,
                      existing: dict[str, str] | None = None) -> pd.Series:
    """Every image of a day in one split, the days chosen so each category comes as close to the
    fractions as whole days allow. Days in ``existing`` keep their split; images of an unknown day
    keep their per-image split (``df["split"]``).

    The cost weighs every category alike (its distance from its targets over its size), plus
    MISSING_SPLIT_COST for each split a category misses though it has enough days to reach it. Greedy first: the new days,
    largest first (ties in a seeded order), each to the split that costs least; then single-day moves
    while one lowers the cost. Without the per-category weights the largest category decided alone,
    and a common activity on seven days could end up with no validation day at all.
    """
    existing = existing or {}
    known = df[df["day"] != "unknown"]
    result = df["split"].astype(object).copy()
    if known.empty:
        return result
    per_day = pd.crosstab(known["day"], known["label"])  # days x categories
    days_of = (per_day > 0).sum(axis=0).to_numpy()
    totals = per_day.sum(axis=0).to_numpy(dtype=float)
    targets = np.outer(fractions, totals)  # splits x categories
    reachable = (targets >= 0.5) & (days_of >= len(SPLIT_NAMES))[None, :]

    def cost(counts: np.ndarray) -> float:
        return float((np.abs(counts - targets) / totals).sum() + MISSING_SPLIT_COST * ((counts == 0) & reachable).sum())

    counts = np.zeros_like(targets)
    split_of: dict[str, int] = {}
    for day, row in per_day.iterrows():
        if day in existing:
            split_of[day] = SPLIT_NAMES.index(existing[day])
            counts[split_of[day]] += row.to_numpy()
    new = [d for d in per_day.index if d not in split_of]
    rng = np.random.default_rng([seed, 0x5D4])
    tiebreak = dict(zip(sorted(new), rng.permutation(len(new))))
    order = sorted(new, key=lambda d: (-int(per_day.loc[d].sum()), tiebreak[d]))
    rows = {d: per_day.loc[d].to_numpy(dtype=float) for d in order}
    for day in order:
        trial = []
        for s in range(len(SPLIT_NAMES)):
            counts[s] += rows[day]
            trial.append(cost(counts))
            counts[s] -= rows[day]
        best = int(np.argmin(trial))  # the first split wins a tie: train, then val, then test
        counts[best] += rows[day]
        split_of[day] = best
    for _ in range(10 * len(order)):  # single-day moves, each strictly lowering the cost: this ends
        current, move = cost(counts), None
        for day in order:
            for s in range(len(SPLIT_NAMES)):
                if s == split_of[day]:
                    continue
                counts[split_of[day]] -= rows[day]
                counts[s] += rows[day]
                c = cost(counts)
                counts[s] -= rows[day]
                counts[split_of[day]] += rows[day]
                if c < current - 1e-12:
                    current, move = c, (day, s)
        if move is None:
            break
        day, s = move
        counts[split_of[day]] -= rows[day]
        counts[s] += rows[day]
        split_of[day] = s
    result.loc[known.index] = known["day"].map({d: SPLIT_NAMES[s] for d, s in split_of.items()})
    return result


# ---------------------------------------------------------------- the manifest


def derive_image_id(rel: str, layout: str) -> str:
    p = Path(rel)
    if layout == "lsc" and _TIME_IN_NAME.search(p.name):
        # LSC ids are the file stem; an NTCIR-13 user prefix (u1/...) is kept to stay unique across users.
        user = [x for x in p.parts[:-1] if re.fullmatch(r"u\d+", x)]
        return "_".join([*user, p.stem])
    return p.with_suffix("").as_posix().replace("/", "__")


_STEM = re.compile(r"(?<=[^/])\.[^./]+$")  # what pathlib's with_suffix("") removes from a plain path
_USER_FOLDER = re.compile(r"(?:^|/)u\d+/")  # an NTCIR-13 user folder (u1/...)


def derive_image_ids(rels: pd.Series, layout: str) -> pd.Series:
    """derive_image_id over a column, in one pass of compiled expressions (a lifelog has millions of rows;
    eight pandas string operations took 2.8x as long); derive_image_id itself only for the rare path it would
    read differently (`.`/`..` parts, `//`, an NTCIR-13 user folder)."""
    lsc = layout == "lsc"
    user, stem_of, timed = _USER_FOLDER.search, _STEM.sub, _TIME_IN_NAME.search
    out = []
    for r in rels.astype(object):
        if not isinstance(r, str):
            out.append(r)
        elif _is_odd(r) or (lsc and user(r)):
            out.append(derive_image_id(r, layout))
        else:
            stem = stem_of("", r)
            # LSC: a name that carries the time is its own id (the file stem); any other path keeps its folders
            out.append(stem[stem.rfind("/") + 1:] if lsc and timed(r, r.rfind("/") + 1) else stem.replace("/", "__"))
    return pd.Series(out, index=rels.index, dtype=object)


def timestamps_from_names(rels: pd.Series) -> pd.Series:
    """timestamp_from_name over a column (NaT where a name carries no valid time), one pass of the expression."""
    search = _TIME_IN_NAME.search
    digits = []
    for r in rels.astype(object):
        # from the last component on (the look-behind still sees the "/" before it, a non-digit, as at a start)
        m = search(r, r.rfind("/") + 1) if isinstance(r, str) else None
        digits.append(m.group(0) if m else None)
    return pd.to_datetime(pd.Series(digits, index=rels.index, dtype=object), format="%Y%m%d_%H%M%S", errors="coerce")


def _as_posix(rels: pd.Series) -> pd.Series:
    """Path(rel).as_posix() over a column, pathlib called only where it can change a path."""
    rels = rels.astype(object)
    odd = _odd_paths(rels)
    if odd.any():
        rels = rels.copy()
        rels[odd] = [Path(r).as_posix() for r in rels[odd]]
    return rels


_BEFORE_ID = {"name_not_utf8", "missing_path", "path_outside_root", "missing_file", "unsupported_extension"}


NOT_UTF8 = "name_not_utf8"  # a candidate column: the file's name on disk is not valid UTF-8 (shown escaped)


def shown_name(name: object) -> object:
    """A file name as text that can be written anywhere: a name that is not valid UTF-8 (Python holds its bytes
    as surrogates) with those bytes escaped, `\\xe9`; any other value as it is."""
    if not isinstance(name, str):
        return name
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


_NEEDS_NORM = r"(?:^|/)\.{1,2}(?:/|$)|//|/$|\\"  # what os.path.normpath or pathlib could change in a path
_NEEDS_NORM_RE = re.compile(_NEEDS_NORM)


def _is_odd(rel: object) -> bool:
    """_NEEDS_NORM matches ``rel``: plain substring tests first (each match needs one of them), so the expression
    runs only on the rare path that might match (4x faster over a million rows)."""
    return isinstance(rel, str) and (rel[:1] == "." or "/." in rel or "//" in rel or rel[-1:] == "/" or "\\" in rel) \
        and _NEEDS_NORM_RE.search(rel) is not None


def _odd_paths(rels: pd.Series) -> pd.Series:
    """_is_odd over a column."""
    return pd.Series(np.fromiter(map(_is_odd, rels.tolist()), bool, len(rels)), index=rels.index)


def _normalised(rels: pd.Series) -> pd.Series:
    """os.path.normpath of each path, computed only on the few that it can change."""
    rels = rels.astype(object)
    odd = _odd_paths(rels)
    if odd.any():
        rels = rels.copy()
        rels[odd] = [os.path.normpath(r) for r in rels[odd]]
    return rels


def resolve_paths(root: Path, rels: pd.Series, allow_outside: bool, listing: RootListing
                  ) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Each input path -> (full path, reject reason, detail), against one listing of the root. A plain relative
    path is looked up in the listing; a path with `.`/`..` parts, an absolute one or one under a symbolic link
    is resolved as the filesystem resolves it (`_resolve`), so a link that leaves the root is still caught."""
    n = len(rels)
    full = pd.Series([None] * n, index=rels.index, dtype=object)
    reason, detail = full.copy(), full.copy()
    missing = _missing(rels)
    reason[missing], detail[missing] = "missing_path", "empty path in the labels file"
    text = rels[~missing].astype(str).astype(object)  # object: a name that is not UTF-8 stays as it is
    remote = storage.is_remote(root)
    slow = _odd_paths(text) | text.str.startswith("/")
    if remote:
        slow |= text.map(storage.is_uri).astype(bool)
    elif listing.links:
        def under_link(rel: str) -> bool:
            parts = rel.split("/")
            return any("/".join(parts[: i + 1]) in listing.links for i in range(len(parts)))
        slow |= text.map(under_link).astype(bool)
    for i, rel in text[slow].items():
        f, r, d = (_resolve_remote(root, rel, allow_outside, listing.files) if remote
                   else _resolve(root, rel, allow_outside))
        full[i], reason[i], detail[i] = (str(f) if f is not None else None), r, d
    plain = text[~slow]
    found = plain.isin(listing.files)
    base = str(root).rstrip("/") if remote else str(root.resolve())
    full[found[found].index] = base + "/" + plain[found]
    lost = found[~found].index
    reason[lost] = "missing_file"
    detail[lost] = [f"{r!r} does not exist" for r in plain[~found]]
    return full, reason, detail


def _resolve(root: Path, rel: str, allow_outside: bool, listing: set[str] | None = None
             ) -> tuple[Path | None, str | None, str | None]:
    """Return (resolved path, reject reason, detail). ``listing``: the root's files, for an object store."""
    if _is_missing(rel):
        return None, "missing_path", "empty path in the labels file"
    if storage.is_remote(root):
        return _resolve_remote(root, rel, allow_outside, listing or set())
    p = Path(rel)
    if p.is_absolute() and not allow_outside:
        return None, "path_outside_root", f"absolute path {rel!r} (set data.allow_outside_root to allow)"
    full = (p if p.is_absolute() else root / p).resolve()
    root_r = root.resolve()
    if not allow_outside and full != root_r and root_r not in full.parents:
        return None, "path_outside_root", f"{rel!r} resolves outside the dataset root (symlink or '..')"
    if not full.is_file():
        return None, "missing_file", f"{rel!r} does not exist"
    return full, None, None


def _resolve_remote(root: Path, rel: str, allow_outside: bool, listing: set[str]
                    ) -> tuple[Path | None, str | None, str | None]:
    """Object stores have no symlinks: a key is inside the root when its normalised path is."""
    if storage.is_uri(rel):
        base = str(root).rstrip("/") + "/"
        if not rel.startswith(base):
            if not allow_outside:
                return None, "path_outside_root", f"{rel!r} is not under {base} (set data.allow_outside_root to allow)"
            full = to_path(rel, {root.protocol: root.storage_options})
            return (full, None, None) if full.is_file() else (None, "missing_file", f"{rel!r} does not exist")
        rel = rel[len(base):]
    norm = posixpath.normpath(rel.lstrip("/"))
    if norm == ".." or norm.startswith("../"):
        return None, "path_outside_root", f"{rel!r} resolves outside the dataset root ('..')"
    if norm not in listing:
        return None, "missing_file", f"{rel!r} does not exist"
    return root / norm, None, None


@leased("manifest")
def build_manifest(cfg: StudyConfig) -> IngestResult:
    """Input rows -> manifest + rejects, in column operations over the whole table (a lifelog has millions of
    rows): the root listed once, paths looked up in that listing, labels merged once per distinct label."""
    data = cfg.data
    study = cfg.study_dir
    taxonomy = Taxonomy.load(data.taxonomy)
    options = cfg.storage.options
    root = dataset_root(data, options)
    listing = list_root(root)
    cands = read_candidates(data, options, listing).reset_index(drop=True)
    if len(cands) == 0:
        raise IngestError(f"{data.labels or data.root}: the dataset is empty (no input rows)")
    rel = cands["rel_path"].astype(object)
    reason = pd.Series([None] * len(cands), dtype=object)
    detail = reason.copy()
    image_id = reason.copy()

    def reject(mask: pd.Series, why: str, text: str | Callable[[object], str], of: pd.Series | None = None) -> None:
        """Rows of ``mask`` not rejected yet get this reason (a row's first reason is its reason)."""
        mask = mask & reason.isna()
        if mask.any():
            reason[mask] = why
            detail[mask] = text if isinstance(text, str) else [text(v) for v in of[mask]]

    if NOT_UTF8 in cands:  # listed on disk under a name that is not valid UTF-8
        reject(cands[NOT_UTF8].fillna(False).astype(bool), "name_not_utf8",
               "the file name is not valid UTF-8 (shown escaped); rename it to read it")
    todo = reason.isna()
    full = pd.Series([None] * len(cands), dtype=object)
    f, r, d = resolve_paths(root, rel[todo], data.allow_outside_root, listing)
    full[todo], reason[todo], detail[todo] = f.to_numpy(), r.to_numpy(), d.to_numpy()
    exts = {e.lower() for e in data.extensions}
    suffix = pd.Series([_extension(x) if isinstance(x, str) else "" for x in full.tolist()], index=full.index,
                       dtype=object)
    bad_ext = reason.isna() & ~suffix.str.lower().isin(exts)
    reject(bad_ext, "unsupported_extension", lambda x: f"{x!r} is not one of {sorted(exts)}", suffix)
    # image ids: given (NTCIR-14's image_id column), else derived from the path
    given = cands["image_id"].astype(object) if "image_id" in cands else pd.Series([None] * len(cands), dtype=object)
    has_id = ~_missing(given)
    image_id[has_id] = given[has_id].to_numpy()
    need = ~has_id & reason.isna()
    image_id[need] = derive_image_ids(rel[need], data.layout).to_numpy()
    unlabeled = _missing(cands["raw_label"])
    reject(unlabeled, "unlabeled", "no label for this image")
    raw = cands["raw_label"].astype(object).where(~unlabeled, None)
    distinct = raw[reason.isna()].dropna().unique()
    merged = {v: (taxonomy.merge(v) if taxonomy else str(v).strip()) for v in distinct}
    label = raw.map(merged)
    src = taxonomy.source if taxonomy else ""
    reject(label.isna(), "label_not_in_taxonomy", lambda v: f"raw label {v!r} not in {src}", raw)
    # duplicates, the first row kept: only rows whose path or id recurs can meet one, so only they are walked
    alive = reason.isna()
    maybe = alive & (full.where(alive).duplicated(keep=False) | image_id.where(alive).duplicated(keep=False))
    seen_paths: dict[str, object] = {}
    seen_ids: dict[str, object] = {}
    for i in maybe[maybe].index:
        if full[i] in seen_paths:
            reason[i], detail[i] = "duplicate", f"same file as input row {seen_paths[full[i]]}"
        elif image_id[i] in seen_ids:
            reason[i], detail[i] = "duplicate", f"image id {image_id[i]!r} already used by input row {seen_ids[image_id[i]]}"
        else:
            seen_paths[full[i]], seen_ids[image_id[i]] = cands.at[i, "row"], cands.at[i, "row"]
    kept = reason.isna()
    bad = ~kept
    rejects = pd.DataFrame({"image_id": image_id[bad].where(~reason[bad].isin(_BEFORE_ID), None),
                            "path": rel[bad].map(shown_name), "row": cands["row"][bad], "reason": reason[bad],
                            "detail": detail[bad]})
    df = pd.DataFrame({"row": cands["row"][kept], "image_id": image_id[kept], "path": full[kept],
                       "rel_path": _as_posix(rel[kept]), "raw_label": raw[kept].astype(str).str.strip(),
                       "label": label[kept]}).reset_index(drop=True)

    # Top-k categories by count (ties broken by name for determinism), then drop categories too small to split.
    counts = df["label"].value_counts()
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    keep = {k for k, _ in ranked[: data.top_k]} if data.top_k else set(counts.index)
    min_n = sum(1 for f in data.split if f > 0)
    too_small = {k for k in keep if counts[k] < min_n}
    out_k = df[~df["label"].isin(keep)]
    small = df[df["label"].isin(too_small)]
    rejects = pd.concat([rejects, pd.DataFrame({
        "image_id": out_k["image_id"], "path": out_k["rel_path"], "row": out_k["row"], "reason": "not_in_top_k",
        "detail": [f"category {x!r} is not among the top {data.top_k}" for x in out_k["label"]]}), pd.DataFrame({
        "image_id": small["image_id"], "path": small["rel_path"], "row": small["row"], "reason": "category_too_small",
        "detail": [f"category {x!r} has {counts[x]} image(s); the split needs at least {min_n}"
                   for x in small["label"]]})], ignore_index=True)
    df = df[df["label"].isin(keep - too_small)].reset_index(drop=True)
    rej = normalize_rejects(rejects.reset_index(drop=True))
    rej["stage"] = "ingest"
    if df.empty:
        study.mkdir(parents=True, exist_ok=True)
        replace_stage_rejects(study, "ingest", rej)
        raise IngestError(
            f"no images left for the study after ingest (see {study / 'rejects.parquet'}); "
            f"check data.layout, the label column and the taxonomy"
        )

    df["timestamp"], df["day"] = times_and_days(df["rel_path"], df["path"], lambda paths: exif_times(paths, cfg))

    # A grown lifelog keeps every earlier image in its split, so features, models and scores stay valid.
    # So does every earlier day in its day split (split_day: all of a day's images in one split).
    existing: dict[str, str] = {}
    existing_days: dict[str, str] = {}
    old = study / "manifest.parquet"
    if old.exists():
        prev = storage.read_parquet(old)
        existing = dict(zip(prev["image_id"], prev["split"]))
        if "split_day" in prev:
            known = prev[prev["day"] != "unknown"]
            existing_days = dict(zip(known["day"], known["split_day"]))
    df["split"] = assign_splits(df, data.split, data.seed, existing)
    df["split_day"] = assign_day_splits(df, data.split, data.seed, existing_days)
    kept_splits = int(df["image_id"].isin(existing.keys()).sum())

    df = df.sort_values(["day", "image_id"]).reset_index(drop=True)
    manifest = df[MANIFEST_COLUMNS].copy()
    for c in ("image_id", "path", "rel_path", "raw_label", "label", "split", "split_day", "day"):
        manifest[c] = manifest[c].astype("string")

    categories = category_table(manifest)
    short = short_of_day_splits(categories, data.split)
    if len(short):  # one warning for all: a few-day lifelog would otherwise print one per category
        days = manifest.groupby("label")["day"].nunique()
        each = ", ".join(f"{r['category']!r} ({days[r['category']]} day(s), {r['train_day']}/{r['val_day']}/"
                         f"{r['test_day']})" for _, r in short.iterrows())
        log.warning("%d of %d categories cannot reach all three splits under split_day, their images lying on too "
                    "few days (days, train/val/test images): %s; the day protocol will score them on fewer splits",
                    len(short), len(categories), each)
    study.mkdir(parents=True, exist_ok=True)
    storage.write_df_atomic(manifest, study / "manifest.parquet")
    replace_stage_rejects(study, "ingest", rej)
    storage.write_text_atomic(categories.to_csv(index=False), study / "categories.csv")
    write_resolved(cfg, study)
    result = IngestResult(manifest, rej, categories, len(cands), study, kept_splits)
    assert len(manifest) + len(rej) == len(cands), "ingest accounting broken"
    log.info(result.accounting())
    return result


def short_of_day_splits(categories: pd.DataFrame, fractions: tuple[float, ...] = (1, 1, 1)) -> pd.DataFrame:
    """The rows of a category table (categories.csv) with no image in a day split they should reach
    (one whose fraction is above zero): their images lie on too few days."""
    cols = [f"{s}_day" for s, f in zip(SPLIT_NAMES, fractions) if f > 0 and f"{s}_day" in categories]
    return categories[(categories[cols] == 0).any(axis=1)] if cols else categories.iloc[0:0]


def category_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table 2: images per category and split, largest first; then the same counts under the
    day-grouped split (`train_day`, `val_day`, `test_day`)."""
    t = pd.crosstab(manifest["label"], manifest["split"]).reindex(columns=list(SPLIT_NAMES), fill_value=0)
    t["total"] = t.sum(axis=1)
    day_split = manifest["split_day"] if "split_day" in manifest else manifest["split"]
    d = pd.crosstab(manifest["label"], day_split).reindex(columns=list(SPLIT_NAMES), fill_value=0)
    t = t.join(d.add_suffix("_day"))
    t = t.sort_values(["total"], ascending=False, kind="stable").reset_index()
    t = t.rename(columns={"label": "category"})
    t.columns.name = None
    return t[["category", "total", *SPLIT_NAMES, *(f"{s}_day" for s in SPLIT_NAMES)]]
