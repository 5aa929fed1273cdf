"""Where data lives: local paths or fsspec URIs (s3://, gs://, ...) behind one pathlib-like API.

Local paths come back as plain ``pathlib.Path`` objects (``upath`` returns a Path subclass), so the
local path is the code everyone already knows; a URI becomes a ``UPath`` carrying its filesystem and
the per-protocol options from the config (``storage.options.s3.endpoint_url`` for MinIO, ...).
Credentials come from the usual chain (environment, instance profile, ``gcloud auth``), never
from this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from .errors import LifelogError

log = logging.getLogger(__name__)

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
Options = Mapping[str, Mapping[str, Any]]  # protocol -> fsspec storage options


class StorageError(LifelogError):
    """A location that cannot be used: unknown protocol, missing filesystem package, no access."""


def access_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this location cannot be reached or read": no endpoint, no credentials, denied."""
    errors: list[type[BaseException]] = [PermissionError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from google.auth.exceptions import GoogleAuthError

        errors.append(GoogleAuthError)
    return tuple(errors)


def is_uri(p: object) -> bool:
    return isinstance(p, str) and bool(_URI.match(p)) and not p.startswith("file://")


def is_remote(p: str | os.PathLike) -> bool:
    return isinstance(p, UPath) and p.protocol not in ("", "file", "local")


def to_path(p: str | os.PathLike, options: Options | None = None) -> Path:
    """A local ``Path`` for a path or ``file://`` URI; a ``UPath`` with its options for other URIs."""
    if isinstance(p, UPath) and is_remote(p):
        return p
    s = os.fspath(p) if not isinstance(p, str) else p
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if not is_uri(s):
        return Path(s)
    protocol = s.split("://", 1)[0].lower()
    opts = dict((options or {}).get(protocol, {}))
    watch_retries()
    try:
        path = UPath(s, **opts)
        path.fs  # noqa: B018 - build the filesystem now: a missing package fails here, not deep in a worker
        return path
    except (ImportError, ValueError) as e:
        hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol)
        extra = f"; install the `cloud` extra (pip install 'lifelog-ray[cloud]', which brings {hint})" if hint else ""
        raise StorageError(f"{s}: cannot open a {protocol}:// location ({e}){extra}") from None


def read_bytes(path: str, options: Options | None = None) -> bytes:
    if is_uri(path):
        return to_path(path, options).read_bytes()
    with open(path[len("file://"):] if path.startswith("file://") else path, "rb") as f:
        return f.read()


def read_current(p: Path) -> bytes:
    """A file another process rewrites in place (a lease, a run's state), as it is now. On an object store that
    is one GET: a file open reads through the size and ETag it found first (or a listing cached), so a read
    racing a rewrite fails (FileExpired / PreconditionFailed)."""
    return p.fs.cat_file(p.path) if is_remote(p) else p.read_bytes()


def read_each(paths: list[str], options: Options | None = None) -> list[bytes | OSError]:
    """The bytes of each path, or the error that kept it from being read (per file, never raised). URIs are
    fetched concurrently, one batch of GETs per filesystem: a batch of images on S3 costs about one round
    trip instead of one per image."""
    out: list[bytes | OSError | None] = [None] * len(paths)
    remote: dict[int, list[tuple[int, Path]]] = {}
    for i, p in enumerate(paths):
        if is_uri(p):
            up = to_path(p, options)
            remote.setdefault(id(up.fs), []).append((i, up))
            continue
        try:
            out[i] = read_bytes(p, options)
        except OSError as e:
            out[i] = e
    for group in remote.values():
        fs = group[0][1].fs
        try:
            got = fs.cat([up.path for _, up in group], on_error="return")
        except OSError as e:  # the whole batch failed (no endpoint): every file says so
            got = {up.path: e for _, up in group}
        for i, up in group:
            v = got.get(up.path, FileNotFoundError(up.path)) if isinstance(got, dict) else got
            out[i] = v if isinstance(v, (bytes, OSError)) else OSError(f"{type(v).__name__}: {v}")
    return out  # type: ignore[return-value]


def read_many(paths: list[Path]) -> list[bytes]:
    """Several files' bytes, in order; on an object store fetched concurrently (one batch of GETs)."""
    remote = [p for p in paths if is_remote(p)]
    got = remote[0].fs.cat([p.path for p in remote]) if remote else {}
    return [got[p.path] if is_remote(p) else p.read_bytes() for p in paths]


def arrow_filesystem(p: Path) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path inside it) for pyarrow.dataset / pyarrow.parquet."""
    if not is_remote(p):
        return None, str(p)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(p.fs)), p.path


def read_parquet(p: Path, columns: list[str] | None = None) -> pd.DataFrame:
    return read_table(p, columns).to_pandas()


def read_csv(p: Path, **kwargs: Any) -> pd.DataFrame:
    with p.open("rb") as f:
        return pd.read_csv(f, **kwargs)


def read_table(p: Path, columns: list[str] | None = None) -> pa.Table:
    if not is_remote(p):
        return pq.read_table(p, columns=columns)
    with p.open("rb") as f:
        return pq.read_table(pa.BufferReader(f.read()), columns=columns)


@contextlib.contextmanager
def _replacing(p: Path) -> Iterator[str]:
    """A temp file in ``p``'s folder, renamed onto ``p`` when the block succeeds, removed otherwise."""
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(data: bytes, p: Path) -> Path:
    """Readers never see half a file: temp file + rename locally, one PUT on an object store."""
    if is_remote(p):
        p.write_bytes(data)  # an object PUT is atomic: the old object or the whole new one
        return p
    with _replacing(p) as tmp:
        Path(tmp).write_bytes(data)
    return p


def write_table_atomic(table: pa.Table, p: Path, **kwargs: Any) -> Path:
    if is_remote(p):
        buf = io.BytesIO()
        pq.write_table(table, buf, **kwargs)
        return write_bytes_atomic(buf.getvalue(), p)
    with _replacing(p) as tmp:  # straight to disk: a big shard is not held twice in memory
        pq.write_table(table, tmp, **kwargs)
    return p


PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def plain_name(name: str, what: str) -> str:
    """``name`` if it can be one folder's name inside a study (letters, digits, `.`, `_`, `-`; no separator, no
    `..`), else a one-line error: a name from a flag, a folder or a data column never decides where files go."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise LifelogError(f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '-'; no '/', no '..'): "
                           f"it names a folder inside the study")
    return name


def rmtree(p: Path) -> None:
    if is_remote(p):
        if p.exists():
            p.fs.rm(p.path, recursive=True)
    elif p.exists():
        shutil.rmtree(p)


def unlink(p: Path) -> None:
    if is_remote(p):
        p.fs.rm(p.path)
    else:
        p.unlink(missing_ok=True)


def move(src: Path, dst: Path) -> Path:
    """Move one file; readers of ``dst``'s folder see it whole or not at all. Locally a rename (same
    filesystem), on an object store a server-side copy (the new object appears complete) then a delete."""
    if is_remote(dst):
        dst.fs.copy(src.path, dst.path)
        dst.fs.rm(src.path)
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
    return dst


def forget(p: Path) -> None:
    """Drop this process's cached listings under ``p`` (object stores): what other processes wrote there since
    (a Ray task's markers, another run's files) is then seen. A no-op on local disk."""
    if is_remote(p):
        p.fs.invalidate_cache(p.path)


def files(root: Path, suffixes: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Every file under ``root`` (recursive, sorted); one listing call on an object store."""
    if is_remote(root):
        if not root.exists():
            return
        base = root.path.rstrip("/")
        for key in sorted(root.fs.find(base)):
            if suffixes is None or os.path.splitext(key)[1].lower() in suffixes:
                yield root / key[len(base) + 1:]
        return
    for dirpath, _dirs, names in sorted(os.walk(root)):
        for n in sorted(names):
            if suffixes is None or os.path.splitext(n)[1].lower() in suffixes:
                yield Path(dirpath, n)


def relative(p: Path, root: Path) -> str:
    if is_remote(root):
        return p.path[len(root.path.rstrip("/")) + 1:]
    return p.relative_to(root).as_posix()


@contextlib.contextmanager
def scratch_dir(p: Path) -> Iterator[Path]:
    """A local folder for a tool's own state (Ray Tune, Ray Train): ``p`` when local, else a temp folder."""
    if not is_remote(p):
        p.mkdir(parents=True, exist_ok=True)
        yield p.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="lifelog-ray-scratch-") as d:
        yield Path(d)


@contextlib.contextmanager
def local_copy(p: Path) -> Iterator[Path]:
    """A local path holding ``p``'s contents (a file or a folder): ``p`` itself when local."""
    if not is_remote(p):
        yield p
        return
    with tempfile.TemporaryDirectory(prefix="lifelog-ray-down-") as d:
        if p.is_file():
            out = Path(d) / p.name
            out.write_bytes(p.read_bytes())
        else:
            out = Path(d) / (p.name or "dir")
            for f in files(p):
                dest = out / relative(f, p)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())
        yield out


def write_text_atomic(text: str, p: str | os.PathLike) -> Path:
    return write_bytes_atomic(text.encode("utf-8"), to_path(p))


def write_df_atomic(df: pd.DataFrame, p: str | os.PathLike) -> Path:
    """Readers never see half a file: temp file + rename locally, one object PUT on S3/GCS."""
    return write_table_atomic(pa.Table.from_pandas(df, preserve_index=False), to_path(p))


# --- retries of the object store -------------------------------------------------------------------------
# Two layers retry a request that failed (503 SlowDown, a dropped connection): botocore first (legacy mode: up
# to 5 attempts, exponential backoff), then s3fs around the whole call (5 more, for connection errors and
# SlowDown). Both say so only at DEBUG level; this watch counts each retry per process and logs it at INFO, so
# the driver's retries are in the stage log and the workers' come back with their batches (retry_columns).
RETRY_LAYERS = ("botocore", "s3fs")
_RETRY_LOGGERS = {"botocore.retryhandler": "botocore", "botocore.retries.standard": "botocore",
                  "botocore.retries.adaptive": "botocore", "s3fs": "s3fs"}
_retries = dict.fromkeys(RETRY_LAYERS, 0)
_retry_lock = threading.Lock()


class _RetryWatch(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        layer = _RETRY_LOGGERS.get(record.name)
        msg = record.getMessage()
        if layer == "botocore":
            retried = msg.startswith("Retry needed") and "quota reached" not in msg
        else:  # s3fs logs every client error; it retries only connection errors and SlowDown
            retried = msg.startswith("Retryable error") or (
                msg.startswith("Client error (maybe retryable)") and ("SlowDown" in msg or "reduce your request" in msg))
        if not retried or layer is None:
            return
        with _retry_lock:
            _retries[layer] += 1
        log.info("a request to the object store was retried by %s (%s)", layer, " ".join(msg.split())[:200])


_watch: _RetryWatch | None = None


def watch_retries() -> None:
    """Count object-store retries in this process from now on (idempotent; every URI path turns it on). Those
    loggers then stop propagating their DEBUG records: the retries are reported here instead."""
    global _watch
    with _retry_lock:
        if _watch is not None:
            return
        _watch = _RetryWatch(logging.DEBUG)
    for name in _RETRY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(_watch)
        logger.propagate = False


def retry_counts() -> dict[str, int]:
    """Retries this process has seen so far, per layer."""
    with _retry_lock:
        return dict(_retries)


def retried_since(before: dict[str, int]) -> dict[str, int]:
    now = retry_counts()
    return {k: now[k] - before.get(k, 0) for k in RETRY_LAYERS}


def retry_columns(n: int, before: dict[str, int], carried: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Columns `retried_<layer>` for a batch of ``n`` rows: the retries since ``before`` (plus those the batch
    already carried) on its first row, so a column's sum over every batch is the run's count."""
    import numpy as np

    out = {}
    for k, v in retried_since(before).items():
        col = np.zeros(n, dtype=np.int64)
        if carried is not None and f"retried_{k}" in carried:
            col += np.asarray(carried[f"retried_{k}"], dtype=np.int64)
        if n:
            col[0] += v
        out[f"retried_{k}"] = col
    return out


def describe_retries(counts: Mapping[str, int]) -> str:
    """`37 object-store requests retried (botocore 30, s3fs 7)`, or "" when none was."""
    total = sum(counts.values())
    if not total:
        return ""
    return f"{total} object-store request(s) retried (" + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ")"
