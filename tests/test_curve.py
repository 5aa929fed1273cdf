"""The data-availability curve for both approaches (lifelog_ray/curve.py, powerlaw.py): the same subsets by image
id, resumable fine-tuning runs, a fit that recovers a known exponent, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lifelog_ray import cli
from lifelog_ray.curve import train_subsets, verdict
from lifelog_ray.powerlaw import bootstrap, crossing, fit_power_law

BIN = Path(sys.executable).parent


def test_the_fit_recovers_a_known_power_law_and_its_spread_over_seeds():
    rng = np.random.default_rng(0)
    n = np.repeat([50, 100, 200, 400, 800, 1600], 4).astype(float)
    seed = np.tile(np.arange(4), 6)
    acc = 0.92 - 0.8 * n ** -0.45 + rng.normal(0, 0.002, len(n))
    f = bootstrap(n, acc, seed, fit_power_law(n, acc))
    assert abs(f.c - 0.45) < 0.05 and abs(f.a - 0.92) < 0.01 and f.points == 6 and not f.note
    lo, hi = f.spread["c"]
    assert lo <= f.c <= hi and hi - lo < 0.2
    assert fit_power_law(n[:8], acc[:8]) is None  # two sizes cannot fix three parameters
    assert "exactly determined" in fit_power_law(n[:12], acc[:12]).note
    # a slower starter with a higher ceiling crosses the first within 10x, or not at all
    slow = fit_power_law(n, 0.97 - 3.0 * n ** -0.45)
    cross = crossing(f, slow, 1600)
    assert cross is not None and 1600 < cross <= 16000 and abs(f(cross) - slow(cross)) < 1e-6
    assert crossing(slow, f, 1600) is None  # the higher curve is already ahead: no crossing to report
    assert crossing(f, fit_power_law(n, 0.95 - 4 * n ** -0.45), 1600) is None  # at ~32,000: beyond 10x, not reported


def test_subsets_are_stratified_deterministic_and_keep_every_category():
    pool = pd.DataFrame({"image_id": [f"i{k:03d}" for k in range(100)], "label": ["a"] * 80 + ["b"] * 17 + ["c"] * 3})
    s = train_subsets(pool.sample(frac=1, random_state=1), [0.1, 0.5, 1.0], 2)
    again = train_subsets(pool, [0.1, 0.5, 1.0], 2)
    assert s.reset_index(drop=True).equals(again.reset_index(drop=True))  # whatever order the pool comes in
    tenth = s[(s["fraction"] == 0.1) & (s["seed"] == 0)].merge(pool, on="image_id")
    assert tenth["label"].value_counts().to_dict() == {"a": 8, "b": 2, "c": 1}  # its share, at least one
    assert set(s[(s["fraction"] == 0.1) & (s["seed"] == 0)]["image_id"]) != set(
        s[(s["fraction"] == 0.1) & (s["seed"] == 1)]["image_id"])
    assert len(s[(s["fraction"] == 1.0) & (s["seed"] == 1)]) == 100


def test_the_verdict_is_computed_from_the_data():
    def raw(a2_offset: float) -> pd.DataFrame:
        rows = []
        for n in (100, 200, 400, 800):
            rows.append({"approach": 1, "fraction": n / 800, "n_train": n, "accuracy": 0.9 - 0.9 * n ** -0.5, "seed": 0})
            rows.append({"approach": 2, "fraction": n / 800, "n_train": n, "accuracy": 0.9 - 0.9 * n ** -0.5 + a2_offset,
                         "seed": 0})
        return pd.DataFrame(rows)

    assert verdict(raw(0.01), {}).startswith("Fine-tuning matches or beats")
    text = verdict(raw(-0.05), {})
    assert text.startswith("Fine-tuning stays below the feature pipeline at every measured size, by 5.0 points") and (
        "too few sizes to fit" in text)
    assert verdict(raw(0.0)[lambda r: r["approach"] == 1], {}).startswith("Only Approach 1 ran")


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "0,0.5"], "curve.fractions: Value error, fractions must lie in (0, 1]"),
    (["--fractions", "0.5,2"], "fractions must lie in (0, 1]"),
    (["--fractions", "half"], "expected a comma list of numbers in (0, 1]"),
    (["--seeds", "0"], "curve.seeds: Input should be greater than or equal to 1"),
])
def test_bad_fractions_and_seeds_are_one_line_errors(tmp_path, capsys, argv, message):
    assert cli.main(["curve", "--study", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.fixture(scope="module")
def curve_study(demo_run, tmp_path_factory):
    """A copy of the session's finished study (it fine-tuned M1), so the curve's outputs stay its own."""
    cfg = demo_run.cfg
    root = tmp_path_factory.mktemp("curve") / "study"
    shutil.copytree(cfg.study_dir, root, ignore=shutil.ignore_patterns("_leases", "curve"))
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"study": str(root)})})


def test_a_study_without_fine_tuning(curve_study, tmp_path, capsys, caplog):
    from lifelog_ray.curve import run_curve

    plain = tmp_path / "plain"
    shutil.copytree(curve_study.study_dir, plain, ignore=shutil.ignore_patterns("finetune", "curve"))
    assert cli.main(["curve", "--study", str(plain), "--approach", "2", "--ray-address", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "curve --approach 2: this study has no fine-tuning results" in err[0], err
    cfg = curve_study.model_copy(update={"output": curve_study.output.model_copy(update={"study": str(plain)}),
                                         "curve": curve_study.curve.model_copy(update={
                                             "approach": "both", "fractions": [0.5, 1.0], "seeds": 1})})
    table = run_curve(cfg)
    assert set(table["approach"]) == {1} and "drawing Approach 1 only" in caplog.text
    assert json.loads((plain / "curve" / "curve.json").read_text())["verdict"].startswith("Only Approach 1 ran")


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=60)


@pytest.mark.slow
def test_both_approaches_on_the_same_subsets_resume_after_a_kill_and_never_train_twice(curve_study, ray_local):
    study = curve_study.study_dir
    # no --config: the curve takes the study's own classify and fine-tuning settings (their resolved configs),
    # here with two epochs, so that a run can be killed between them
    # one subset (half the training images, one seed): both approaches on it, one fine-tuning run to kill and resume
    args = ["curve", "--study", str(study), "--fractions", "0.5", "--seeds", "1", "--approach", "both",
            "--ray-address", "local", "--set", "finetune.epochs=2"]
    # the first run in a process of its own, killed with its Ray as a machine going away; the same command
    # then resumes, and runs a third time, in this process (on the session's Ray: a new process adds nothing)
    first = subprocess.Popen([str(BIN / "lifelog-ray"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    ray_dir = study / "curve" / "_ray"
    deadline = time.monotonic() + 900
    try:  # kill it once the first fine-tuning run has checkpointed its first epoch
        while time.monotonic() < deadline and not list(ray_dir.glob("*/checkpoint_*/state.json")):
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.5)
    finally:
        _kill_group(first)
    assert list(ray_dir.glob("*/checkpoint_*/state.json")), "no checkpoint appeared"
    runs = study / "curve" / "runs"
    assert not list(runs.glob("*/metrics.json")), "a run finished before the kill: nothing was interrupted"

    assert cli.main(args) == 0
    raw = pd.read_parquet(study / "curve" / "curve_runs.parquet")
    assert sorted(raw["approach"].unique()) == [1, 2] and len(raw) == 2
    # the same subsets for both approaches, by image id, and they are the recorded ones
    subsets = pd.read_parquet(study / "curve" / "subsets.parquet")
    from lifelog_ray.curve import ids_sha1

    for (f, s), g in raw.groupby(["fraction", "seed"]):
        ids = subsets[(subsets["fraction"] == f) & (subsets["seed"] == s)]["image_id"]
        assert set(g["train_ids_sha1"]) == {ids_sha1(ids)}, (f, s)
        assert g["n_train"].nunique() == 1 and int(g["n_train"].iloc[0]) == len(ids)
    # the interrupted run resumed from its checkpoint: epoch 1 was not trained again
    metrics = {p.parent.name: json.loads(p.read_text()) for p in runs.glob("*/metrics.json")}
    assert len(metrics) == 1
    resumed = [m for m in metrics.values() if m["resumed_at"]]
    assert len(resumed) == 1 and resumed[0]["resumed_at"] == [1], metrics
    history = pd.read_csv(next(p.parent / "history.csv" for p in runs.glob("*/metrics.json")
                               if json.loads(p.read_text())["resumed_at"]))
    assert history["epoch"].tolist() == [1, 2]
    stamps = {n: (runs / n / "metrics.json").stat().st_mtime_ns for n in metrics}

    assert cli.main(args) == 0
    raw = pd.read_parquet(study / "curve" / "curve_runs.parquet")
    assert raw.loc[raw["approach"] == 2, "skipped"].all()  # no (fraction, seed) trained twice
    assert {n: (runs / n / "metrics.json").stat().st_mtime_ns for n in metrics} == stamps
    table = pd.read_csv(study / "curve" / "curve.csv")
    assert {"fraction", "n_train", "accuracy_mean", "accuracy_std", "f1_mean", "f1_std", "runs", "approach",
            "method"} <= set(table.columns)
    assert set(table["method"]) == {"vgg19/m1"} | {m for m in table["method"] if m.count("/") == 2}
    meta = json.loads((study / "curve" / "curve.json").read_text())
    assert meta["approaches"] == [1, 2] and meta["method"] == "vgg19/m1" and meta["verdict"]
    from lifelog_ray.report import build_report

    html = build_report(study).read_text()
    assert "id='curve'" in html and "Approach 2: vgg19/m1" in html and meta["verdict"] in html.replace("&#x27;", "'")
