"""The whole study as users run it: `run` end to end, the offline HTML report, `predict` on a new day."""

from __future__ import annotations

import re
import shutil
import subprocess

import pandas as pd
import pytest

from lifelog_ray.pipeline import run_study
from lifelog_ray.predict import NOT_FRAMES, read_predictions, run_predict


@pytest.fixture()
def study(demo_run):
    return demo_run.cfg, demo_run.output  # the session's one local run of the whole study (conftest.py)


def test_run_executes_every_stage_then_skips_them(study, ray_local):
    cfg, out = study
    for stage in ("manifest", "extract", "classify", "finetune", "predict", "report"):  # the run's closing table
        assert re.search(rf"^  {stage} +done ", out, re.M), out[-3000:]
    # run again, in this process: what is complete and current is skipped (predict, which relabels its images
    # on every run, and report, which is rebuilt, are left out: they are not what this checks)
    again = {r.stage: r.status for r in run_study(cfg, ("manifest", "extract", "classify", "finetune"))}
    assert again["extract"] == again["classify"] == again["finetune"] == "skipped"
    s = cfg.study_dir
    for f in ("manifest.parquet", "rejects.parquet", "categories.csv", "classify/table3.md",
              "finetune/table4.csv", "report/index.html", "config.yaml"):
        assert (s / f).exists(), f


def test_report_is_self_contained_with_tables_and_images(study):
    cfg, _ = study
    html = (cfg.study_dir / "report" / "index.html").read_text()
    for anchor in ("id='dataset'", "id='table3'", "id='table4'", "id='best'", "id='curves'", "id='misclassified'",
                   "id='vgg16-vs-vgg19'", "id='config'", "id='timelines'", "id='smoothing'", "id='summaries'",
                   "id='ev-new-days'"):
        assert anchor in html, anchor
    assert "weights: none" in html and "randomly initialised" in html
    srcs = re.findall(r"src='([^']*)'", html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)  # nothing fetched over the network
    assert not re.search(r"(href|src)=['\"]?https?://", html)
    assert html.count("<table>") >= 7


CHROMIUM = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_renders_in_headless_chromium(study, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    cfg, _ = study
    shot = tmp_path / "report.png"
    page = (cfg.study_dir / "report" / "index.html").as_uri()
    subprocess.run([chromium, *CHROMIUM, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400",
                    f"--screenshot={shot}", page], check=True, timeout=120, capture_output=True)
    from PIL import Image

    im = Image.open(shot).convert("L")
    assert im.size == (1280, 2400)
    hist = im.histogram()
    assert sum(hist[:200]) > 0.02 * im.size[0] * im.size[1]  # text, tables and images drawn, not a blank page
    # the lifelog section's events table, filtered in the page by a link (the browser runs its script)
    events = pd.read_parquet(cfg.study_dir / "predictions" / "new-days" / "events.parquet")
    shown = events[~events["short"]]
    activity = shown["activity"].value_counts().index[-1]
    dom = subprocess.run([chromium, *CHROMIUM, f"--user-data-dir={tmp_path / 'profile2'}", "--dump-dom",
                          f"{page}#ev-new-days?activity={activity}"], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    table = dom.split("id=\"ev-new-days\" class=\"events\"", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr data-activity=\"([^\"]*)\"[^>]*?(style=\"display: none;\")?>", table)
    assert rows and all((act == activity) == (not hidden) for act, hidden in rows), rows
    assert re.search(rf'<span id="ev-new-days-n">{sum(a == activity for a, _ in rows)}</span>', dom)


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_predict_labels_a_new_day_partitioned_by_day(study, tmp_path):
    cfg, _ = study
    from lifelog_ray.sample import write_sample

    new = tmp_path / "newdays"
    write_sample(new, seed=9, days=2, images_per_day=6, image_size=(96, 72))
    (new / "labels.csv").unlink()
    res = run_predict(cfg, str(new), "approach1", "new")
    out, n = res.output, res.images
    df = read_predictions(out)  # the day partitions; events.parquet and the summaries lie beside them
    assert df.equals(pd.read_parquet(out, ignore_prefixes=NOT_FRAMES).astype({"day": str})[df.columns])
    assert len(df) == n == 12 + 3  # 12 drawn images + the sample's 3 broken files
    assert df["image_id"].is_unique
    ok = df[df["error"] == ""]
    assert len(ok) == 12 and ok["predicted_label"].notna().all()
    assert ok["smoothed_label"].notna().all() and ok["smoothed_confidence"].between(0, 1).all()
    assert df.loc[df["error"] != "", "smoothed_label"].isna().all()
    assert list(df.columns[df.columns.get_loc("confidence"):][:3]) == ["confidence", "smoothed_label", "smoothed_confidence"]
    probs = ok[[c for c in df.columns if c.startswith("prob__")]]
    assert ((probs.sum(axis=1) - 1).abs() < 1e-3).all()
    assert set(df["error"]) - {""} <= {"empty_file", "truncated", "not_an_image"}
    assert sorted(p.name for p in out.glob("day=*")) == ["day=2016-08-15", "day=2016-08-16"]
    from PIL import Image

    for day in ("2016-08-15", "2016-08-16"):  # a timeline per day, outside the Parquet partitions
        with Image.open(out / "_timelines" / f"{day}.png") as im:
            assert im.size[0] > 600 and len(im.getcolors(1 << 16) or []) > 10
    # events and time budgets: every labelled frame in exactly one event, the budgets add up to the events
    events = pd.read_parquet(out / "events.parquet")
    assert events["n_frames"].sum() == ok["smoothed_label"].notna().sum() == 12
    assert set(events["day"]) == {"2016-08-15", "2016-08-16"} and events["event_id"].is_unique
    assert set(events["keyframe_id"]) <= set(ok["image_id"])
    for by in ("day", "week", "month"):
        b = pd.read_parquet(out / f"summary_by_{by}.parquet")
        assert abs(b["minutes"].sum() - events["duration_s"].sum() / 60) < 1e-6 and b["frames"].sum() == 12
    assert "events" in res.line() and "(0 already done)" in res.line()

    # Killed half-way, resumed: a run killed while labelling leaves whole parts without smoothed columns (the
    # writer puts each part at once), here the first day's, and no summaries. The same command then labels only
    # the rest, says how many it kept, and ends with the uninterrupted run's frames, events and summaries.
    def tables() -> dict[str, pd.DataFrame]:
        frames = read_predictions(out).sort_values("image_id").reset_index(drop=True)
        return {"frames": frames, **{f: pd.read_parquet(out / f"{f}.parquet") for f in
                                     ("events", "summary_by_day", "summary_by_week", "summary_by_month")}}

    whole = tables()
    kept = out / "day=2016-08-15"
    first = read_predictions(out)
    first = first[first["day"] == "2016-08-15"].drop(columns=["day", "smoothed_label", "smoothed_confidence"])
    for f in list(out.iterdir()):
        if f.name not in ("_run.json",):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    kept.mkdir()
    first.iloc[: len(first) // 2].to_parquet(kept / "part-a.parquet")
    first.iloc[len(first) // 2:].to_parquet(kept / "part-b.parquet")
    again = run_predict(cfg, str(new), "approach1", "new")
    assert f"({len(first)} already done)" in again.line() and again.images == n
    resumed = tables()
    for name, table in whole.items():
        pd.testing.assert_frame_equal(resumed[name], table, check_like=True, obj=name)
    # the fine-tuned model too; another pipeline under the same name replaces the set rather than resuming it
    res2 = run_predict(cfg, str(new), "approach2", "new")
    assert "(0 already done)" in res2.line()
    out2 = res2.output
    assert read_predictions(out2)["predicted_label"].notna().sum() == 12
