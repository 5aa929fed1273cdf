"""One writer per study stage: a lease file STUDY/_leases/<stage>[-<model>].json, created atomically,
kept alive by a heartbeat, and taken over only when its holder is dead.

Creation is exclusive: locally a hard link of a complete temp file (fails if the lease exists), on S3
a conditional PUT (``If-None-Match: *``). A takeover of a dead holder's lease is serialised by
``flock`` locally; on an object store it is a delete, a conditional create and a re-read a moment
later, so two runs that judge the same holder dead within that moment can, rarely, both proceed
(the README's Reliability section says so).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from . import storage
from .errors import LifelogError

log = logging.getLogger(__name__)

LEASES = "_leases"
POLL_S = 2.0  # --wait: how often a queued run looks at the lease again
SETTLE_S = 1.0  # object stores: the pause before a taker re-reads the lease it wrote


class LeaseHeld(LifelogError):
    """Another live run holds the lease of this stage."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def ray_job_id() -> str:
    """The Ray job this process runs as: the submission id of `ray job submit`, else the driver's job id."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        with contextlib.suppress(ValueError, AttributeError):
            sub = json.loads(raw).get("metadata", {}).get("job_submission_id")
            if sub:
                return str(sub)
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        with contextlib.suppress(Exception):
            return ray.get_runtime_context().get_job_id()
    return ""


def lease_path(study: Path, stage: str, model: str | None = None) -> Path:
    return study / LEASES / (f"{stage}-{model}.json" if model else f"{stage}.json")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def dead_reason(holder: dict, timeout_s: float, now: datetime | None = None) -> str | None:
    """Why ``holder`` is dead, or None while it is alive: its process is gone (same host), or its
    heartbeat is older than ``timeout_s`` (any host: a node that vanished, a hung driver)."""
    now = now or _now()
    try:
        age = (now - _parse(holder["heartbeat_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return "its lease file is unreadable"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return f"its process {holder.get('pid')} is gone"
    if age > timeout_s:
        return f"no heartbeat for {age:.0f}s (storage.lease_timeout_s = {timeout_s:g})"
    return None


def describe(holder: dict, now: datetime | None = None) -> str:
    now = now or _now()
    job = f", Ray job {holder['ray_job_id']}" if holder.get("ray_job_id") else ""
    try:
        beat = f"{(now - _parse(holder['heartbeat_at'])).total_seconds():.0f}s ago"
    except (KeyError, TypeError, ValueError):
        beat = "unknown"
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}{job}, started {holder.get('started_at', '?')}, "
            f"last heartbeat {beat}")


def _read(path: Path) -> dict | None:
    try:
        data = storage.read_current(path)  # a heartbeat replaces the lease at any time
    except FileNotFoundError:
        return None
    try:
        out = json.loads(data)
        return out if isinstance(out, dict) else {}
    except ValueError:
        return {}  # unreadable: dead_reason() says so


def _create(path: Path, data: bytes) -> bool:
    """Write ``path`` with ``data`` only if it does not exist, atomically; False when it exists."""
    if storage.is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.fs.pipe_file(path.path, data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError):  # a filesystem without exclusive create: check, then PUT
            log.warning("%s: this store has no exclusive create; the lease is check-then-write", path)
            if path.exists():
                return False
            path.write_bytes(data)
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.link(tmp, path)  # a complete file appears under the lease's name, or FileExistsError
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def _takeover_lock(path: Path) -> Iterator[None]:
    """Locally, one process at a time judges and replaces a dead lease (flock); object stores: nothing."""
    if storage.is_remote(path):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def held_message(stage: str, holder: dict, path: Path, timeout_s: float) -> str:
    here = holder.get("host") == socket.gethostname()
    dead = ("the next run takes it over at once" if here else
            f"the next run takes it over after {timeout_s:g}s without a heartbeat (storage.lease_timeout_s)")
    return (f"{stage} is already running on this study: {describe(holder)} ({path}). "
            f"Add --wait to queue behind it; if that run is dead, {dead}")


class Lease:
    """The lease of one stage of one study, held from ``acquire`` to ``release`` (or the ``with`` block).

    ``wait``: queue behind a live holder instead of failing. While held, a daemon thread rewrites
    ``heartbeat_at`` every ``timeout_s / 6`` seconds (at most 30 s). Re-entrant within a process.
    """

    _held: dict[str, Lease] = {}  # path -> the lease this process holds
    _guard = threading.Lock()

    def __init__(self, study: Path, stage: str, model: str | None = None, timeout_s: float = 120.0,
                 wait: bool = False) -> None:
        self.path = lease_path(study, stage, model)
        self.stage = f"{stage} {model}" if model else stage
        self.timeout_s, self.wait = timeout_s, wait
        self.token = uuid.uuid4().hex
        self.record: dict = {}
        self.took_over: str | None = None  # the dead holder's description, when this run took its lease over
        self.lost = False  # set by the heartbeat when another run has taken the lease
        self._depth = 0
        self._delegate: Lease | None = None  # the lease this process already held under the same name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquiring --------------------------------------------------------------------------------------
    def _new_record(self) -> dict:
        t = _iso(_now())
        return {"host": socket.gethostname(), "pid": os.getpid(), "ray_job_id": ray_job_id(), "started_at": t,
                "heartbeat_at": t, "stage": self.stage, "token": self.token}

    def _try(self) -> dict | None:
        """Take the lease if free or dead; otherwise return the live holder's record."""
        record = self._new_record()
        data = json.dumps(record, indent=1).encode()
        if _create(self.path, data):
            self.record = record
            return None
        with _takeover_lock(self.path):
            holder = _read(self.path)
            if holder is not None and holder.get("token") == self.token:
                # ours: the store applied our create but its answer was lost, and the retried request was refused
                self.record = record
                return None
            if holder is None:  # released between our create and our read
                if _create(self.path, data):
                    self.record = record
                    return None
                return _read(self.path) or {}
            why = dead_reason(holder, self.timeout_s)
            if why is None:
                return holder
            storage.unlink(self.path)
            if not _create(self.path, data):
                return _read(self.path) or {}
        if storage.is_remote(self.path):  # no lock there: make sure no other taker overwrote us
            time.sleep(SETTLE_S)
            now = _read(self.path)
            if not now or now.get("token") != self.token:
                return now or {}
        self.took_over = f"{describe(holder)} ({why})"
        log.warning("%s: took over the lease of a dead run: %s", self.path, self.took_over)
        self.record = record
        return None

    def acquire(self) -> Lease:
        key = str(self.path)
        with Lease._guard:
            mine = Lease._held.get(key)
        if mine is not None:  # this process holds it already (run -> stage, a stage inside another)
            mine._depth += 1
            self._delegate = mine
            return mine
        announced = False
        while True:
            holder = self._try()
            if holder is None:
                break
            if not self.wait:
                raise LeaseHeld(held_message(self.stage, holder, self.path, self.timeout_s))
            if not announced:
                log.warning("%s: waiting for %s (%s)", self.stage, describe(holder), self.path)
                announced = True
            time.sleep(POLL_S)
        self._depth = 1
        with Lease._guard:
            Lease._held[key] = self
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    # -- holding --------------------------------------------------------------------------------------
    def _beat(self) -> None:
        period = max(0.5, min(30.0, self.timeout_s / 6))
        while not self._stop.wait(period):
            try:
                now = _read(self.path)
                if not now or now.get("token") != self.token:
                    self.lost = True
                    log.error("%s: the lease was taken by another run (%s)", self.path,
                              describe(now) if now else "deleted")
                    return
                self.record = {**self.record, "heartbeat_at": _iso(_now())}
                storage.write_bytes_atomic(json.dumps(self.record, indent=1).encode(), self.path)
            except Exception as e:  # a storage hiccup: the next beat tries again, well within the timeout
                log.warning("%s: heartbeat failed (%s)", self.path, e)

    def check(self) -> None:
        """Raise when another run has taken this lease (this run was judged dead): stop writing."""
        if self.lost:
            raise LifelogError(_taken(self.stage, self.path))

    def release(self) -> None:
        if self._delegate is not None:
            self._delegate, delegate = None, self._delegate
            delegate.release()
            return
        self._depth -= 1
        if self._depth > 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with Lease._guard:
            Lease._held.pop(str(self.path), None)
        with contextlib.suppress(FileNotFoundError):
            now = _read(self.path)
            if now and now.get("token") == self.token:
                storage.unlink(self.path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def stage_lease(cfg, stage: str, model: str | None = None) -> Lease:
    """The lease of ``stage`` (and ``model``) of the study ``cfg`` names, with the config's timeout and wait."""
    return Lease(cfg.study_dir, stage, model, cfg.storage.lease_timeout_s, cfg.storage.lease_wait)


@contextlib.contextmanager
def holding(leases: list[Lease]) -> Iterator[list[Lease]]:
    """Several leases, taken in name order (two runs never wait on each other crosswise), released together."""
    held: list[Lease] = []
    try:
        for lease in sorted(leases, key=lambda x: str(x.path)):
            held.append(lease.acquire())
        yield held
    finally:
        for lease in reversed(held):
            lease.release()


def check_token(path: Path, token: str, stage: str) -> None:
    """Raise unless the lease at ``path`` still carries ``token``: a worker that writes for a run reads it
    before the write that makes its work visible, so a run judged dead and taken over publishes nothing more."""
    now = _read(path)
    if not now or now.get("token") != token:
        raise LifelogError(_taken(stage, path))


def _taken(stage: str, path: Path) -> str:
    return (f"{stage}: another run took this run's lease ({path}); stopping without writing more. "
            f"Raise storage.lease_timeout_s if this run was only slow")


def check_free(cfg, names: list[tuple[str, str | None]]) -> None:
    """Fail now (before Ray starts) if a live run holds one of these leases; a no-op with --wait."""
    if cfg.storage.lease_wait:
        return
    for stage, model in names:
        path = lease_path(cfg.study_dir, stage, model)
        if str(path) in Lease._held:
            continue
        holder = _read(path)
        if holder is not None and dead_reason(holder, cfg.storage.lease_timeout_s) is None:
            name = f"{stage} {model}" if model else stage
            raise LeaseHeld(held_message(name, holder, path, cfg.storage.lease_timeout_s))




def leased(stage: str):
    """Decorator for a stage function ``fn(cfg, ...)``: it runs holding the stage's lease."""
    import functools

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(cfg, *args, **kwargs):
            with stage_lease(cfg, stage):
                return fn(cfg, *args, **kwargs)
        return wrapper
    return deco


__all__ = ["Lease", "LeaseHeld", "stage_lease", "holding", "check_free", "leased", "lease_path", "dead_reason", "check_token"]
