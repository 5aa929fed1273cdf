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
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from .errors import LifelogError

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
