"""Beyond the paper: the audit finds injected label flips; the data-availability curve rises with data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lifelog_ray.audit import run_audit
from lifelog_ray.classify.study import run_classify
from lifelog_ray.config import load_config
from lifelog_ray.curve import run_curve
from lifelog_ray.extract import run_extract
from lifelog_ray.ingest import build_manifest
from lifelog_ray.report import build_report


@pytest.fixture(scope="module")
def noisy_study(tmp_path_factory, ray_local):
    from lifelog_ray.sample import write_sample

    tmp = tmp_path_factory.mktemp("audit")
    root = tmp / "lifelog"
    # No spoiled frames (a hand over the lens...): they are hard images, not label errors, and would blur what
    # this measures, how well the audit finds the injected flips.
    write_sample(root, seed=3, days=3, images_per_day=60, image_size=(96, 72), bad_frame=0.0)
    labels = pd.read_csv(root / "labels.csv", keep_default_na=False)
    cfg = load_config(None, {
        "data.root": str(root), "data.labels": str(root / "labels.csv"), "data.top_k": 5,
        "output.study": str(tmp / "study"), "extract.weights": "none", "extract.image_size": 32,
        "extract.layers": "fc2", "classify.classifiers": "svm", "classify.pca": 0.95,
        "ray.progress_bars": False})
    build_manifest(cfg)
    man = pd.read_parquet(tmp / "study" / "manifest.parquet")
    # Inject label flips: 8 % of the study's images get another study category's raw label.
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(man), size=int(0.08 * len(man)), replace=False)
    cats = sorted(man["label"].unique())
    raw_of = {c: man[man["label"] == c]["raw_label"].iloc[0] for c in cats}
    by_path = labels.set_index("image_path")
    flipped_ids = []
    for i in flipped:
        r = man.iloc[i]
        other = [c for c in cats if c != r["label"]][int(rng.integers(len(cats) - 1))]
        by_path.loc[r["rel_path"], "label"] = raw_of[other]
        flipped_ids.append(r["image_id"])
    by_path.reset_index().to_csv(root / "labels.csv", index=False)
    (tmp / "study" / "manifest.parquet").unlink()
    build_manifest(cfg)
    run_extract(cfg)
    run_classify(cfg)
    return cfg, set(flipped_ids)


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_audit_ranks_flipped_labels_far_above_chance(noisy_study):
    cfg, flipped = noisy_study
    out = run_audit(cfg, folds=5, rerun=True)
    k = len(flipped)
    precision_at_k = out.head(k)["image_id"].isin(flipped).mean()
    chance = k / len(out)
    assert precision_at_k >= max(0.5, 4 * chance), (precision_at_k, chance)
    saved = pd.read_parquet(cfg.study_dir / "audit" / "label_issues.parquet")
    assert list(saved.columns[:5]) == ["rank", "image_id", "given_label", "suggested_label", "score"]
    assert (cfg.study_dir / "audit" / "per_category_noise.csv").exists()
    # Before / after: the flagged training images removed, the same test split scored both times.
    ba = pd.read_csv(cfg.study_dir / "audit" / "rerun.csv")
    man = pd.read_parquet(cfg.study_dir / "manifest.parquet")
    train_ids = set(man.loc[man["split"] == "train", "image_id"]) & set(out["image_id"])  # minus extract rejects
    n_flagged_train = int(out[out["is_issue"] & out["image_id"].isin(train_ids)].shape[0])
    assert ba["variant"].tolist() == ["all training images", "flagged training images removed"]
    assert ba["n_train"].tolist() == [len(train_ids), len(train_ids) - n_flagged_train] and n_flagged_train > 0
    assert (ba["n_test"] == int(man.loc[man["split"] == "test", "image_id"].isin(out["image_id"]).sum())).all()
    correct = ba["accuracy"] * ba["n_test"]  # an accuracy over that test split: a whole number of images right
    assert np.allclose(correct, correct.round()) and (correct >= 1).all(), ba


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_curve_rises_within_error_bars_and_reaches_the_report(noisy_study):
    cfg, _ = noisy_study
    s = run_curve(cfg.model_copy(update={"curve": cfg.curve.model_copy(update={"fractions": [0.1, 0.3, 1.0],
                                                                              "seeds": 3})}))
    assert list(s["fraction"]) == [0.1, 0.3, 1.0] and (s["runs"] == 3).all()
    m, e = s["accuracy_mean"].to_numpy(), s["accuracy_std"].to_numpy()
    n_test = int((pd.read_parquet(cfg.study_dir / "manifest.parquet")["split"] == "test").sum())
    step = 1.0 / n_test  # the resolution of an accuracy on this small test split: one image
    for i in range(1, len(m)):
        assert m[i] + e[i] + e[i - 1] + step + 1e-9 >= m[i - 1], s  # monotone within its error bars
    assert m[-1] > m[0]
    html = build_report(cfg.study_dir).read_text()
    assert "id='audit'" in html and "id='curve'" in html and "id='audit-rerun'" in html
