"""Builders the test modules share: generated images, small lifelogs and study configs."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from lifelog_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, color: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED), and so would the images
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


SIZE = 32  # the smallest input VGG accepts: keeps the tests fast on 2 cores
LAYERS = ["flatten", "fc1", "fc2", "predictions"]


def frame_name(day: str, second_of_day: int) -> str:
    """A wearable camera's file name for a frame taken at ``second_of_day`` (LSC layout: DAY/YYYYMMDD_HHMMSS_000)."""
    h, m, sec = second_of_day // 3600, second_of_day // 60 % 60, second_of_day % 60
    return f"{day}/{day.replace('-', '')}_{h:02d}{m:02d}{sec:02d}_000.png"


def make_study(tmp: Path, n_per_class: int = 6, day: str = "2016-08-15", root: Path | None = None, rows=None):
    root = root or tmp / "lifelog"
    rows = rows if rows is not None else []
    colors = {"walking": (30, 160, 40), "car": (40, 40, 40), "eating food": (200, 150, 90)}
    sec = len(rows) * 30
    for label, color in colors.items():
        for _ in range(n_per_class):
            sec += 30
            rel = frame_name(day, 8 * 3600 + sec)
            write_image(root / rel, color)
            rows.append((rel, label))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(tmp / "labels.csv", index=False)
    return root, rows


def extract_config(tmp: Path, root: Path, **extract):
    over = {"data.root": str(root), "data.labels": str(tmp / "labels.csv"), "output.study": str(tmp / "study"),
            "extract.weights": "none", "extract.image_size": SIZE, "extract.batch_size": 8,
            "extract.unit_size": 8, "ray.progress_bars": False}
    over.update({f"extract.{k}": v for k, v in extract.items()})
    return load_config(None, over)


def study_config(root: Path, study: Path):
    return load_config(None, {
        "data.root": str(root), "data.labels": str(root / "labels.csv"), "data.top_k": 5,
        "output.study": str(study), "extract.weights": "none", "extract.image_size": 32,
        "extract.layers": "fc2,predictions", "extract.batch_size": 16,
        "classify.search_space": str(ROOT / "jobs" / "configs" / "search_space_small.yaml"),
        "classify.classifiers": "svm,naive_bayes,bayesian_ridge", "finetune.methods": "m3",
        "finetune.weights": "none", "finetune.image_size": 32, "finetune.epochs": 1, "finetune.m3_units": 16,
        "predict.images": str(root.parent / "new-days") if (root.parent / "new-days").is_dir() else None,
        "ray.progress_bars": False,
    })


def assert_whole_units(model_dir, layer: str, options: dict | None = None, max_unmarked: int = 4) -> None:
    """What `pd.read_parquet` of a layer folder returns is whole units: exactly the marked units' rows, plus the
    files of units a kill caught between their publication and their marker (whole, redone by the rerun; extract
    has at most 2 publishing tasks per model actor, and at least 4, running at once), each one unit of one day
    that shares no image with any other."""
    import json

    from lifelog_ray import storage

    markers = [json.loads(b) for b in storage.read_many(list(storage.files(model_dir / "_units", (".json",))))]
    marked = sorted(i for m in markers for i in m["image_ids"] if i not in {r["image_id"] for r in m["rejects"]})
    listed = {p for m in markers for p in m["parts"]}
    files = list(storage.files(model_dir / layer, (".parquet",)))
    unmarked = [f for f in files if f.stem not in listed]
    assert len(unmarked) <= max_unmarked, f"{layer}: {len(unmarked)} files of units never marked done"
    extra: list[str] = []
    for f in unmarked:
        rows = storage.read_parquet(f, ["image_id", "day"])
        assert rows["day"].nunique() == 1 and f.stem.startswith(rows["day"].iloc[0]), (f, rows["day"].unique())
        extra += rows["image_id"].tolist()
    assert len(set(extra)) == len(extra) and not set(extra) & set(marked), f"{layer}: a row in two units"
    target = str(model_dir / layer) if options is None else f"{model_dir.protocol}://{model_dir.path}/{layer}"
    seen = pd.read_parquet(target, columns=["image_id"], storage_options=(options or {}).get("s3"))
    assert sorted(seen["image_id"]) == sorted(marked + extra), f"{layer}: rows of an unfinished unit, or lost rows"


def bad_corpus(root: Path) -> list[tuple[str, str, str | None]]:
    """(relative path, label, expected reject reason or None when it must be processed)."""
    d = root / "2016-08-16"
    d.mkdir(parents=True, exist_ok=True)
    base = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    out = []

    def add(name, writer, reason):
        writer(d / name)
        out.append((f"2016-08-16/{name}", "walking", reason))

    add("20160816_100000_000.jpg", lambda p: p.write_bytes(b""), "empty_file")
    Image.fromarray(base).save(d / "full.jpg")
    add("20160816_100010_000.jpg", lambda p: p.write_bytes((d / "full.jpg").read_bytes()[:300]), "truncated")
    (d / "full.jpg").unlink()
    add("20160816_100020_000.jpg", lambda p: p.write_text("not an image"), "not_an_image")
    add("20160816_100030_000.png", lambda p: Image.new("RGB", (300, 300)).save(p), "decompression_bomb")
    add("20160816_100040_000.jpg", lambda p: Image.fromarray(base[..., 0]).save(p), None)  # grayscale
    add("20160816_100050_000.png", lambda p: Image.fromarray(base).convert("P").save(p), None)  # palette
    add("20160816_100100_000.png", lambda p: Image.fromarray(base).convert("RGBA").save(p), None)
    add("20160816_100110_000.jpg", lambda p: Image.fromarray(base).convert("CMYK").save(p), None)
    add("20160816_100120_000.png",
        lambda p: Image.fromarray(base[..., 0].astype(np.uint16) * 257).save(p), None)  # 16-bit
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    add("20160816_100130_000.jpg", lambda p: Image.fromarray(base).save(p, exif=exif.tobytes()), None)
    add("20160816_100140_000.tif", lambda p: Image.fromarray(base).save(
        p, save_all=True, append_images=[Image.fromarray(base[::-1])]), None)  # multi-page TIFF
    return out
