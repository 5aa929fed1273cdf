"""A day as lifeloggers look at it: time of day on the x axis, one coloured band per labelling (true,
per image, smoothed), and a few thumbnails along the strip. One PNG per day."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd

from . import storage

PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def day_timeline_png(day: pd.DataFrame, bands: list[tuple[str, str]], classes: list[str], title: str,
                     thumbnails: list[tuple[float, np.ndarray]] | None = None) -> bytes:
    """``day``: one row per image with `timestamp` and the columns named in ``bands`` ((label, column));
    each image is a bar up to the next image (at most 5 minutes), coloured by its category."""
    from .plotting import pyplot

    plt = pyplot()
    from matplotlib.patches import Patch

    t = pd.to_datetime(day["timestamp"], errors="coerce")
    day = day.assign(_h=(t.dt.hour + t.dt.minute / 60 + t.dt.second / 3600)).dropna(subset=["_h"]).sort_values("_h")
    hours = day["_h"].to_numpy()
    widths = np.minimum(np.diff(hours, append=hours[-1] + 30 / 3600) if len(hours) else [], 5 / 60)
    color = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}
    rows = len(bands) + (1 if thumbnails else 0)
    fig, axes = plt.subplots(rows, 1, figsize=(11, 0.7 * len(bands) + (1.3 if thumbnails else 0) + 0.9),
                             gridspec_kw={"height_ratios": [1] * len(bands) + ([2] if thumbnails else [])},
                             sharex=True, squeeze=False)
    axes = axes[:, 0]
    lo, hi = (hours.min() - 0.1, hours.max() + 0.2) if len(hours) else (0, 24)
    for ax, (label, col) in zip(axes, bands):
        cols = [color.get(v, "#ffffff") if isinstance(v, str) else "#ffffff" for v in day[col]]
        ax.bar(hours, 1, width=widths, align="edge", color=cols, linewidth=0)
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xlim(lo, hi)
    if thumbnails:
        ax = axes[-1]
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        span = (hi - lo) / max(len(thumbnails), 1) * 0.45
        for h, img in thumbnails:
            ax.imshow(img, extent=(h - span, h + span, 0.05, 0.95), aspect="auto")
        ax.set_xlim(lo, hi)
    axes[-1].set_xlabel("time of day (h)")
    present = [c for c in classes if any((day[col] == c).any() for _, col in bands)]
    fig.legend(handles=[Patch(color=color[c], label=c) for c in present], loc="upper center",
               ncol=min(5, max(1, len(present))), fontsize=8, frameon=False)
    fig.suptitle(title, y=0.02, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.86))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def thumbnails_of(day: pd.DataFrame, n: int = 6, size: int = 64, options: dict | None = None) -> list[tuple[float, np.ndarray]]:
    """A few images evenly spread over the day, as (hour, RGB array); unreadable ones are left out."""
    from PIL import Image

    t = pd.to_datetime(day["timestamp"], errors="coerce")
    day = day.assign(_h=t.dt.hour + t.dt.minute / 60 + t.dt.second / 3600).dropna(subset=["_h"]).sort_values("_h")
    if day.empty:
        return []
    picks = day.iloc[np.unique(np.linspace(0, len(day) - 1, min(n, len(day))).astype(int))]
    out = []
    for _, r in picks.iterrows():
        try:
            with storage.to_path(r["path"], options).open("rb") as f:
                img = Image.open(f).convert("RGB")
                img.thumbnail((size, size))
                out.append((float(r["_h"]), np.asarray(img)))
        except Exception:  # noqa: BLE001 - a thumbnail is decoration: an unreadable file is skipped
            continue
    return out
