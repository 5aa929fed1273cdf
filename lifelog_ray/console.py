"""The user's console: a line when a stage starts, a progress bar, the warnings that concern the user and the
stage summary. Everything else (Ray, TensorFlow, absl, our own INFO lines) goes to STUDY/logs/<stage>-<time>.log.

TensorFlow's C++ code and Ray's processes write to file descriptors 1 and 2, not to Python's streams, so
a stage points those descriptors at its log file; the console writes to its own copies of the original
ones. `verbose=True` leaves the descriptors alone and shows the full stream, as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from . import progress, storage

# The CLI's and the jobs' quiet default: Ray workers' output and Ray Data's bars stay in the logs.
QUIET_RAY = {"ray.log_to_driver": False, "ray.progress_bars": False}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BAR_WIDTH = 24


def _own_stream(stream: IO[str]) -> IO[str]:
    """A stream on a copy of ``stream``'s descriptor (it keeps reaching the terminal when 1/2 are
    redirected); a stream without one (pytest's capsys) is used as it is."""
    try:
        return os.fdopen(os.dup(stream.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        return stream


class _StageLogHandler(logging.Handler):
    """Every log record, to the current stage's log file; records from before the first stage wait for it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(LOG_FORMAT))
        self.stream: IO[str] | None = None
        self.pending: list[str] = []

    def open(self, stream: IO[str]) -> None:
        self.stream = stream
        for line in self.pending:
            stream.write(line + "\n")
        self.pending.clear()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if self.stream is None:
                self.pending = (self.pending + [line])[-1000:]
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break a stage
            self.handleError(record)


class _UserWarnings(logging.Handler):
    """Warnings of ours (data problems, skipped categories): the user sees them as they happen."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:  # a traceback belongs in the log; main() names the log on the console
            return
        self.console.say(f"{record.levelname.lower()}: {record.getMessage()}", err=True)


class Console:
    """What a person reads; the CLI and the jobs create one, the Python API may pass one to run_study."""

    def __init__(self, verbose: bool = False, out: IO[str] | None = None, err: IO[str] | None = None) -> None:
        self.verbose = verbose
        self.out = out or _own_stream(sys.stdout)
        self.err = err or _own_stream(sys.stderr)
        self.live = bool(getattr(self.out, "isatty", lambda: False)())
        self.log_path: str | None = None
        self._saved: tuple[int, int] | None = None  # the original descriptors 1 and 2, while redirected
        self._log_file: IO[str] | None = None
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._bar: dict[str, Any] | None = None
        self._stage_log = _StageLogHandler()
        self._previous_reporter: progress.Reporter | None = None

    # --- set-up --------------------------------------------------------------------------------------

    def install(self) -> Console:
        """Route logging and progress here (idempotent per Console); undo with close()."""
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        if self.verbose:
            h: logging.Handler = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter(LOG_FORMAT))
            self._add(root, h)
        else:
            self._add(root, self._stage_log)
            self._add(logging.getLogger("lifelog_ray"), _UserWarnings(self))
            logging.captureWarnings(True)  # Python warnings: to the log, not the console
        self._previous_reporter = progress.set_reporter(self.progress)
        return self

    def _add(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._handlers.append((logger, handler))

    def close(self) -> None:
        """Put the descriptors, logging and progress back as they were."""
        self._end_bar()
        self._restore_descriptors()
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        self._handlers.clear()
        if not self.verbose:
            logging.captureWarnings(False)
        progress.set_reporter(self._previous_reporter)
        for s in (self.out, self.err):
            with contextlib.suppress(Exception):
                s.flush()

    def __enter__(self) -> Console:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- output --------------------------------------------------------------------------------------

    def say(self, text: str, err: bool = False) -> None:
        self._end_bar()
        stream = self.err if err else self.out
        stream.write(text.rstrip("\n") + "\n")
        stream.flush()

    @contextlib.contextmanager
    def stage(self, name: str, study: Any, what: str = "", announce: bool = True) -> Iterator[None]:
        """One stage: its start line, its own log file (unless verbose), and the log's path if it fails."""
        if announce:
            self.say(f"[{name}] started" + (f": {what}" if what else ""))
        if self.verbose:
            yield
            return
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = study / "logs" / f"{name}-{stamp}.log"
        local = Path(dest) if not storage.is_remote(study) else Path(tempfile.mkdtemp(prefix="lifelog-log-")) / dest.name
        local.parent.mkdir(parents=True, exist_ok=True)
        self._redirect(local)
        self.log_path = str(dest)
        try:
            yield
        except BaseException:
            self._end_bar()  # main() says what failed: one line for a user's mistake, the log's path for a bug
            self._upload(local, dest)
            raise
        self._upload(local, dest)

    def _redirect(self, path: Path) -> None:
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives until the next stage or close()
        if self._saved is None:
            self._saved = (os.dup(1), os.dup(2))
        for fd in (1, 2):  # only these: a descriptor someone else swapped in for sys.stdout (pytest) is theirs
            os.dup2(f.fileno(), fd)
        if self._log_file is not None:
            self._log_file.close()
        self._log_file = f
        self._stage_log.open(f)

    def _restore_descriptors(self) -> None:
        if self._saved is None:
            return
        for s in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        if self._log_file is not None:
            self._stage_log.stream = None
            self._log_file.close()
            self._log_file = None

    @staticmethod
    def _upload(local: Path, dest: Any) -> None:
        """A study on S3/GCS gets its stage's log at the end of the stage (a local one was written in place)."""
        if not storage.is_remote(dest):
            return
        try:
            storage.write_bytes_atomic(local.read_bytes(), dest)
        except Exception as e:  # noqa: BLE001 - losing a log must not fail the stage (nor add to a storage error)
            logging.getLogger(__name__).info("could not upload the stage log to %s (%s); it is at %s", dest, e, local)

    # --- progress ------------------------------------------------------------------------------------

    def progress(self, stage: str, done: int, total: int, unit: str) -> None:
        """A live bar on a terminal; elsewhere (a job log, a pipe) a line at every tenth."""
        now = time.monotonic()
        bar = self._bar
        if bar is None or bar["key"] != (stage, unit, total):
            self._end_bar()
            bar = self._bar = {"key": (stage, unit, total), "t0": now, "first": done, "tenth": -1, "shown": 0.0}
        frac = done / total if total else 1.0
        elapsed = now - bar["t0"]
        rate = (done - bar["first"]) / elapsed if elapsed > 0 and done > bar["first"] else 0.0
        eta = f"ETA {_clock((total - done) / rate)}" if rate > 0 and done < total else f"{_clock(elapsed)}"
        filled = int(BAR_WIDTH * frac)
        text = (f"  {stage} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} {unit}"
                f"  {_rate(rate, unit)}  {eta}")
        if self.live:
            if now - bar["shown"] >= 0.1 or done >= total:
                self.out.write("\r" + text + "\033[K")
                self.out.flush()
                bar["shown"] = now
                bar["open"] = True
        else:
            tenth = int(10 * frac)
            if tenth > bar["tenth"]:
                bar["tenth"] = tenth
                self.out.write(text + "\n")
                self.out.flush()
        if done >= total:
            self._end_bar()

    def _end_bar(self) -> None:
        if self._bar is not None and self._bar.get("open"):
            self.out.write("\n")
            self.out.flush()
        self._bar = None


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _rate(rate: float, unit: str) -> str:
    if rate <= 0:
        return ""
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{60 * rate:.1f} {unit}/min"
