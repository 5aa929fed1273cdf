"""Ingest: every layout, taxonomy merge, top-k, stratified deterministic split, growth, every reject reason."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import write_image

from lifelog_ray.config import ConfigError, load_config
from lifelog_ray.ingest import IngestError, assign_splits, build_manifest, largest_remainder
from lifelog_ray.taxonomy import Taxonomy


def cfg_for(study: Path, **data):
    return load_config(None, {**{f"data.{k}": v for k, v in data.items()}, "output.study": str(study)})


def make_lsc(root: Path, per_class: dict[str, int], day: str = "2016-08-15") -> list[tuple[str, str]]:
    rows = []
    sec = 0
    for label, n in per_class.items():
        for _ in range(n):
            sec += 30
            hh, mm, ss = 8 + sec // 3600, (sec // 60) % 60, sec % 60
            rel = f"{day}/{day.replace('-', '')}_{hh:02d}{mm:02d}{ss:02d}_000.jpg"
            write_image(root / rel)
            rows.append((rel, label))
    return rows


def write_labels(path: Path, rows, header=("image_path", "label")) -> Path:
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


def check_accounting(res) -> None:
    assert len(res.manifest) + len(res.rejects) == res.input_rows
    assert res.manifest["image_id"].is_unique


def test_lsc_layout_taxonomy_merge_and_outputs(tmp_path):
    root = tmp_path / "lifelog"
    rows = make_lsc(root, {"eating apple": 5, "Eating  Curd": 5, "In bedroom": 6, "in a BEDROOM": 4})
    labels = write_labels(tmp_path / "labels.csv", rows)
    res = build_manifest(cfg_for(tmp_path / "study", root=str(root), labels=str(labels)))
    check_accounting(res)
    assert set(res.manifest["label"]) == {"Eating", "At home"}
    assert (res.manifest["label"] == "At home").sum() == 10
    m = pd.read_parquet(tmp_path / "study" / "manifest.parquet")
    for col in ("image_id", "path", "raw_label", "label", "split", "timestamp", "day"):
        assert col in m.columns
    assert m["image_id"].iloc[0].startswith("20160815_")
    assert (m["day"] == "2016-08-15").all()
    assert m["timestamp"].notna().all()
    cats = pd.read_csv(tmp_path / "study" / "categories.csv")
    assert list(cats.columns) == ["category", "total", "train", "val", "test", "train_day", "val_day", "test_day"]
    assert cats["total"].sum() == 20
    assert (tmp_path / "study" / "config.yaml").exists()


def test_top_k_and_stratified_split_counts(tmp_path):
    root = tmp_path / "lifelog"
    sizes = {"walking": 37, "car": 23, "drinking coffee": 11, "watching tv": 7, "writing": 4}
    rows = make_lsc(root, sizes)
    labels = write_labels(tmp_path / "labels.csv", rows)
    res = build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(labels), top_k=3))
    check_accounting(res)
    assert set(res.manifest["label"]) == {"Walking", "Commuting in car", "Drinking"}
    assert (res.rejects["reason"] == "not_in_top_k").sum() == 7 + 4
    for label, n in [("Walking", 37), ("Commuting in car", 23), ("Drinking", 11)]:
        counts = res.manifest[res.manifest["label"] == label]["split"].value_counts()
        for split, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
            assert abs(counts.get(split, 0) - n * frac) <= 1, (label, split, counts)


def test_split_is_deterministic_and_seeded(tmp_path):
    root = tmp_path / "lifelog"
    labels = write_labels(tmp_path / "labels.csv", make_lsc(root, {"walking": 20, "car": 15}))
    a = build_manifest(cfg_for(tmp_path / "a", root=str(root), labels=str(labels), seed=3)).manifest
    b = build_manifest(cfg_for(tmp_path / "b", root=str(root), labels=str(labels), seed=3)).manifest
    c = build_manifest(cfg_for(tmp_path / "c", root=str(root), labels=str(labels), seed=4)).manifest
    pd.testing.assert_frame_equal(a[["image_id", "split"]], b[["image_id", "split"]])
    assert not a["split"].equals(c["split"])


def test_growing_lifelog_keeps_earlier_splits(tmp_path):
    root = tmp_path / "lifelog"
    rows = make_lsc(root, {"walking": 20, "car": 10}, day="2016-08-15")
    labels = write_labels(tmp_path / "labels.csv", rows)
    study = tmp_path / "study"
    first = build_manifest(cfg_for(study, root=str(root), labels=str(labels))).manifest
    rows += make_lsc(root, {"walking": 15, "car": 12}, day="2016-08-16")
    write_labels(labels, rows)
    res = build_manifest(cfg_for(study, root=str(root), labels=str(labels)))
    second = res.manifest
    merged = first.merge(second, on="image_id", suffixes=("_1", "_2"))
    assert len(merged) == len(first) and (merged["split_1"] == merged["split_2"]).all()
    assert res.kept_splits == len(first)
    for label in ("Walking", "Commuting in car"):
        counts = second[second["label"] == label]["split"].value_counts()
        n = counts.sum()
        for split, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
            assert abs(counts.get(split, 0) - n * frac) <= 1.5


def test_every_ingest_reject_reason(tmp_path):
    root = tmp_path / "lifelog"
    rows = make_lsc(root, {"walking": 6, "car": 6, "writing": 1, "gardening": 2})
    outside = write_image(tmp_path / "outside.jpg")
    os.symlink(outside, root / "2016-08-15" / "link_out.jpg")
    write_image(tmp_path / "elsewhere" / "20160815_200000_000.jpg")
    os.symlink(tmp_path / "elsewhere", root / "elsewhere")  # a folder link out of the root
    (root / "notes.txt").write_text("x")
    rows += [
        ("../outside.jpg", "walking"),  # escapes the root
        (str(outside), "walking"),  # absolute path
        ("2016-08-15/link_out.jpg", "walking"),  # symlink out of the root
        ("elsewhere/20160815_200000_000.jpg", "walking"),  # under a folder link out of the root
        ("2016-08-15/nope_000.jpg", "walking"),  # missing file
        ("notes.txt", "walking"),  # not an image file type
        (rows[0][0], ""),  # unlabeled (and a duplicate path, but unlabeled is reported first)
        (rows[1][0], "walking"),  # duplicate
        ("./" + rows[3][0].replace("/", "//"), "walking"),  # the same file spelled otherwise: a duplicate
        (rows[2][0], "staring at the wall"),  # not in the taxonomy
    ]
    labels = write_labels(tmp_path / "labels.csv", rows)
    write_image(root / "2016-08-15" / "20160815_230000_000.jpg")  # on disk, in no CSV row: unlabeled
    res = build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(labels), top_k=3))
    check_accounting(res)
    reasons = res.rejects["reason"].value_counts().to_dict()
    assert reasons["path_outside_root"] == 4
    assert reasons["missing_file"] == 1
    assert reasons["unsupported_extension"] == 1
    assert reasons["unlabeled"] == 2
    assert reasons["duplicate"] == 2  # rows[1] and rows[3] again (rows[2] again is caught by its label first)
    spelled = res.rejects[res.rejects["path"].str.startswith("./")]
    assert spelled["detail"].tolist() == ["same file as input row 3"], spelled
    assert reasons["label_not_in_taxonomy"] == 1
    assert reasons["not_in_top_k"] == 1  # gardening is the 3rd largest; writing (1 image) is 4th
    assert reasons["category_too_small"] == 2  # gardening: 2 images cannot fill 3 splits
    saved = pd.read_parquet(tmp_path / "s" / "rejects.parquet")
    assert set(saved["stage"]) == {"ingest"} and len(saved) == len(res.rejects)
    assert saved["reason"].notna().all() and saved["detail"].notna().all()


def test_outside_root_allowed_explicitly(tmp_path):
    root = tmp_path / "lifelog"
    rows = make_lsc(root, {"walking": 6})
    rows.append((str(write_image(tmp_path / "20160815_120000_000.jpg")), "walking"))
    labels = write_labels(tmp_path / "labels.csv", rows)
    res = build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(labels), allow_outside_root=True))
    assert len(res.manifest) == 7


def test_csv_layout_with_path_column(tmp_path):
    root = tmp_path / "imgs"
    rows = []
    for i in range(9):
        rel = f"a/img{i}.png" if i % 2 else f"b/img{i}.JPG"
        write_image(root / rel)
        rows.append((rel, "walking" if i < 5 else "car"))
    labels = write_labels(tmp_path / "l.csv", rows, header=("path", "label"))
    res = build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(labels), layout="csv"))
    check_accounting(res)
    assert len(res.manifest) == 9
    assert set(res.manifest["image_id"]) >= {"a__img1", "b__img0"}
    assert (res.manifest["day"] == "unknown").all()  # no time in name, no EXIF


def test_folder_layout_reads_exif_time(tmp_path):
    check_exif_folder(tmp_path)


def test_many_exif_reads_run_as_ray_tasks(tmp_path, ray_local, monkeypatch, caplog):
    import lifelog_ray.ingest as ingest

    monkeypatch.setattr(ingest, "EXIF_TASK_SIZE", 3)  # 8 frames without a time in their names: 3 tasks
    with caplog.at_level("INFO", logger="lifelog_ray.ingest"):
        check_exif_folder(tmp_path)
    assert "EXIF time of 8 frame(s) in 3 Ray task(s)" in caplog.text


def check_exif_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "tree"
    for label in ("Walking", "Eating"):
        for i in range(4):
            p = root / label / f"x{i}.jpg"
            write_image(p)
            im = Image.open(p)
            exif = Image.Exif()
            exif.get_ifd(0x8769)[36867] = f"2019:01:0{i + 1} 10:00:00"
            im.save(p, exif=exif.tobytes())
    res = build_manifest(cfg_for(tmp_path / "s", root=str(root), layout="folder"))
    assert len(res.manifest) == 8
    assert sorted(res.manifest["day"].unique()) == ["2019-01-01", "2019-01-02", "2019-01-03", "2019-01-04"]


def test_predict_lists_a_folder_as_ingest_derives_each_frame(tmp_path):
    """predict's listing derives ids, times and days a column at a time (a multi-year folder of new days): the same
    values as the per-frame functions, for names with a time, EXIF-only frames, and frames with neither."""
    from PIL import Image

    from lifelog_ray.ingest import day_of, derive_image_id, timestamp_from_exif, timestamp_from_name
    from lifelog_ray.predict import list_images

    root = tmp_path / "new"
    for rel in ("2016-08-15/20160815_101530_000.jpg", "2016-08-15/b00001_21i6x0_20160815_101600e.jpg",
                "phone/IMG_0001.jpg", "phone/IMG_0002.jpg", "2016-08-17/frame.jpg", "misc/untimed.jpg"):
        write_image(root / rel)
    for i, rel in enumerate(("phone/IMG_0001.jpg", "phone/IMG_0002.jpg")):
        p = root / rel
        exif = Image.Exif()
        exif.get_ifd(0x8769)[36867] = f"2019:01:0{i + 1} 10:00:00"
        Image.open(p).save(p, exif=exif.tobytes())
    cfg = cfg_for(tmp_path / "s", root=str(root), layout="folder")
    for listed in (list_images(str(root), (".jpg",)), list_images(str(root), (".jpg",), cfg=cfg)):
        rels = [Path(x).relative_to(root).as_posix() for x in listed["path"]]
        times = [timestamp_from_name(r) or timestamp_from_exif(root / r) for r in rels]
        assert list(listed["image_id"]) == [derive_image_id(r, "lsc") for r in rels]
        assert list(listed["timestamp"]) == list(pd.to_datetime(pd.Series(times, dtype=object), errors="coerce"))
        assert list(listed["day"]) == [day_of(t, r) for t, r in zip(times, rels)]
        assert set(listed["day"]) == {"2016-08-15", "2019-01-01", "2019-01-02", "2016-08-17", "unknown"}


def test_ntcir14_layout_minute_labels(tmp_path):
    root = tmp_path / "ntcir"
    images, minutes = [], []
    for m in range(6):
        ids = []
        for k in range(3):
            iid = f"B000{m}{k}_21I6X0_20180503_07{m:02d}{k * 15:02d}E"
            rel = f"u1/Autographer/2018_05_03/{iid}.JPG"
            write_image(root / rel)
            images.append((iid, rel))
            ids.append(iid)
        row = {"minute_ID": f"u1_20180503_07{m:02d}", "activity": "walking" if m < 3 else "transport",
               " scan_glucose (mmol/L)": "NULL"}
        row.update({f"img{j:02d}_id": (ids[j] if j < 3 else "NULL") for j in range(20)})
        minutes.append(row)
    images.append(("B_orphan", "u1/Autographer/2018_05_03/B_orphan_20180503_090000E.JPG"))
    write_image(root / images[-1][1])
    pd.DataFrame(minutes).to_csv(tmp_path / "u1.csv", index=False)
    pd.DataFrame(images, columns=["image_id", "image_path"]).to_csv(tmp_path / "concepts.csv", index=False)
    tax = tmp_path / "tax.yaml"
    tax.write_text("categories:\n  Walking: [walking]\n  Transport: [transport]\n")
    res = build_manifest(cfg_for(
        tmp_path / "s", root=str(root), labels=str(tmp_path / "u1.csv"), layout="ntcir14",
        images_csv=str(tmp_path / "concepts.csv"), label_column="activity", taxonomy=str(tax)))
    check_accounting(res)
    assert len(res.manifest) == 18
    assert res.manifest.set_index("image_id").loc["B00000_21I6X0_20180503_070000E", "label"] == "Walking"
    assert (res.manifest["day"] == "2018-05-03").all()
    assert res.rejects["reason"].tolist() == ["unlabeled"]


def test_malformed_csvs_are_clear_errors(tmp_path):
    root = tmp_path / "lifelog"
    make_lsc(root, {"walking": 3})
    bad_cols = tmp_path / "bad.csv"
    bad_cols.write_text("file,activity\na.jpg,walking\n")
    with pytest.raises(IngestError, match=r"bad\.csv: missing column"):
        build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(bad_cols)))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image_path,label\n2016-08-15/x.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(IngestError, match=r"latin\.csv: not valid"):
        build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(latin)))
    empty = write_labels(tmp_path / "empty.csv", [])
    with pytest.raises(IngestError, match="empty"):
        build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(empty), layout="csv"))
    with pytest.raises(IngestError, match="no images left"):  # LSC: images on disk, none labelled
        build_manifest(cfg_for(tmp_path / "s", root=str(root), labels=str(empty)))
    assert (tmp_path / "s" / "rejects.parquet").exists()  # the user can see why


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.top_kk: unknown key"):
        load_config(None, {"data.top_kk": 3})
    with pytest.raises(ConfigError, match=r"data\.split"):
        load_config(None, {"data.split": "0.5,0.2,0.2"})
    y = tmp_path / "c.yaml"
    y.write_text("extract:\n  precision: float8\n")
    with pytest.raises(ConfigError, match=r"extract\.precision"):
        load_config(y)


def test_split_helpers():
    assert largest_remainder(11, (0.6, 0.2, 0.2)) == [7, 2, 2]
    assert sum(largest_remainder(1001, (0.6, 0.2, 0.2))) == 1001
    df = pd.DataFrame({"image_id": [f"i{k}" for k in range(50)], "label": ["a"] * 30 + ["b"] * 20})
    s = assign_splits(df, (0.6, 0.2, 0.2), 0)
    assert s.value_counts().to_dict() == {"train": 30, "val": 10, "test": 10}


def test_taxonomy_matching_and_conflicts(tmp_path):
    t = Taxonomy.load("paper")
    assert t.merge("  Drinking   COFFEE ") == "Drinking"
    assert t.merge("Commuting to work in car") == "Commuting in car"
    assert t.merge("Using laptop") == "Using laptop"
    assert len(t.categories) == 25
    with pytest.raises(ValueError, match="maps to both"):
        Taxonomy({"A": ["x"], "B": ["X "]})


def test_taxonomy_and_sample_mistakes_are_one_line_errors(tmp_path, capsys):
    from lifelog_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("categories: [a\n")
    cases = [
        (["manifest", "--root", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--study", str(tmp_path / "s"),
          "--taxonomy", str(bad)], "not valid YAML"),
        (["manifest", "--root", str(tmp_path), "--labels", str(tmp_path / "l.csv"), "--study", str(tmp_path / "s"),
          "--taxonomy", str(tmp_path / "nope.yaml")], "taxonomy file not found"),
        (["sample", str(tmp_path / "x"), "--image-size", "320"], "expected WIDTHxHEIGHT"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def _sample_study(tmp_path, days: int):
    from lifelog_ray.sample import write_sample

    root = tmp_path / "lifelog"
    write_sample(root, seed=2, days=days, images_per_day=24, image_size=(48, 36))
    return cfg_for(tmp_path / "study", root=str(root), labels=str(root / "labels.csv"))


def test_day_split_keeps_each_day_whole_and_near_the_fractions(tmp_path):
    res = build_manifest(_sample_study(tmp_path, days=10))
    man = res.manifest
    assert (man.groupby("day")["split_day"].nunique() == 1).all()  # no day in two splits
    assert set(man["split_day"]) == {"train", "val", "test"}
    assert man["split"].tolist() != man["split_day"].tolist()  # the paper's per-image split is unchanged beside it
    largest_day = man.groupby("day").size().max()
    for _, r in res.categories.iterrows():  # as close as whole days allow: within one day's images
        for s, frac in zip(("train", "val", "test"), (0.6, 0.2, 0.2)):
            assert abs(r[f"{s}_day"] - frac * r["total"]) <= largest_day, r
    cats = pd.read_csv(tmp_path / "study" / "categories.csv")
    assert (cats[["train_day", "val_day", "test_day"]].sum(axis=1) == cats["total"]).all()


def test_a_grown_lifelog_keeps_its_days_splits_and_unknown_days_keep_the_image_split(tmp_path):
    from lifelog_ray.ingest import assign_day_splits

    cfg = _sample_study(tmp_path, days=6)
    first = build_manifest(cfg).manifest
    from lifelog_ray.sample import write_sample

    write_sample(tmp_path / "more", seed=5, days=9, images_per_day=24, image_size=(48, 36))  # 3 more days
    labels = pd.read_csv(tmp_path / "lifelog" / "labels.csv")
    extra = pd.read_csv(tmp_path / "more" / "labels.csv")
    new_days = sorted(set(extra["image_path"].str.split("/").str[0]) - set(labels["image_path"].str.split("/").str[0]))
    import shutil

    for d in new_days:
        shutil.copytree(tmp_path / "more" / d, tmp_path / "lifelog" / d)
    pd.concat([labels, extra[extra["image_path"].str.split("/").str[0].isin(new_days)]]).to_csv(
        tmp_path / "lifelog" / "labels.csv", index=False)
    second = build_manifest(cfg).manifest
    before = first.groupby("day")["split_day"].first()
    after = second.groupby("day")["split_day"].first()
    assert (after.loc[before.index] == before).all() and len(after) == len(before) + len(new_days)
    unknown = pd.DataFrame({"image_id": ["a", "b"], "label": ["x", "x"], "split": ["val", "test"],
                            "day": ["unknown", "unknown"]})
    assert assign_day_splits(unknown, (0.6, 0.2, 0.2), 0).tolist() == ["val", "test"]


def test_a_category_on_too_few_days_is_a_warning_not_a_drop(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lifelog_ray.ingest"):
        res = build_manifest(_sample_study(tmp_path, days=2))
    assert "cannot reach all three splits under split_day" in caplog.text
    assert res.categories["total"].sum() == len(res.manifest)  # nothing dropped


def test_the_bundled_sample_is_a_sequence_that_splits_by_day(tmp_path):
    """What `make demo` shows rests on this: about ten days, every category on all three day splits,
    and consecutive frames of an activity near-duplicates, while the same activity on another day
    looks different (another desk, another light)."""
    from PIL import Image

    from lifelog_ray.sample import write_sample

    root = tmp_path / "lifelog"
    write_sample(root, seed=0, image_size=(96, 72))  # the demo's days and frames per day, smaller images
    res = build_manifest(cfg_for(tmp_path / "study", root=str(root), labels=str(root / "labels.csv"), top_k=10))
    man = res.manifest
    assert man["day"].nunique() == 10 and len(res.categories) == 10
    assert (res.categories[["train_day", "val_day", "test_day"]] > 0).all().all(), res.categories
    man = man[~man["rel_path"].str.contains("_2359")].sort_values("timestamp")  # not the three broken files
    pix = {i: np.asarray(Image.open(p), dtype=np.float32) for i, p in zip(man["image_id"], man["path"], strict=True)}
    same_run, other_day = [], []
    for (_, a), (_, b) in zip(man.iloc[:-1].iterrows(), man.iloc[1:].iterrows(), strict=True):
        if a["label"] == b["label"] and a["day"] == b["day"]:
            same_run.append(np.abs(pix[a["image_id"]] - pix[b["image_id"]]).mean())
    for _, g in man.groupby("label"):
        firsts = g.groupby("day").head(1)["image_id"].tolist()
        other_day += [np.abs(pix[x] - pix[y]).mean() for x, y in zip(firsts[:-1], firsts[1:], strict=True)]
    assert np.median(same_run) * 2 < np.median(other_day), (np.median(same_run), np.median(other_day))


AWKWARD_PATHS = [
    "2016-08-15/20160815_080030_000.jpg", "u1/2016-08-15/20160815_080030_000.jpg", "a/u12/b/x.png",
    "2016-08-15/B00001234_21I6X0_20160815_080030E.JPG", "x/y/photo.tar.gz", "x/.hidden", ".hidden/a.jpg",
    "x/b.", "x/..b.jpg", "a/./b.jpg", "./a.jpg", "../a.jpg", "a/../b.jpg", "a//b.jpg", "a/", "a\\b.jpg",
    "a/...", "a/b..c", "a.b/c", "c", "x/20160815_080030.jpg", "x/120160815_080030_000.jpg",
    "x/20161399_250000_000.jpg", "x/note 20160815_080030 (2).jpeg", "d.e/f.g/h",
]


@pytest.mark.parametrize("layout", ["lsc", "csv", "folder"])
def test_column_functions_equal_the_per_path_ones(layout):
    """Ingest's one-pass column functions (a lifelog has millions of rows) read every path as the per-path
    functions do (predict uses those): folders, user folders, suffixes, `.`/`..` parts, times in names."""
    import re

    from lifelog_ray.ingest import (
        _NEEDS_NORM,
        _extension,
        _missing,
        _odd_paths,
        derive_image_id,
        derive_image_ids,
        timestamp_from_name,
        timestamps_from_names,
    )

    rels = pd.Series(AWKWARD_PATHS, dtype=object)
    for p in [*AWKWARD_PATHS, ".jpg", "..jpg", "a/..jpg", "a/b.c/d", "a.", "", "a/b.JPG", ".a.b"]:
        assert _extension(p) == os.path.splitext(p)[1], p
    cells = pd.Series(["", " ", "NULL", " none ", "n/a", "NA", "nan", "\tNaN\n", "na ", None, float("nan"), 3,
                       "walking", "  walking  ", "nana", "N/A" + " " * 9, "unknown"], dtype=object)
    assert _missing(cells).tolist() == [v is None or (isinstance(v, float) and np.isnan(v))
                                        or str(v).strip().lower() in {"", "null", "none", "nan", "na", "n/a"}
                                        for v in cells]
    assert derive_image_ids(rels, layout).tolist() == [derive_image_id(r, layout) for r in AWKWARD_PATHS]
    assert _odd_paths(rels).tolist() == [re.search(_NEEDS_NORM, r) is not None for r in AWKWARD_PATHS]
    got = timestamps_from_names(rels)
    want = [timestamp_from_name(r) for r in AWKWARD_PATHS]
    assert [None if pd.isna(t) else t.to_pydatetime() for t in got] == want
    assert got.notna().sum() == 5  # the LSC names, the one without milliseconds and the one with words around it
