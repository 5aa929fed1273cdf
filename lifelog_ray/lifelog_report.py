"""The report's lifelog sections: for each prediction set, time per activity as a calendar and by week, and its
longest and most confident events with key frames, filterable in the page; and how good the summaries made
from the test split's labels are. Renders what `predict` and `classify` wrote; computes nothing new."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import storage
from .html import escape, png_uri, table, thumb
from .timeline import PALETTE

EVENTS_SHOWN = 60  # the longest and the most confident, each: the table stays small for a year of days
THUMBNAILS = 48  # key frames embedded (the longest events' first); the page stays under ~1 MB for a year


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return png_uri(buf.getvalue())


def calendar_png(by_day: pd.DataFrame, activities: list[str]) -> str:
    """Days (columns) x activities (rows), minutes: one image whatever the number of days."""
    from .plotting import pyplot

    plt = pyplot()

    days = pd.date_range(min(by_day["period"]), max(by_day["period"]))
    grid = (by_day.pivot_table(index="activity", columns="period", values="minutes", aggfunc="sum")
            .reindex(index=activities, columns=days.strftime("%Y-%m-%d")).fillna(0.0))
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.32 * len(activities)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="YlGnBu", interpolation="nearest")
    ax.set_yticks(range(len(activities)), activities, fontsize=8)
    step = max(1, len(days) // 12)
    ax.set_xticks(range(0, len(days), step), days[::step].strftime("%Y-%m-%d"), rotation=45, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax, label="minutes", fraction=0.03)
    fig.tight_layout()
    return _png(fig)


def weekly_png(by_week: pd.DataFrame, activities: list[str]) -> str:
    from .plotting import pyplot

    plt = pyplot()

    wide = by_week.pivot_table(index="period", columns="activity", values="minutes", aggfunc="sum").fillna(0.0)
    wide = wide.reindex(columns=[a for a in activities if a in wide.columns])
    fig, ax = plt.subplots(figsize=(11, 3.4))
    bottom = np.zeros(len(wide))
    for i, a in enumerate(wide.columns):
        ax.bar(range(len(wide)), wide[a] / 60, bottom=bottom, color=PALETTE[i % len(PALETTE)], label=a, width=0.85)
        bottom += wide[a].to_numpy() / 60
    step = max(1, len(wide) // 26)
    ax.set_xticks(range(0, len(wide), step), list(wide.index[::step]), rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("hours")
    ax.legend(fontsize=7, ncol=min(5, len(wide.columns)), loc="upper left", frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _clock(seconds: float) -> str:
    m = int(round(seconds / 60))
    return f"{m // 60}:{m % 60:02d}"


# The events tables' filter, offline. A link may carry one: index.html#ev-NAME?activity=walking&from=2016-08-16
FILTER_JS = """
function lifelogFilter(id){var a=document.getElementById(id+'-act').value,f=document.getElementById(id+'-from').value,
t=document.getElementById(id+'-to').value,n=0;document.querySelectorAll('#'+id+' tbody tr').forEach(function(r){
var ok=(!a||r.dataset.activity===a)&&(!f||r.dataset.day>=f)&&(!t||r.dataset.day<=t);r.style.display=ok?'':'none';
if(ok)n++;});document.getElementById(id+'-n').textContent=n;}
(function(){var h=decodeURIComponent(location.hash.slice(1)),q=h.indexOf('?');if(q<0)return;var id=h.slice(0,q);
if(!document.getElementById(id+'-act'))return;h.slice(q+1).split('&').forEach(function(kv){var p=kv.split('=');
var el=document.getElementById(id+'-'+(p[0]==='activity'?'act':p[0]));if(el)el.value=p[1]||'';});lifelogFilter(id);})();
"""


def events_table(ev: pd.DataFrame, key: str, activities: list[str], options: storage.Options | None) -> str:
    """The longest and the most confident events (not short), with the key frames of the longest embedded,
    and an activity and date filter that works offline."""
    long_ = ev[~ev["short"].astype(bool)]
    shown = pd.concat([long_.nlargest(EVENTS_SHOWN, "duration_s"), long_.nlargest(EVENTS_SHOWN, "mean_confidence")])
    shown = shown.drop_duplicates("event_id").sort_values("start")
    with_thumb = set(long_.nlargest(THUMBNAILS, "duration_s")["event_id"])
    rows = []
    for _, r in shown.iterrows():
        uri = thumb(r["keyframe_path"], options, (120, 90)) if r["event_id"] in with_thumb else None
        img = f"<img alt='{escape(r['keyframe_id'])}' src='{uri}'>" if uri else ""
        rows.append(f"<tr data-activity='{escape(r['activity'])}' data-day='{escape(r['day'])}'>"
                    f"<td class='l'>{escape(r['day'])}</td><td>{pd.Timestamp(r['start']):%H:%M}</td>"
                    f"<td>{pd.Timestamp(r['end']):%H:%M}</td><td>{_clock(r['duration_s'])}</td>"
                    f"<td class='l'>{escape(r['activity'])}</td><td>{int(r['n_frames'])}</td>"
                    f"<td>{100 * r['mean_confidence']:.0f} %</td><td class='kf'>{img}</td></tr>")
    options_html = "".join(f"<option>{escape(a)}</option>" for a in activities)
    days = [escape(d) for d in sorted(ev["day"].astype(str))]  # a received study's data: escaped like the rest
    key = escape(key)
    controls = (f"<p class='filters'>activity <select id='{key}-act' onchange=\"lifelogFilter('{key}')\"><option value=''>"
                f"all</option>{options_html}</select> from <input type='date' id='{key}-from' min='{days[0]}' "
                f"max='{days[-1]}' onchange=\"lifelogFilter('{key}')\"> to <input type='date' id='{key}-to' "
                f"min='{days[0]}' max='{days[-1]}' onchange=\"lifelogFilter('{key}')\"> <span id='{key}-n'>"
                f"{len(rows)}</span> events shown</p>")
    head = "".join(f"<th>{h}</th>" for h in ("day", "start", "end", "time", "activity", "frames", "confidence",
                                             "key frame"))
    return controls + f"<table id='{key}' class='events'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def predictions_sections(study: Path, options: storage.Options | None) -> list[str]:
    root = study / "predictions"
    if not root.exists():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (d / "events.parquet").exists():
            continue
        ev = storage.read_parquet(d / "events.parquet")
        if ev.empty:
            continue
        by_day, by_week = storage.read_parquet(d / "summary_by_day.parquet"), storage.read_parquet(d / "summary_by_week.parquet")
        meta = json.loads((d / "_pipeline.json").read_text("utf-8")) if (d / "_pipeline.json").exists() else {}
        activities = list(by_day.groupby("activity")["minutes"].sum().sort_values(ascending=False).index)
        key = "ev-" + "".join(c if c.isalnum() else "-" for c in d.name)
        totals = (by_day.groupby("activity")[["minutes", "events"]].sum()
                  .reindex(activities).reset_index())
        totals["time"] = [_clock(60 * m) for m in totals["minutes"]]
        totals["share"] = 100 * totals["minutes"] / totals["minutes"].sum()
        pipeline = (f"{meta.get('model', '')} {meta.get('variant', '')}, smoothed with "
                    f"{meta.get('smoothing') or 'no smoother'}") if meta else "the study's best pipeline"
        out += [f"<h2 id='{key}'>Lifelog: {escape(d.name)}</h2>",
                f"<p class='note'>{int(by_day['frames'].sum())} labelled frames on {by_day['period'].nunique()} days "
                f"({escape(by_day['period'].min())} to {escape(by_day['period'].max())}), "
                f"{_clock(60 * by_day['minutes'].sum())} h recorded, {int((~ev['short'].astype(bool)).sum())} events "
                f"(and {int(ev['short'].astype(bool).sum())} short ones, under <code>predict.min_event_s</code>); "
                f"labelled by {escape(pipeline)}. A frame lasts until the next one, at most "
                f"<code>classify.temporal_max_gap_s</code>.</p>",
                table(totals[["activity", "time", "minutes", "events", "share"]]),
                "<h3>Minutes per activity and day</h3>",
                f"<div class='curves'><img alt='calendar {escape(d.name)}' src='{calendar_png(by_day, activities)}'></div>",
                "<h3>Hours per activity and week</h3>",
                f"<div class='curves'><img alt='weeks {escape(d.name)}' src='{weekly_png(by_week, activities)}'></div>",
                f"<h3>The longest and the most confident events</h3>{events_table(ev, key, activities, options)}"]
    if out:
        out.append(f"<script>{FILTER_JS}</script>")
    return out


def summaries_quality_section(results: pd.DataFrame | None, finetune: pd.DataFrame | None) -> list[str]:
    """Events and time budgets made from the test split's predicted labels, against those from its true labels."""
    cols = ["budget_error_min", "event_f1_50", "edit_score"]
    frames = []
    if results is not None and set(cols) <= set(results.columns):
        r = results.assign(pipeline=results["model"] + " / " + results["layer"] + " / " + results["classifier"])
        frames.append(r[["protocol", "pipeline", "temporal", "accuracy", "f1_macro", *cols]])
    if finetune is not None and set(cols) <= set(finetune.columns):
        f = finetune.assign(pipeline=finetune["model"] + " / " + finetune["method"].str.upper(), temporal="none")
        frames.append(f.reindex(columns=["protocol", "pipeline", "temporal", "accuracy", "f1_macro", *cols]))
    if not frames:
        return []
    t = pd.concat(frames, ignore_index=True).dropna(subset=["budget_error_min"])
    if t.empty:
        return []
    for c in ("accuracy", "f1_macro", "event_f1_50", "edit_score"):
        t[c] = 100 * t[c]
    t = t.rename(columns={"budget_error_min": "time-budget error (min)", "event_f1_50": "event F1@50",
                          "edit_score": "edit score"}).sort_values(["protocol", "accuracy"], ascending=[True, False])
    return ["<h2 id='summaries'>How good the lifelog summaries are (test split)</h2>",
            "<p class='note'>The test split's events and time budgets from its true labels, against those from each "
            "pipeline's labels, per image and smoothed: the time-budget error sums |predicted - true minutes| over "
            "every day and activity; event F1@50 counts a predicted event as found when it overlaps a true event of its "
            "activity by IoU &ge; 0.5; the edit score compares the order of events (100 = the same sequence).</p>",
            table(t, highlight_max=["event F1@50", "edit score"])]
