"""From labels to a lifelog: activity events, time budgets per day, week and month, and how good they are.

A frame lasts until the next frame of its day, at most ``max_gap_s`` (`classify.temporal_max_gap_s`, 300 s):
a longer gap means the camera was off. A day's last frame lasts the day's median interval between frames
(at most the max gap), and a day's only frame `FRAME_S` (30 s, a wearable camera's interval).
Consecutive frames of one day with the same label form an event; a gap longer than ``max_gap_s`` ends it.
Frames without a label (unreadable) or without a timestamp belong to no event: an unreadable frame's time
is nobody's (the frame before it still lasts only until it), and it does not split the event around it. An event shorter than
``min_event_s`` is kept but flagged (`short`), so that a stray frame does not split a meal in two for
anyone who filters them out. Days are the lifelog's own (`day`, the LSC day folder): an evening that runs
past midnight stays in its day, and its times keep increasing.

Everything here is a plain function over DataFrames; `write_summaries` runs them over a prediction set
one day at a time, so a multi-year lifelog needs memory for one day's frames and the events.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FRAME_S = 30.0  # a day's only frame: the LSC camera's interval
MIN_EVENT_S = 60.0  # shorter events are flagged `short`: a single frame (20-30 s) between two runs of one activity
EVENT_COLUMNS = ["day", "event_id", "start", "end", "duration_s", "activity", "n_frames", "mean_confidence",
                 "keyframe_id", "keyframe_path", "short"]
SUMMARY_COLUMNS = ["period", "activity", "minutes", "frames", "events", "short_events", "share"]
PERIODS = ("day", "week", "month")


def frame_durations(t: np.ndarray, max_gap_s: float) -> np.ndarray:
    """Seconds each frame lasts, for one day's sorted timestamps (datetime64): the time to the next frame,
    capped at ``max_gap_s``; the last frame gets the day's median interval (capped), a lone frame FRAME_S."""
    t = np.asarray(t, dtype="datetime64[ns]")
    if len(t) == 0:
        return np.zeros(0)
    gaps = np.diff(t).astype("timedelta64[ns]").astype(np.float64) / 1e9
    capped = np.minimum(gaps, max_gap_s)
    within = capped[gaps <= max_gap_s]
    last = float(np.median(within)) if len(within) else min(FRAME_S, max_gap_s)
    return np.append(capped, last)


def day_events(frames: pd.DataFrame, day: str, label: str = "smoothed_label", confidence: str = "smoothed_confidence",
               max_gap_s: float = 300.0, min_event_s: float = MIN_EVENT_S) -> pd.DataFrame:
    """One day's frames (columns `timestamp`, ``label``, ``confidence``, `image_id`, `path`) -> its events."""
    f = frames.assign(_t=pd.to_datetime(frames["timestamp"], errors="coerce"))
    f = f[f["_t"].notna()].sort_values(["_t", "image_id"], kind="stable")
    # durations over every frame taken, labelled or not: an unreadable frame's time is nobody's, it does not
    # lengthen the frame before it
    f = f.assign(_d=frame_durations(f["_t"].to_numpy(), max_gap_s))
    f = f[f[label].notna()]
    if f.empty:
        return pd.DataFrame(columns=EVENT_COLUMNS)
    t = f["_t"].to_numpy()
    dur = f["_d"].to_numpy()
    labels = f[label].to_numpy()
    gap = np.append(False, np.diff(t).astype("timedelta64[ns]").astype(np.float64) / 1e9 > max_gap_s)
    new = np.append(True, labels[1:] != labels[:-1]) | gap
    run = np.cumsum(new) - 1
    conf = f[confidence].to_numpy(dtype=np.float64) if confidence in f else np.full(len(f), np.nan)
    ids, paths = f["image_id"].astype(str).to_numpy(), f["path"].astype(str).to_numpy() if "path" in f else None
    rows = []
    for k in range(int(run[-1]) + 1):
        idx = np.flatnonzero(run == k)
        c = conf[idx]
        key = idx[int(np.nanargmax(c))] if np.isfinite(c).any() else idx[0]  # the most confident frame
        seconds = float(dur[idx].sum())
        rows.append({"day": day, "event_id": f"{day}#{k + 1:04d}", "start": t[idx[0]],
                     "end": t[idx[-1]] + np.timedelta64(int(round(dur[idx[-1]] * 1e9)), "ns"),
                     "duration_s": seconds, "activity": str(labels[idx[0]]), "n_frames": len(idx),
                     "mean_confidence": float(np.nanmean(c)) if np.isfinite(c).any() else np.nan,
                     "keyframe_id": ids[key], "keyframe_path": paths[key] if paths is not None else "",
                     "short": seconds < min_event_s})
    return pd.DataFrame(rows, columns=EVENT_COLUMNS)


def period_of(day: pd.Series, by: str) -> pd.Series:
    """The period of each `YYYY-MM-DD` day: itself, its ISO week (`2016-W33`), or its month (`2016-08`)."""
    if by == "day":
        return day.astype(str)
    d = pd.to_datetime(day, errors="coerce")
    if by == "week":
        iso = d.dt.isocalendar()
        return iso["year"].astype(str) + "-W" + iso["week"].astype(int).map("{:02d}".format)
    if by == "month":
        return d.dt.strftime("%Y-%m")
    raise ValueError(f"by must be one of {PERIODS}, got {by!r}")


def budgets(events: pd.DataFrame, by: str = "day") -> pd.DataFrame:
    """Time per activity and period: minutes, frames, events (not short), short events, and the share of the
    period's recorded time. The periods' minutes add up to the recorded time of their days."""
    if events.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    e = events.assign(period=period_of(events["day"], by), long=~events["short"].astype(bool))
    g = (e.groupby(["period", "activity"], sort=True)
          .agg(minutes=("duration_s", lambda s: s.sum() / 60), frames=("n_frames", "sum"), events=("long", "sum"),
               short_events=("short", "sum"))
          .reset_index())
    g["share"] = g["minutes"] / g.groupby("period")["minutes"].transform("sum")
    g[["frames", "events", "short_events"]] = g[["frames", "events", "short_events"]].astype(np.int64)
    return g[SUMMARY_COLUMNS]


def events_of(frames: pd.DataFrame, label: str, confidence: str | None, max_gap_s: float,
              min_event_s: float = MIN_EVENT_S) -> pd.DataFrame:
    """Events of frames from many days (column `day`)."""
    parts = [day_events(g, str(d), label, confidence or "", max_gap_s, min_event_s)
             for d, g in frames.groupby("day", sort=True)]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=EVENT_COLUMNS)


# --- how good the summaries are, on labelled frames --------------------------------------------------------

def budget_error_min(true_events: pd.DataFrame, pred_events: pd.DataFrame) -> float:
    """Sum over (day, activity) of |predicted minutes - true minutes|."""
    def minutes(e: pd.DataFrame) -> pd.Series:
        return e.groupby(["day", "activity"])["duration_s"].sum() / 60 if len(e) else pd.Series(dtype=float)

    t, p = minutes(true_events), minutes(pred_events)
    both = pd.concat([t.rename("t"), p.rename("p")], axis=1).fillna(0.0)
    return float((both["p"] - both["t"]).abs().sum())


def segmental_f1(true_events: pd.DataFrame, pred_events: pd.DataFrame, iou: float = 0.5) -> float:
    """F1 of predicted events against true ones, per day and pooled (temporal action segmentation's F1@k): a
    predicted event is a hit when it overlaps an unmatched true event of its activity with IoU >= ``iou``
    (intervals in time); each true event matches at most once."""
    tp = fp = fn = 0
    days = sorted(set(true_events["day"]) | set(pred_events["day"])) if len(true_events) or len(pred_events) else []
    for d in days:
        t = true_events[true_events["day"] == d]
        p = pred_events[pred_events["day"] == d]
        ts, te = _seconds(t["start"]), _seconds(t["end"])
        used = np.zeros(len(t), dtype=bool)
        tact = t["activity"].to_numpy()
        for ps, pe, pa in zip(_seconds(p["start"]), _seconds(p["end"]), p["activity"]):
            inter = np.clip(np.minimum(te, pe) - np.maximum(ts, ps), 0, None)
            union = np.maximum(te, pe) - np.minimum(ts, ps)
            score = np.where((tact == pa) & ~used, inter / np.where(union > 0, union, 1), -1.0)
            j = int(np.argmax(score)) if len(score) else -1
            if j >= 0 and score[j] >= iou:
                used[j] = True
                tp += 1
            else:
                fp += 1
        fn += int((~used).sum())
    if tp == 0:
        return 0.0 if (fp or fn) else 1.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


def edit_score(true_events: pd.DataFrame, pred_events: pd.DataFrame) -> float:
    """1 - normalised Levenshtein distance between the true and predicted sequences of event activities, per day,
    averaged over days (temporal action segmentation's edit score, as a fraction)."""
    days = sorted(set(true_events["day"]) | set(pred_events["day"])) if len(true_events) or len(pred_events) else []
    if not days:
        return 1.0
    out = []
    for d in days:
        a = list(true_events.loc[true_events["day"] == d].sort_values("start")["activity"])
        b = list(pred_events.loc[pred_events["day"] == d].sort_values("start")["activity"])
        out.append(1.0 - levenshtein(a, b) / max(len(a), len(b), 1))
    return float(np.mean(out))


def levenshtein(a: list, b: list) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _seconds(s: pd.Series) -> np.ndarray:
    return pd.to_datetime(s).to_numpy(dtype="datetime64[ns]").astype(np.int64) / 1e9


EVENT_METRICS = ("budget_error_min", "event_f1_50", "edit_score")


def summary_metrics(frames: pd.DataFrame, true: str, pred: str, max_gap_s: float) -> dict[str, float]:
    """The summaries' quality on labelled frames (`day`, `timestamp`, `image_id` and the two label columns):
    time-budget error in minutes, segmental F1 at IoU 0.5, and the edit score."""
    f = frames.assign(_c=1.0)
    t = events_of(f, true, "_c", max_gap_s)
    p = events_of(f, pred, "_c", max_gap_s)
    return {"budget_error_min": budget_error_min(t, p), "event_f1_50": segmental_f1(t, p, 0.5),
            "edit_score": edit_score(t, p)}


# --- a prediction set's events and summaries ----------------------------------------------------------------

FRAME_READ = ["image_id", "path", "timestamp", "smoothed_label", "smoothed_confidence"]


def write_summaries(out, max_gap_s: float, min_event_s: float = MIN_EVENT_S) -> pd.DataFrame:
    """STUDY/predictions/<name>/: events.parquet and summary_by_{day,week,month}.parquet from the day partitions
    (after the temporal smoother: `smoothed_label`), reading one day at a time. Returns the events."""
    from . import storage

    parts = []
    for part in sorted(p for p in out.iterdir() if p.name.startswith("day=")):
        files = list(storage.files(part, (".parquet",)))
        if not files:
            continue
        frames = pd.concat([storage.read_parquet(f, columns=FRAME_READ) for f in files], ignore_index=True)
        parts.append(day_events(frames, part.name.split("=", 1)[1], max_gap_s=max_gap_s, min_event_s=min_event_s))
    parts = [p for p in parts if len(p)]
    events = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=EVENT_COLUMNS)
    events = events.astype({"duration_s": float, "n_frames": np.int64, "mean_confidence": float, "short": bool})
    storage.write_df_atomic(events, out / "events.parquet")
    for by in PERIODS:
        storage.write_df_atomic(budgets(events, by), out / f"summary_by_{by}.parquet")
    return events


def query(by_day: pd.DataFrame, by: str = "day", activities: list[str] | None = None, date_from: str | None = None,
          date_to: str | None = None) -> pd.DataFrame:
    """`lifelog-ray summary`: summary_by_day's rows between two days (inclusive), re-aggregated by ``by``, the
    share taken within each period of the chosen days (all activities), then only ``activities`` kept."""
    d = by_day.rename(columns={"period": "day"})
    days = pd.to_datetime(d["day"], errors="coerce")
    keep = pd.Series(True, index=d.index)
    if date_from:
        keep &= days >= pd.Timestamp(date_from)
    if date_to:
        keep &= days <= pd.Timestamp(date_to)
    d = d[keep]
    if d.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    g = (d.assign(period=period_of(d["day"], by)).groupby(["period", "activity"], sort=True)
          [["minutes", "frames", "events", "short_events"]].sum().reset_index())
    g["share"] = g["minutes"] / g.groupby("period")["minutes"].transform("sum")
    if activities:
        g = g[g["activity"].isin(activities)]
    return g[SUMMARY_COLUMNS].reset_index(drop=True)


def summarise(study, name: str | None = None, by: str = "day", activity: str | None = None,
              date_from: str | None = None, date_to: str | None = None) -> tuple[pd.DataFrame, str]:
    """(time budget table, prediction set name) for `lifelog-ray summary`; a user's mistake is a one-line error."""
    from . import storage
    from .errors import LifelogError

    root = study / "predictions"
    sets = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []
    if not sets:
        raise LifelogError(f"{study}: no predictions; run `lifelog-ray predict --study {study} --images DIR` first")
    if name is None:
        if len(sets) > 1:
            raise LifelogError(f"{study} has {len(sets)} prediction sets ({', '.join(sets)}); choose one with --predictions")
        name = sets[0]
    if name not in sets:
        raise LifelogError(f"no prediction set {name!r} in {root} (there are: {', '.join(sets)})")
    path = root / name / "summary_by_day.parquet"
    if not path.exists():
        raise LifelogError(f"{root / name} has no summary_by_day.parquet (made by an older version); rerun "
                           f"`lifelog-ray predict` for it")
    if by not in PERIODS:
        raise LifelogError(f"--by {by!r}: choose day, week or month")
    for flag, value in (("--from", date_from), ("--to", date_to)):
        if value is not None and pd.isna(pd.to_datetime(value, format="%Y-%m-%d", errors="coerce")):
            raise LifelogError(f"{flag} {value!r}: not a date (YYYY-MM-DD)")
    if date_from and date_to and date_from > date_to:
        raise LifelogError(f"--from {date_from} is after --to {date_to}")
    by_day = storage.read_parquet(path)
    wanted = None
    if activity:
        known = {a.lower(): a for a in by_day["activity"].unique()}
        asked = [a.strip() for a in activity.split(",") if a.strip()]
        unknown = [a for a in asked if a.lower() not in known]
        if unknown:
            raise LifelogError(f"unknown activity {', '.join(map(repr, unknown))}; the predictions have: "
                               f"{', '.join(sorted(known.values()))}")
        wanted = [known[a.lower()] for a in asked]
    table = query(by_day, by, wanted, date_from, date_to)
    if table.empty:
        days = sorted(by_day["period"]) if len(by_day) else []
        cover = f"{days[0]}..{days[-1]}" if days else "no day"
        what = f" for {', '.join(wanted)}" if wanted else ""
        raise LifelogError(f"no recorded time{what} between {date_from or 'the start'} and {date_to or 'the end'} "
                           f"(the predictions {name!r} cover {cover})")
    return table, name


def format_table(table: pd.DataFrame) -> str:
    """A time budget as people read it: hours:minutes, and the share in percent."""
    t = table.copy()
    t.insert(2, "time", [f"{int(m // 60)}:{int(round(m % 60)):02d}" if round(m % 60) < 60 else f"{int(m // 60) + 1}:00"
                         for m in t["minutes"]])
    t["minutes"] = t["minutes"].round(1)
    t["share"] = (100 * t["share"]).round(1).astype(str) + " %"
    return t.to_string(index=False)


__all__ = ["frame_durations", "day_events", "events_of", "budgets", "period_of", "budget_error_min", "segmental_f1",
           "edit_score", "summary_metrics", "EVENT_COLUMNS", "SUMMARY_COLUMNS", "PERIODS", "EVENT_METRICS",
           "MIN_EVENT_S", "FRAME_S", "write_summaries", "query", "summarise", "format_table"]
