"""Two evaluation protocols: the paper's per-image split and whole days per split (issue: lifelogs are
sequences). On a lifelog of near-duplicate frames whose scenes change from day to day, the per-image
split scores above the day split: its test images have near-copies from the same minutes in training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lifelog_ray.classify.study import run_classify
from lifelog_ray.config import load_config
from lifelog_ray.extract import run_extract
from lifelog_ray.ingest import build_manifest
from lifelog_ray.report import build_report
from lifelog_ray.results import best_approach1
from tests.helpers import ROOT, frame_name, write_image

ACTIVITIES = ("walking", "car", "eating food")


def sequence_lifelog(root, days: int = 6, run: int = 8, seed: int = 0) -> None:
    """Each day: one run of `run` near-duplicate frames per activity, 30 s apart; an activity's scene
    (its colour) is new each day, as a street or a kitchen looks different from one day to the next."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(days):
        day = f"2016-08-{15 + d:02d}"
        sec = 8 * 3600
        for activity in ACTIVITIES:
            scene = tuple(int(v) for v in rng.integers(20, 235, 3))
            for _ in range(run):
                sec += 30
                rel = frame_name(day, sec)
                write_image(root / rel, scene)
                rows.append((rel, activity))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(root / "labels.csv", index=False)


@pytest.fixture(scope="module")
def both(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("protocol")
    root = tmp / "lifelog"
    sequence_lifelog(root)
    cfg = load_config(None, {
        "data.root": str(root), "data.labels": str(root / "labels.csv"), "output.study": str(tmp / "study"),
        "extract.weights": "none", "extract.image_size": 32, "extract.layers": "fc2", "extract.batch_size": 16,
        "classify.classifiers": "svm,naive_bayes", "classify.protocol": "both",
        "classify.search_space": str(ROOT / "jobs" / "configs" / "search_space_small.yaml"),
        "ray.progress_bars": False,
    })
    build_manifest(cfg)
    run_extract(cfg)
    return cfg, run_classify(cfg)


def test_both_protocols_run_the_whole_selection_each(both):
    cfg, res = both
    out = cfg.study_dir / "classify"
    assert set(res.trials["protocol"]) == {"image", "day"}
    # svm and naive_bayes on fc2, each per image and smoothed
    assert res.results.groupby(["protocol", "temporal"]).size().to_dict() == {
        ("day", "none"): 2, ("day", "smoothed"): 2, ("image", "none"): 2, ("image", "smoothed"): 2}
    preds = pd.read_parquet(out / "predictions.parquet")
    manifest = pd.read_parquet(cfg.study_dir / "manifest.parquet").set_index("image_id")
    for protocol, column in (("image", "split"), ("day", "split_day")):  # each scored on its own test split
        ids = set(preds.loc[preds["protocol"] == protocol, "image_id"])
        assert ids == set(manifest.index[manifest[column] == "test"])
    for clf in ("svm", "naive_bayes"):  # saved apart, each saying its protocol
        assert json.loads((out / "models" / "vgg19" / "fc2" / clf / "pipeline.json").read_text())["protocol"] == "image"
        assert json.loads((out / "models_day" / "vgg19" / "fc2" / clf / "pipeline.json").read_text())["protocol"] == "day"
    assert (out / "table3.md").exists() and "Protocol: day" in (out / "table3__day.md").read_text()


def test_near_duplicates_make_the_per_image_split_score_above_the_day_split(both):
    _, res = both
    best = res.results[res.results["temporal"] == "none"].groupby("protocol")["accuracy"].max()
    assert best["image"] >= best["day"] + 0.2, best.to_dict()


def test_defaults_stay_on_the_papers_protocol_and_the_report_shows_the_gap(both):
    cfg, res = both
    choice = best_approach1(cfg.study_dir)
    image = res.results[(res.results["protocol"] == "image") & (res.results["temporal"] == "none")]
    assert (choice.layer, choice.classifier) in set(zip(image["layer"], image["classifier"]))
    html = build_report(cfg.study_dir).read_text()
    assert "Per-image split vs day split" in html and "accuracy gap" in html and "near-copy" in html
    assert "Test days as timelines (day protocol)" in html and html.count("alt='timeline ") >= 1


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_finetune_trains_and_tests_on_the_day_split(both):
    from lifelog_ray.finetune import run_finetune

    cfg, _ = both
    cfg = cfg.model_copy(deep=True)
    cfg.finetune.protocol = "day"
    cfg.finetune.methods, cfg.finetune.weights, cfg.finetune.image_size = ["m3"], "none", 32
    cfg.finetune.epochs, cfg.finetune.batch_size, cfg.finetune.m3_units = 1, 8, 16
    (run,) = run_finetune(cfg)
    assert run.output.name == "m3__day" and run.protocol == "day"
    results = pd.read_parquet(cfg.study_dir / "finetune" / "results.parquet")
    assert results["protocol"].tolist() == ["day"]
    tested = set(pd.read_parquet(run.output / "predictions.parquet")["image_id"])
    manifest = pd.read_parquet(cfg.study_dir / "manifest.parquet")
    assert tested == set(manifest.loc[manifest["split_day"] == "test", "image_id"])
    done = json.loads((run.output / "metrics.json").read_text())  # a smoother chosen on its validation days
    assert "smoothing" in done and set(done["smoothed_scores"]) >= {"accuracy", "f1_macro"}
    assert "smoothed" in pd.read_parquet(run.output / "predictions.parquet")


CANON = {"walking": (60, 170, 60), "car": (110, 110, 110), "eating food": (200, 140, 80)}


def flickering_lifelog(root, days: int = 6, run: int = 10, jitter: float = 70.0, seed: int = 1) -> None:
    """Each frame alone is ambiguous (its colour jitters far around its activity's), but the activity
    lasts a run of frames: the situation temporal smoothing is for."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(days):
        day = f"2016-09-{1 + d:02d}"
        sec = 9 * 3600
        for _ in range(2):
            for activity in ACTIVITIES:
                for _ in range(run):
                    sec += 30
                    color = tuple(int(v) for v in np.clip(np.array(CANON[activity]) + rng.normal(0, jitter, 3), 0, 255))
                    rel = frame_name(day, sec)
                    write_image(root / rel, color)
                    rows.append((rel, activity))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(root / "labels.csv", index=False)


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_smoothing_chosen_on_validation_raises_day_protocol_macro_f1(tmp_path, ray_local):
    root = tmp_path / "lifelog"
    flickering_lifelog(root)
    cfg = load_config(None, {
        "data.root": str(root), "data.labels": str(root / "labels.csv"), "output.study": str(tmp_path / "study"),
        "extract.weights": "none", "extract.image_size": 32, "extract.layers": "fc2", "extract.batch_size": 16,
        "classify.classifiers": "svm,naive_bayes", "classify.protocol": "day", "classify.temporal": "window",
        "classify.search_space": str(ROOT / "jobs" / "configs" / "search_space_small.yaml"),
        "ray.progress_bars": False,
    })
    build_manifest(cfg)
    run_extract(cfg)
    res = run_classify(cfg).results.set_index(["classifier", "temporal"])
    for clf in ("svm", "naive_bayes"):
        per_image, smoothed = res.loc[(clf, "none")], res.loc[(clf, "smoothed")]
        assert smoothed["smoothing"].startswith("window=")
        assert smoothed["f1_macro"] >= per_image["f1_macro"] + 0.05, (clf, per_image["f1_macro"], smoothed["f1_macro"])


def test_too_few_days_skip_the_day_protocol_under_both_and_fail_it_alone(tmp_path, caplog):
    from lifelog_ray.classify.study import usable_protocols
    from lifelog_ray.errors import LifelogError

    pd.DataFrame({"image_id": ["a", "b", "c"], "split_day": ["train", "train", "val"]}).to_parquet(
        tmp_path / "manifest.parquet")  # two days: no test day
    with caplog.at_level("WARNING"):
        assert usable_protocols(tmp_path, ["image", "day"]) == (["image"], None)
    assert "test empty" in caplog.text and "only the per-image protocol runs" in caplog.text
    with pytest.raises(LifelogError, match="test empty.*--protocol image"):
        usable_protocols(tmp_path, ["day"])
    pd.DataFrame({"image_id": ["a", "b", "c"], "split_day": ["train", "test", "val"]}).to_parquet(
        tmp_path / "manifest.parquet")
    assert usable_protocols(tmp_path, ["image", "day"])[0] == ["image", "day"]
