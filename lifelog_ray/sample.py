"""A deterministic, clearly synthetic lifelog in the LSC layout: drawn scenes per activity, raw labels, flaws.

It has the time structure of a real lifelog, which the day protocol and temporal smoothing are about: ten
days of activity runs whose consecutive frames are near-duplicates, each activity's place and light
differing from day to day, and spoiled frames (a hand over the lens, motion blur, a dark frame) inside
runs. So the per-image split scores above the day split, and smoothing recovers the spoiled frames. It
is built to show these effects; real figures come from real lifelogs.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

Draw = Callable[[ImageDraw.ImageDraw, int, int, np.random.Generator], None]


def _c(rng: np.random.Generator, base: tuple[int, int, int], jitter: int = 25) -> tuple[int, int, int]:
    return tuple(int(np.clip(b + rng.integers(-jitter, jitter + 1), 0, 255)) for b in base)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _text_lines(d: ImageDraw.ImageDraw, box: tuple[float, float, float, float], rng, color, n: int) -> None:
    x0, y0, x1, y1 = box
    for i in range(n):
        y = y0 + (i + 1) * (y1 - y0) / (n + 1)
        d.line([(x0 + 4, y), (x0 + 4 + _u(rng, 0.4, 0.95) * (x1 - x0 - 8), y)], fill=color, width=2)


def _desk(d, w, h, rng):  # desktop monitor on a desk, keyboard in front
    d.rectangle([0, 0, w, h], fill=_c(rng, (200, 195, 185)))
    d.rectangle([0, int(h * 0.7), w, h], fill=_c(rng, (150, 120, 90)))
    x0, y0 = _u(rng, 0.15, 0.25) * w, _u(rng, 0.08, 0.15) * h
    box = (x0, y0, x0 + 0.6 * w, y0 + 0.5 * h)
    d.rectangle(box, fill=(20, 20, 20))
    inner = (box[0] + 6, box[1] + 6, box[2] - 6, box[3] - 6)
    d.rectangle(inner, fill=_c(rng, (60, 110, 200)))
    _text_lines(d, inner, rng, (240, 240, 240), 6)
    d.rectangle([0.2 * w, 0.78 * h, 0.8 * w, 0.92 * h], fill=_c(rng, (50, 50, 50), 10))


def _laptop(d, w, h, rng):  # close laptop screen and keyboard, dark surroundings
    d.rectangle([0, 0, w, h], fill=_c(rng, (90, 80, 70)))
    d.polygon([(0.1 * w, 0.05 * h), (0.9 * w, 0.05 * h), (0.85 * w, 0.55 * h), (0.15 * w, 0.55 * h)], fill=(15, 15, 15))
    d.polygon([(0.14 * w, 0.08 * h), (0.86 * w, 0.08 * h), (0.82 * w, 0.52 * h), (0.18 * w, 0.52 * h)],
              fill=_c(rng, (235, 235, 225)))
    _text_lines(d, (0.2 * w, 0.1 * h, 0.8 * w, 0.5 * h), rng, (40, 40, 40), 7)
    d.polygon([(0.15 * w, 0.58 * h), (0.85 * w, 0.58 * h), (w, h), (0, h)], fill=_c(rng, (170, 170, 175)))
    for i in range(5):
        y = 0.62 * h + i * 0.07 * h
        d.line([(0.1 * w, y), (0.9 * w, y)], fill=(110, 110, 115), width=2)


def _car(d, w, h, rng):  # windscreen: sky and road ahead, dark dashboard, steering wheel
    d.rectangle([0, 0, w, 0.4 * h], fill=_c(rng, (150, 190, 230)))
    d.rectangle([0, 0.4 * h, w, 0.65 * h], fill=_c(rng, (90, 110, 80)))
    d.polygon([(0.45 * w, 0.4 * h), (0.55 * w, 0.4 * h), (0.9 * w, 0.65 * h), (0.1 * w, 0.65 * h)], fill=(80, 80, 85))
    d.rectangle([0, 0.62 * h, w, h], fill=_c(rng, (30, 30, 35), 10))
    cx, cy, r = _u(rng, 0.25, 0.4) * w, 0.9 * h, 0.25 * h
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(10, 10, 10), width=max(3, int(h * 0.04)))


def _walking(d, w, h, rng):  # street: sky, buildings, pavement in perspective
    d.rectangle([0, 0, w, 0.45 * h], fill=_c(rng, (175, 200, 225)))
    for _ in range(4):
        x = _u(rng, 0, 0.9) * w
        d.rectangle([x, _u(rng, 0.1, 0.3) * h, x + _u(rng, 0.1, 0.25) * w, 0.5 * h], fill=_c(rng, (140, 120, 110), 40))
    d.rectangle([0, 0.5 * h, w, h], fill=_c(rng, (120, 120, 120)))
    for i in range(6):
        d.line([(0.5 * w, 0.5 * h), (i * w / 5, h)], fill=(90, 90, 90), width=2)
    d.rectangle([0, 0.5 * h, 0.08 * w, h], fill=_c(rng, (70, 130, 60)))


def _airplane(d, w, h, rng):  # oval cabin window with sky and clouds in a pale wall
    d.rectangle([0, 0, w, h], fill=_c(rng, (215, 215, 210), 12))
    box = [0.3 * w, 0.15 * h, 0.7 * w, 0.85 * h]
    d.ellipse(box, fill=(180, 180, 180))
    inner = [box[0] + 8, box[1] + 8, box[2] - 8, box[3] - 8]
    d.ellipse(inner, fill=_c(rng, (90, 150, 230)))
    for _ in range(3):
        cx, cy = _u(rng, 0.38, 0.62) * w, _u(rng, 0.45, 0.75) * h
        d.ellipse([cx - 15, cy - 6, cx + 15, cy + 6], fill=(250, 250, 250))


def _tv(d, w, h, rng):  # dark room, bright TV, sofa back
    d.rectangle([0, 0, w, h], fill=_c(rng, (45, 35, 40), 12))
    x0 = _u(rng, 0.2, 0.35) * w
    d.rectangle([x0, 0.15 * h, x0 + 0.45 * w, 0.55 * h], fill=(5, 5, 5))
    d.rectangle([x0 + 5, 0.15 * h + 5, x0 + 0.45 * w - 5, 0.55 * h - 5], fill=_c(rng, (200, 120, 60), 60))
    d.rectangle([0, 0.75 * h, w, h], fill=_c(rng, (120, 40, 40)))


def _eating(d, w, h, rng):  # plate with food on a wooden table
    d.rectangle([0, 0, w, h], fill=_c(rng, (160, 110, 60)))
    cx, cy, r = _u(rng, 0.4, 0.6) * w, _u(rng, 0.45, 0.6) * h, 0.35 * h
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(245, 245, 245))
    for col in [(200, 60, 40), (80, 160, 60), (230, 200, 90)]:
        fx, fy = cx + _u(rng, -0.5, 0.5) * r, cy + _u(rng, -0.5, 0.5) * r
        d.ellipse([fx - r / 4, fy - r / 5, fx + r / 4, fy + r / 5], fill=_c(rng, col))


def _conversation(d, w, h, rng):  # several faces around a table
    d.rectangle([0, 0, w, h], fill=_c(rng, (185, 175, 160)))
    d.rectangle([0, 0.65 * h, w, h], fill=_c(rng, (120, 90, 60)))
    n = int(rng.integers(2, 5))
    for i in range(n):
        cx = (i + 0.5) * w / n + _u(rng, -10, 10)
        cy, r = _u(rng, 0.3, 0.45) * h, 0.11 * h
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_c(rng, (225, 180, 150), 20))
        d.rectangle([cx - 1.4 * r, cy + r, cx + 1.4 * r, 0.68 * h], fill=_c(rng, (60, 70, 120), 60))


def _mobile(d, w, h, rng):  # phone in hand, blurred floor
    d.rectangle([0, 0, w, h], fill=_c(rng, (110, 100, 95), 30))
    cx = _u(rng, 0.4, 0.6) * w
    d.ellipse([cx - 0.2 * w, 0.55 * h, cx + 0.15 * w, 1.1 * h], fill=_c(rng, (220, 175, 140), 15))
    d.rounded_rectangle([cx - 0.12 * w, 0.25 * h, cx + 0.12 * w, 0.95 * h], radius=8, fill=(10, 10, 10))
    d.rectangle([cx - 0.1 * w, 0.3 * h, cx + 0.1 * w, 0.88 * h], fill=_c(rng, (240, 240, 250), 10))
    for i in range(5):
        y = 0.34 * h + i * 0.1 * h
        d.rectangle([cx - 0.08 * w, y, cx + 0.08 * w, y + 0.05 * h], fill=_c(rng, (70, 140, 220), 30))


def _reading(d, w, h, rng):  # a page filling the view
    d.rectangle([0, 0, w, h], fill=_c(rng, (150, 120, 90)))
    d.polygon([(0.1 * w, 0.05 * h), (0.85 * w, 0.02 * h), (0.95 * w, 0.95 * h), (0.05 * w, 0.98 * h)], fill=(248, 248, 240))
    _text_lines(d, (0.15 * w, 0.1 * h, 0.85 * w, 0.9 * h), rng, (30, 30, 30), 14)


def _meeting(d, w, h, rng):  # long table, laptops, people far away, whiteboard
    d.rectangle([0, 0, w, h], fill=_c(rng, (225, 225, 230), 10))
    d.rectangle([0.1 * w, 0.05 * h, 0.6 * w, 0.35 * h], fill=(250, 250, 250), outline=(120, 120, 120), width=2)
    d.polygon([(0.3 * w, 0.5 * h), (0.7 * w, 0.5 * h), (w, h), (0, h)], fill=_c(rng, (110, 80, 55)))
    for i in range(3):
        cx = (0.2 + 0.3 * i) * w
        d.ellipse([cx - 12, 0.38 * h - 12, cx + 12, 0.38 * h + 12], fill=_c(rng, (220, 180, 150), 20))
        d.rectangle([cx - 18, 0.42 * h, cx + 18, 0.55 * h], fill=_c(rng, (40, 40, 60), 30))


def _drinking(d, w, h, rng):  # a mug close up
    d.rectangle([0, 0, w, h], fill=_c(rng, (140, 150, 160), 30))
    cx = _u(rng, 0.4, 0.6) * w
    d.rectangle([cx - 0.18 * w, 0.2 * h, cx + 0.18 * w, 0.9 * h], fill=_c(rng, (240, 240, 235), 10))
    d.ellipse([cx - 0.18 * w, 0.12 * h, cx + 0.18 * w, 0.28 * h], fill=_c(rng, (90, 50, 25), 15))
    d.arc([cx + 0.12 * w, 0.35 * h, cx + 0.32 * w, 0.7 * h], -90, 90, fill=(230, 230, 225), width=8)


def _teeth(d, w, h, rng):  # bathroom mirror tiles
    d.rectangle([0, 0, w, h], fill=_c(rng, (235, 245, 245), 8))
    for i in range(0, w, 24):
        d.line([(i, 0), (i, h)], fill=(190, 200, 205), width=1)
    d.rectangle([0.4 * w, 0.3 * h, 0.45 * w, 0.9 * h], fill=_c(rng, (40, 120, 220)))


def _garden(d, w, h, rng):  # grass and flowers
    d.rectangle([0, 0, w, h], fill=_c(rng, (60, 140, 50)))
    for _ in range(12):
        x, y = _u(rng, 0, 1) * w, _u(rng, 0.2, 1) * h
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=_c(rng, (230, 60, 120), 60))


@dataclass(frozen=True)
class Activity:
    weight: float  # share of labelled images, shaped like the paper's Table 2 (a long head, a thin tail)
    raw_labels: tuple[str, ...]  # fine-grained raw labels that the paper's taxonomy merges
    draw: Draw


ACTIVITIES: dict[str, Activity] = {
    "Using desktop computer": Activity(0.22, ("Using desktop computer", "working at PC", "using computer"), _desk),
    "Using mobile": Activity(0.13, ("using phone", "Using mobile", "texting"), _mobile),
    "Eating": Activity(0.11, ("eating food", "eating apple", "Eating curd", "eating lunch"), _eating),
    "Casual conversation": Activity(0.10, ("chatting", "casual conversation", "talking with friends"), _conversation),
    "Commuting in car": Activity(0.09, ("Car", "Commuting to work in car", "travelling in car"), _car),
    "Walking": Activity(0.08, ("walking", "walking to work", "Walking outside"), _walking),
    "Watching TV": Activity(0.07, ("watching tv", "Watching television"), _tv),
    "Using laptop": Activity(0.06, ("using laptop", "working on laptop"), _laptop),
    "In airplane": Activity(0.05, ("In airplane", "on a plane", "flying"), _airplane),
    "Reading paper": Activity(0.04, ("reading paper", "reading a book"), _reading),
    "Work meeting": Activity(0.025, ("meeting", "work meeting"), _meeting),
    "Drinking": Activity(0.02, ("drinking coffee", "drinking water  ", "Drinking Tea"), _drinking),
    "Brushing teeth": Activity(0.01, ("brushing teeth",), _teeth),
    "Gardening": Activity(0.005, ("gardening",), _garden),
}


def draw_scene(activity: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One drawn view of an activity (the layout and colours come from ``rng``), before the camera's look."""
    w, h = size
    img = Image.new("RGB", size)
    ACTIVITIES[activity].draw(ImageDraw.Draw(img), w, h, rng)
    return img


def camera_frame(scene: Image.Image, cast: np.ndarray, rng: np.random.Generator, bad_frame: float = 0.25) -> Image.Image:
    """What the wearable camera records of a scene: the wearer sways (a small shift and tilt), exposure and
    blur vary, the sensor adds noise, and the day's light tints everything (``cast``, per channel). Now
    and then a frame is spoiled, as real lifelog frames are: a hand in front of the lens, heavy motion
    blur, or a dark frame. Consecutive frames of one scene are therefore near-duplicates, not copies."""
    w, h = scene.size
    img = scene.rotate(float(rng.uniform(-2, 2)), resample=Image.BILINEAR,
                       translate=(float(rng.uniform(-0.02, 0.02) * w), float(rng.uniform(-0.02, 0.02) * h)),
                       fillcolor=tuple(int(v) for v in np.asarray(scene)[0, 0]))
    exposure, blur = float(rng.uniform(0.93, 1.05)), float(rng.uniform(0.3, 1.0))
    if rng.random() < bad_frame:
        kind = int(rng.integers(3))
        if kind == 0:  # the wearer's hand or sleeve covers most of the view
            d = ImageDraw.Draw(img)
            x = float(rng.uniform(0.0, 0.5)) * w
            d.ellipse([x - 0.1 * w, 0.05 * h, x + 0.75 * w, 1.5 * h], fill=_c(rng, (200, 150, 120), 30))
        elif kind == 1:  # walking or turning: motion blur
            blur = float(rng.uniform(5, 9))
        else:  # the camera's auto-exposure lags a change of light
            exposure = float(rng.uniform(0.2, 0.35))
    img = img.filter(ImageFilter.GaussianBlur(radius=blur))
    arr = np.asarray(img, dtype=np.float32) * exposure * cast[None, None, :]
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def worn(scene: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The scene as the camera sees it where it is clipped today: higher or lower, nearer or farther, tilted.
    Drawn once per activity and day, so another day of the same activity looks different as a whole."""
    w, h = scene.size
    zoom = float(rng.uniform(1.0, 1.25))
    cw, ch = w / zoom, h / zoom
    x0, y0 = float(rng.uniform(0, w - cw)), float(rng.uniform(0, h - ch))
    view = scene.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch))).resize((w, h), Image.BILINEAR)
    return view.rotate(float(rng.uniform(-6, 6)), resample=Image.BILINEAR, expand=False,
                       fillcolor=tuple(int(v) for v in np.asarray(view)[0, 0]))


def day_plan(rng: np.random.Generator, images_per_day: int) -> list[tuple[str, int]]:
    """A day as runs of (activity, number of frames), ``images_per_day`` frames in all. A day has a handful of activities, each on some
    days and not others; the common ones take more frames (the paper's long head, thin tail). The ten
    most common each appear on most days, so a ten-day lifelog splits by day for every one of them."""
    names = list(ACTIVITIES)
    weight = np.array([ACTIVITIES[n].weight for n in names])
    on_day = np.where(np.arange(len(names)) < 10, 0.75, 0.15)  # the chance an activity happens on a given day
    today = [i for i in range(len(names)) if rng.random() < on_day[i]] or [0]
    today = today[:max(1, images_per_day // 3)]  # at least 3 frames an activity: the most common fit first
    # Exactly images_per_day frames: 3 each where they fit, the rest shared by sqrt(weight), largest remainders.
    floor_n = min(3, images_per_day // len(today))
    share = np.sqrt(weight[today]) / np.sqrt(weight[today]).sum() * (images_per_day - floor_n * len(today))
    counts = np.floor(share).astype(int)
    counts[np.argsort(counts - share, kind="stable")[: images_per_day - floor_n * len(today) - counts.sum()]] += 1
    runs = []
    for i, n in zip(today, (counts + floor_n).tolist(), strict=True):
        parts = 2 if n >= 10 and rng.random() < 0.5 else 1  # e.g. at the desk in the morning and the afternoon
        runs += [(names[i], n // parts + int(k < n % parts)) for k in range(parts)]
    return [runs[k] for k in rng.permutation(len(runs))]


def _exif(ts: datetime) -> bytes:
    exif = Image.Exif()
    stamp = ts.strftime("%Y:%m:%d %H:%M:%S")
    exif[0x0132] = stamp  # DateTime
    exif[0x010F] = "lifelog-ray synthetic sample"  # Make: says plainly this is not a real camera
    exif.get_ifd(0x8769)[36867] = stamp  # DateTimeOriginal
    return exif.tobytes()


def write_sample(
    out: str | Path,
    seed: int = 0,
    days: int = 10,
    images_per_day: int = 36,
    image_size: tuple[int, int] = (320, 240),
    start: datetime = datetime(2016, 8, 15, 7, 30),
    bad_frame: float = 0.25,
    held_out: str | Path | None = None,
    held_out_days: int = 2,
) -> dict[str, int]:
    """Write images under OUT/YYYY-MM-DD/ and OUT/labels.csv; return counts of what was written.

    ``held_out``: also write ``held_out_days`` more days there, drawn the same way and after the labelled ones
    (the labelled days stay the same), with no labels: new days for `predict`. Their true activities go to
    HELD_OUT/truth.csv, so the summaries made from the predictions can be checked; predict never reads it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, str]] = []
    truth: list[tuple[str, str]] = []
    stats = {"images": 0, "labelled": 0, "unlisted": 0, "empty_label": 0, "unknown_label": 0, "broken": 0}
    if held_out is not None:
        stats["held_out"] = 0
    for day in range(days + (held_out_days if held_out is not None else 0)):
        t = start + timedelta(days=day, minutes=int(rng.integers(0, 60)))
        new_day = day >= days
        base = Path(held_out) if new_day else out
        folder = base / t.strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        cast = rng.uniform(0.75, 1.25, 3)  # the day's light: daylight, office lamps, a grey morning
        scenes: dict[str, Image.Image] = {}  # one place per activity and day: the same desk all day
        for r, (activity, n) in enumerate(day_plan(rng, images_per_day)):
            if r and rng.random() < 0.2:  # the camera was off for a while
                t += timedelta(minutes=int(rng.integers(10, 90)))
            if activity not in scenes:
                scenes[activity] = worn(draw_scene(activity, image_size, rng), rng)
            for _ in range(n):
                t += timedelta(seconds=int(rng.integers(18, 40)))
                rel = f"{folder.name}/{t:%Y%m%d_%H%M%S}_000.jpg"
                camera_frame(scenes[activity], cast, rng, bad_frame).save(base / rel, quality=88, exif=_exif(t))
                if new_day:
                    truth.append((rel, activity))
                    stats["held_out"] += 1
                    continue
                stats["images"] += 1
                roll = rng.random()
                if roll < 0.02:
                    stats["unlisted"] += 1  # on disk, no row in labels.csv
                    continue
                if roll < 0.04:
                    rows.append((rel, ""))
                    stats["empty_label"] += 1
                    continue
                if roll < 0.05:
                    rows.append((rel, "staring at the wall"))  # outside the taxonomy
                    stats["unknown_label"] += 1
                    continue
                raw = ACTIVITIES[activity].raw_labels[int(rng.integers(len(ACTIVITIES[activity].raw_labels)))]
                rows.append((rel, raw))
                stats["labelled"] += 1
    # A few broken files, labelled like any other: ingest keeps them, extraction must reject them.
    first = out / f"{start:%Y-%m-%d}"
    broken = {
        "20160815_235900_000.jpg": b"",
        "20160815_235930_000.jpg": (out / rows[0][0]).read_bytes()[:700],
        "20160815_235945_000.jpg": b"this is a text file, not a JPEG\n",
    }
    for name, payload in broken.items():
        (first / name).write_bytes(payload)
        rows.append((f"{first.name}/{name}", "using computer"))
        stats["broken"] += 1
    for path, table in ((out / "labels.csv", rows), (Path(held_out) / "truth.csv" if held_out else None, truth)):
        if path is None:
            continue
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image_path", "label"])
            w.writerows(table)
    log.info("sample lifelog written to %s: %s", out, stats)
    return stats


# Settings that run every stage on a tiny generated lifelog in a minute or two on a laptop (--smoke-test).
SMOKE = {
    "extract.weights": "none", "extract.image_size": 32, "extract.batch_size": 8, "extract.layers": "fc2,predictions",
    "classify.search_space": None, "classify.classifiers": "svm,naive_bayes", "finetune.weights": "none",
    "finetune.image_size": 32, "finetune.epochs": 1, "finetune.methods": "m1", "finetune.batch_size": 16,
    "finetune.cpus_per_worker": 0.5, "data.top_k": 4,
}


def smoke_config(workdir: Path, overrides: dict | None = None):
    """A tiny generated lifelog under ``workdir`` and the SMOKE settings (then ``overrides``), as a StudyConfig."""
    from .config import load_config

    root = workdir / "lifelog"
    write_sample(root, seed=0, days=2, images_per_day=30, image_size=(96, 72))
    cfg = load_config(None, {**SMOKE, "data.root": str(root), "data.labels": str(root / "labels.csv"),
                             "output.study": str(workdir / "study"), **(overrides or {})})
    small = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "search_space_small.yaml"
    if small.exists():
        cfg.classify.search_space = str(small)
    return cfg
