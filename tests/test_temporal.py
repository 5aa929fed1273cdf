"""Temporal smoothing: sequences break at days and time gaps; the window and the HMM fix flickers; the
smoother is chosen on validation; classifiers without predict_proba get a softmaxed decision function."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.svm import SVC

from lifelog_ray.metrics import scores
from lifelog_ray.temporal import Smoother, choose, class_scores, sequences, smooth_window, viterbi


def test_sequences_are_time_ordered_and_break_at_days_and_gaps():
    day = np.array(["d2", "d1", "d1", "d1", "d1", "d2"])
    t = pd.to_datetime(["2016-08-16 08:00:00", "2016-08-15 08:01:00", "2016-08-15 08:00:00",
                        "2016-08-15 09:00:00", "2016-08-15 08:01:30", "2016-08-16 08:00:30"]).to_numpy()
    seqs = [s.tolist() for s in sequences(day, t, max_gap_s=300)]
    assert seqs == [[2, 1, 4], [3], [0, 5]]  # 09:00 is an hour after 08:01:30: a sequence of its own


def test_window_and_hmm_remove_a_one_frame_flicker_and_stay_in_their_sequence():
    p = np.array([[0.9, 0.1]] * 3 + [[0.4, 0.6]] + [[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 2, dtype=float)
    seqs = [np.arange(7), np.arange(7, 9)]  # the last two frames are another sequence: not outvoted
    for smoothed in (smooth_window(p, seqs, 3), viterbi(p, seqs, penalty=2.0)):
        assert np.argmax(smoothed, axis=1).tolist() == [0] * 7 + [1, 1]
    np.testing.assert_allclose(smooth_window(p, seqs, 1), p)


def test_the_smoother_is_chosen_on_validation_and_none_when_nothing_helps():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 10)
    p = np.full((30, 3), 0.1) + np.eye(3)[y] * 0.5
    flick = rng.choice(30, 8, replace=False)
    p[flick] = np.eye(3)[(y[flick] + 1) % 3] * 0.9 + 0.05  # 8 wrong frames inside the runs
    seqs = [np.arange(30)]
    f1 = lambda a, b: scores(a, b)["f1_macro"]  # noqa: E731
    best = choose("window", p, y, seqs, f1)
    assert isinstance(best, Smoother) and f1(y, np.argmax(best.apply(p, seqs), 1)) > f1(y, np.argmax(p, 1))
    assert choose("none", p, y, seqs, f1) is None
    clean = np.eye(3)[y]
    assert choose("window", clean, y, seqs, f1) is None  # already perfect: no smoother is better
    assert Smoother.parse(best.describe()) == best


def test_class_scores_softmax_the_decision_function_without_predict_proba():
    X = np.r_[np.random.default_rng(0).normal(0, 1, (20, 2)), np.random.default_rng(1).normal(4, 1, (20, 2)),
              np.random.default_rng(2).normal((0, 5), 1, (20, 2))]
    y = np.repeat(np.arange(3), 20)
    s = class_scores(SVC().fit(X, y), X, 3)
    np.testing.assert_allclose(s.sum(axis=1), 1.0)
    assert (np.argmax(s, axis=1) == SVC().fit(X, y).predict(X)).mean() > 0.95


def test_predict_writes_the_smoothed_label_beside_the_per_image_one(tmp_path):
    from lifelog_ray.predict import smooth_days

    part = tmp_path / "pred" / "day=2016-08-15"
    part.mkdir(parents=True)
    t = pd.date_range("2016-08-15 08:00", periods=7, freq="30s").astype(str).tolist()
    p0 = [0.9, 0.8, 0.9, 0.4, 0.9, 0.8, np.nan]  # a one-frame flicker at 08:01:30; the last file is unreadable
    pd.DataFrame({"image_id": [f"i{k}" for k in range(7)], "timestamp": t, "error": [""] * 6 + ["truncated"],
                  "predicted_label": ["a", "a", "a", "b", "a", "a", None], "confidence": [0.9] * 7,
                  "prob__a": p0, "prob__b": [1 - v for v in p0]}).to_parquet(part / "part-0.parquet")
    smooth_days(tmp_path / "pred", Smoother("window", 3), max_gap_s=300)
    df = pd.read_parquet(tmp_path / "pred")
    assert df["predicted_label"].tolist()[:6] == ["a", "a", "a", "b", "a", "a"]  # per image: unchanged
    assert df["smoothed_label"].tolist()[:6] == ["a"] * 6 and pd.isna(df["smoothed_label"].iloc[6])
    assert [p.name for p in part.iterdir()] == ["smoothed-0.parquet"]


def test_a_fine_tuned_model_is_smoothed_by_the_window_chosen_on_its_validation_split(tmp_path):
    from lifelog_ray.finetune import smooth_on_validation
    from lifelog_ray.predict import Choice, pipeline_smoother

    # one day, frames 30 s apart; the model's probabilities flicker to the wrong class on single frames
    ids = [f"f{i}" for i in range(40)]
    manifest = pd.DataFrame({"image_id": ids, "day": "2016-08-15",
                             "timestamp": pd.date_range("2016-08-15 08:00", periods=40, freq="30s")})
    y = np.repeat([0, 1], 10)
    proba = np.eye(2)[y] * 0.6 + 0.2
    proba[[3, 7, 12, 16]] = proba[[3, 7, 12, 16]][:, ::-1]  # flickers
    val = {"image_id": np.array(ids[:20]), "y_true": y, "y_pred": proba.argmax(1), "proba": proba}
    test = {"image_id": np.array(ids[20:]), "y_true": y, "y_pred": proba.argmax(1), "proba": proba}
    smoother, smoothed = smooth_on_validation(manifest, "window", 300, val, test)
    assert smoother is not None and (smoothed == y).all() and (test["y_pred"] != y).sum() == 4
    assert smooth_on_validation(manifest, "none", 300, val, test)[0] is None
    run = tmp_path / "finetune" / "vgg19" / "m2"  # predict reads the run's choice back
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(f'{{"smoothing": "{smoother.describe()}"}}')
    assert pipeline_smoother(tmp_path, Choice(2, "vgg19", "m2", 0.9)).describe() == smoother.describe()
    (run / "metrics.json").write_text("{}")  # a run from before smoothers were chosen
    assert pipeline_smoother(tmp_path, Choice(2, "vgg19", "m2", 0.9)) is None
