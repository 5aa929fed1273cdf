"""matplotlib for the files the project draws (PNG, no display)."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """pyplot on the Agg backend, with text drawn as given: an activity or class named `$x$` or `a_b` is a label,
    not TeX (matplotlib's mathtext would fail on it, or draw something else)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt
