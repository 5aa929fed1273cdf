"""Stage progress as events: stage code says how far it has got; the edge (CLI, jobs/) decides how to show it.

Like `logging`, a call costs nothing when no one listens, so the stage functions report unconditionally
and stay free of printing (the Python API, the CLI and the jobs share them).
"""

from __future__ import annotations

from collections.abc import Callable

Reporter = Callable[[str, int, int, str], None]  # (stage, done, total, unit)

_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> Reporter | None:
    """Install ``reporter`` (None: nobody listens); returns the one it replaces."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def report(stage: str, done: int, total: int, unit: str) -> None:
    """``done`` of ``total`` ``unit`` (images, trials, epochs) of ``stage`` are finished."""
    if _reporter is not None:
        _reporter(stage, done, total, unit)


def tune_callback(stage: str, total: int):
    """A Ray Tune callback that reports each finished (or failed) trial of a ``total``-trial run."""
    from ray import tune

    class _TrialProgress(tune.Callback):
        def __init__(self) -> None:
            self.done = 0

        def _one(self) -> None:
            self.done += 1
            report(stage, self.done, total, "trials")

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._one()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._one()

    return _TrialProgress()
