"""Events and time budgets (lifelog_ray/events.py) and `lifelog-ray summary`: what a lifelogger reads, checked
against hand-computed values. No Ray."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from lifelog_ray import cli
from lifelog_ray.events import (
    FRAME_S,
    budget_error_min,
    budgets,
    day_events,
    edit_score,
    events_of,
    frame_durations,
    query,
    segmental_f1,
    summary_metrics,
    write_summaries,
)


def frames(day: str, spec: list[tuple[str, str, float]], start: str = "08:00:00") -> pd.DataFrame:
    """(time offset 'HH:MM:SS' from the day's start, label, confidence) -> a day's frames."""
    t0 = pd.Timestamp(f"{day} {start}")
    rows = []
    for k, (offset, label, conf) in enumerate(spec):
        h, m, s = (int(x) for x in offset.split(":"))
        ts = t0 + pd.Timedelta(hours=h, minutes=m, seconds=s)
        rows.append({"image_id": f"{day}-{k:03d}", "path": f"/{day}/{k}.jpg", "timestamp": str(ts),
                     "smoothed_label": label, "smoothed_confidence": conf, "day": day})
    return pd.DataFrame(rows)


def test_a_frame_lasts_until_the_next_capped_at_the_max_gap():
    t = pd.to_datetime(["2016-08-15 08:00:00", "2016-08-15 08:00:30", "2016-08-15 08:01:00",
                        "2016-08-15 09:00:00"]).to_numpy()
    # 30, 30, then an hour's gap capped at 300; the last frame gets the day's median interval (30)
    assert frame_durations(t, 300).tolist() == [30.0, 30.0, 300.0, 30.0]
    assert frame_durations(t[:1], 300).tolist() == [FRAME_S]  # a day's only frame
    assert frame_durations(t[:1], 10).tolist() == [10.0]


def test_runs_become_events_a_gap_ends_one_and_a_stray_frame_is_flagged():
    day = frames("2016-08-15", [
        ("00:00:00", "walking", 0.6), ("00:00:30", "walking", 0.9), ("00:01:00", "walking", 0.9),  # tie: first wins
        ("00:01:30", "eating food", 0.4),  # one stray frame between two runs of walking
        ("00:02:00", "walking", 0.7), ("00:02:30", "walking", 0.8),
        ("01:00:00", "walking", 0.5), ("01:00:30", "walking", 0.5)])  # after an hour's gap: a new event
    ev = day_events(day, "2016-08-15", max_gap_s=300, min_event_s=60)
    assert ev["activity"].tolist() == ["walking", "eating food", "walking", "walking"]
    assert ev["n_frames"].tolist() == [3, 1, 2, 2]
    assert ev["duration_s"].tolist() == [90.0, 30.0, 330.0, 60.0]  # the frame before the gap lasts 300 s
    assert ev["short"].tolist() == [False, True, False, False]
    assert ev["keyframe_id"].tolist() == ["2016-08-15-001", "2016-08-15-003", "2016-08-15-005", "2016-08-15-006"]
    assert ev["event_id"].tolist() == [f"2016-08-15#{k:04d}" for k in range(1, 5)]
    assert ev["mean_confidence"].round(3).tolist() == [0.8, 0.4, 0.75, 0.5]
    assert str(ev["start"][0]) == "2016-08-15 08:00:00" and str(ev["end"][0]) == "2016-08-15 08:01:30"
    assert ev["keyframe_path"][0] == "/2016-08-15/1.jpg"


def test_a_day_with_one_frame_unlabelled_frames_and_an_evening_past_midnight():
    one = day_events(frames("2016-08-16", [("00:00:00", "car", 0.9)]), "2016-08-16")
    assert one[["n_frames", "duration_s", "short"]].values.tolist() == [[1, FRAME_S, True]]
    # unreadable frames (no label) and frames without a time belong to no event and do not split one; an
    # unreadable frame's 30 s are nobody's
    day = frames("2016-08-17", [("00:00:00", "walking", 0.9), ("00:00:30", None, np.nan),
                                ("00:01:00", "walking", 0.9)])
    day.loc[3] = {**day.loc[0], "image_id": "notime", "timestamp": "not a time"}
    ev = day_events(day, "2016-08-17")
    assert ev["n_frames"].tolist() == [2] and ev["duration_s"].tolist() == [60.0]
    # the day folder 2016-08-15 runs past midnight: one event, still on its day
    late = frames("2016-08-15", [("00:00:00", "watching tv", 0.9), ("00:01:00", "watching tv", 0.9),
                                 ("00:02:00", "watching tv", 0.9), ("00:03:00", "watching tv", 0.9)], start="23:58:00")
    ev = day_events(late, "2016-08-15")
    assert len(ev) == 1 and ev["day"][0] == "2016-08-15" and ev["duration_s"][0] == 240.0
    assert str(ev["end"][0]) == "2016-08-16 00:02:00"


def test_budgets_add_up_to_the_recorded_time_by_day_week_and_month():
    rng = np.random.default_rng(0)
    days = []
    for d in pd.date_range("2016-08-28", "2016-09-05").strftime("%Y-%m-%d"):  # across a month and ISO weeks
        labels = rng.choice(["walking", "car", "eating food"], size=40)
        spec = [(f"00:{k // 2:02d}:{30 * (k % 2):02d}", str(lab), 0.8) for k, lab in enumerate(labels)]
        days.append(frames(d, spec))
    f = pd.concat(days, ignore_index=True)
    ev = events_of(f, "smoothed_label", "smoothed_confidence", 300)
    recorded = sum(frame_durations(pd.to_datetime(g["timestamp"]).sort_values().to_numpy(), 300).sum()
                   for _, g in f.groupby("day")) / 60
    for by, n in (("day", 9), ("week", 3), ("month", 2)):  # Sunday 08-28 to Monday 09-05: three ISO weeks
        b = budgets(ev, by)
        assert b["period"].nunique() == n, by
        assert abs(b["minutes"].sum() - recorded) < 1e-9 and b["frames"].sum() == len(f)
        assert np.allclose(b.groupby("period")["share"].sum(), 1.0)
    assert set(budgets(ev, "week")["period"]) == {"2016-W34", "2016-W35", "2016-W36"}
    assert set(budgets(ev, "month")["period"]) == {"2016-08", "2016-09"}


def test_summary_metrics_against_hand_computed_values():
    true = pd.DataFrame({"day": ["d"] * 3, "activity": ["a", "b", "a"],
                         "start": pd.to_datetime(["2016-01-01 08:00", "2016-01-01 08:10", "2016-01-01 08:20"]),
                         "end": pd.to_datetime(["2016-01-01 08:10", "2016-01-01 08:20", "2016-01-01 08:30"]),
                         "duration_s": [600.0, 600.0, 600.0]})
    pred = pd.DataFrame({"day": ["d"] * 2, "activity": ["a", "a"],
                         "start": pd.to_datetime(["2016-01-01 08:00", "2016-01-01 08:14"]),
                         "end": pd.to_datetime(["2016-01-01 08:14", "2016-01-01 08:30"]),
                         "duration_s": [840.0, 960.0]})
    # minutes: true a 20, b 10; predicted a 30 -> |30-20| + |0-10| = 20
    assert budget_error_min(true, pred) == 20.0
    # IoU(pred 1, true a1) = 10/14 >= .5: hit; pred 2 vs true a2 = 10/16 >= .5: hit; true b unmatched
    assert segmental_f1(true, pred, 0.5) == pytest.approx(2 * 1.0 * (2 / 3) / (1.0 + 2 / 3))
    assert segmental_f1(true, pred, 0.7) == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))  # only 10/14 passes
    assert edit_score(true, pred) == pytest.approx(1 - 1 / 3)  # [a, b, a] -> [a, a]: one deletion
    assert segmental_f1(true, true) == 1.0 and edit_score(true, true) == 1.0 and budget_error_min(true, true) == 0.0


def known_runs_day(rng, day: str, flip: float) -> pd.DataFrame:
    """A day of activity runs (20-40 frames, 30 s apart) whose per-image labels are wrong on ``flip`` of the frames,
    as noisy class probabilities."""
    classes = ["walking", "car", "eating food", "working"]
    true, t = [], 0
    while len(true) < 300:
        true += [classes[rng.integers(len(classes))]] * int(rng.integers(20, 40))
    true = true[:300]
    probs = np.full((300, len(classes)), 0.1)
    for k, c in enumerate(true):
        wrong = rng.random() < flip
        probs[k, rng.integers(len(classes)) if wrong else classes.index(c)] += 1.0
    probs /= probs.sum(1, keepdims=True)
    ts = pd.Timestamp(f"{day} 08:00") + pd.to_timedelta(30 * np.arange(300) + t, unit="s")
    return pd.DataFrame({"image_id": [f"{day}-{k}" for k in range(300)], "day": day, "timestamp": ts.astype(str),
                         "true": true, **{f"p{i}": probs[:, i] for i in range(len(classes))}}), classes


def test_smoothing_lowers_the_time_budget_error_on_a_lifelog_with_known_runs():
    from lifelog_ray.temporal import Smoother, sequences

    rng = np.random.default_rng(4)
    days = []
    for d in ("2016-08-15", "2016-08-16", "2016-08-17"):
        f, classes = known_runs_day(rng, d, flip=0.25)
        days.append(f)
    f = pd.concat(days, ignore_index=True)
    probs = f[[f"p{i}" for i in range(len(classes))]].to_numpy()
    f["per_image"] = np.asarray(classes)[probs.argmax(1)]
    seqs = sequences(f["day"].to_numpy(), f["timestamp"].to_numpy(), 300)
    f["smoothed"] = np.asarray(classes)[Smoother("window", 9).apply(probs, seqs).argmax(1)]
    raw, smooth = summary_metrics(f, "true", "per_image", 300), summary_metrics(f, "true", "smoothed", 300)
    assert smooth["budget_error_min"] < raw["budget_error_min"]
    assert smooth["event_f1_50"] > raw["event_f1_50"] and smooth["edit_score"] > raw["edit_score"]


@pytest.fixture
def prediction_set(tmp_path):
    """STUDY/predictions/week/: day partitions as predict writes them, and their events and summaries."""
    out = tmp_path / "study" / "predictions" / "week"
    rng = np.random.default_rng(1)
    for d in pd.date_range("2016-09-26", "2016-10-04").strftime("%Y-%m-%d"):  # two ISO weeks, two months
        runs = [("commuting", 20), ("working", 60), ("eating food", 15), ("commuting", 25)]
        spec, k = [], 0
        for lab, n in runs:
            for _ in range(n):
                spec.append((f"00:{k // 2:02d}:{30 * (k % 2):02d}", lab, float(rng.uniform(0.5, 1))))
                k += 1
        f = frames(d, spec).drop(columns="day")
        (out / f"day={d}").mkdir(parents=True)
        f.to_parquet(out / f"day={d}" / "smoothed-0.parquet")
    write_summaries(out, 300, 60)
    return tmp_path / "study", out


def test_the_summary_command_filters_by_activity_and_period(prediction_set, capsys):
    study, out = prediction_set
    assert cli.main(["summary", "--study", str(study), "--by", "week", "--activity", "Commuting", "--from",
                     "2016-09-26", "--to", "2016-09-30", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # commuting: 45 frames of 30 s a day, Mon-Fri of ISO week 39
    assert [(r["period"], r["activity"], r["frames"], round(r["minutes"], 6)) for r in rows] == [
        ("2016-W39", "commuting", 5 * 45, 5 * 45 * 0.5)]
    assert rows[0]["events"] == 10 and abs(rows[0]["share"] - 45 / 120) < 1e-9
    assert cli.main(["summary", "--study", str(study), "--by", "month"]) == 0
    table = capsys.readouterr().out
    assert "time per activity by month (week):" in table and "2016-09" in table and "2016-10" in table
    # eating: 15 frames of 30 s a day; 5 days in September, 4 in October
    assert re.search(r"2016-09 +eating food 0:38 +37.5", table) and re.search(r"2016-10 +eating food 0:30 +30.0", table)
    assert cli.main(["summary", "--study", str(study), "--format", "csv"]) == 0
    csv = capsys.readouterr().out.splitlines()
    assert csv[0] == "period,activity,minutes,frames,events,short_events,share" and len(csv) == 1 + 9 * 3


@pytest.mark.parametrize("argv, message", [
    (["--activity", "skiing"], "unknown activity 'skiing'; the predictions have: commuting, eating food, working"),
    (["--from", "2017-01-01"], "no recorded time between 2017-01-01 and the end (the predictions 'week' cover "
                               "2016-09-26..2016-10-04)"),
    (["--from", "2016-13-01"], "--from '2016-13-01': not a date (YYYY-MM-DD)"),
    (["--from", "2016-10-02", "--to", "2016-10-01"], "--from 2016-10-02 is after --to 2016-10-01"),
    (["--predictions", "nope"], "no prediction set 'nope'"),
])
def test_the_summary_commands_mistakes_are_one_line_errors(prediction_set, capsys, argv, message):
    study, _ = prediction_set
    assert cli.main(["summary", "--study", str(study), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_study_without_predictions(tmp_path, capsys):
    (tmp_path / "s").mkdir()
    assert cli.main(["summary", "--study", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no predictions; run `lifelog-ray predict" in err


def test_the_readmes_duckdb_query_gives_the_same_budgets(prediction_set):
    from pathlib import Path

    import duckdb

    _, out = prediction_set
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sql = re.search(r"```sql\n(.*?)```", readme, re.S).group(1)
    got = duckdb.sql(sql.replace("demo/study/predictions/new-days", str(out))).df()
    mine = pd.read_parquet(out / "summary_by_day.parquet")
    merged = got.merge(mine, left_on=["day", "activity"], right_on=["period", "activity"])
    assert len(merged) == len(mine) == len(got)
    assert np.allclose(merged["minutes_x"], merged["minutes_y"]) and (merged["events_x"] == merged["events_y"]).all()
    # and the frames beside the events: the day partitions only
    frames_ = pd.read_parquet(out, ignore_prefixes=["events", "summary_", "_", "."])
    assert len(frames_) == 9 * 120 and frames_["image_id"].is_unique
    again = query(mine, "day")  # re-aggregating the days by day gives the days back
    assert np.allclose(again["minutes"], mine["minutes"]) and np.allclose(again["share"], mine["share"])
