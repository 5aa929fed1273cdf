"""A lifelog's size: events, time budgets and the report section on up to 725,000 frames; predict on 100,000.

    .venv/bin/python benchmarks/lifelog_scale.py                       # both parts
    .venv/bin/python benchmarks/lifelog_scale.py --skip-predict --sizes 10000,100000

Part 1: prediction sets of N generated frames (the LSC's current dataset: ~725,000 frames over 18 months,
about 1,450 a day), written as `predict` writes them (a Parquet file per day), with activity runs,
confidences and camera-off gaps. For each N, a fresh process runs events.write_summaries (events.parquet
and the three summaries) and the report's lifelog section. It records wall time, peak RSS, and the size
of the section's HTML (key frames from a few real JPEGs). Part 2: `predict` on N real JPEG files at 32 px
with a small trained study (random weights): wall time and images/s. Writes
benchmarks/results/lifelog_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

ACTIVITIES = ["using computer", "walking", "eating food", "commuting", "watching tv", "reading", "talking",
              "cooking", "shopping", "using mobile phone"]
PER_DAY = 1450


def write_prediction_set(out: Path, n: int, keyframes: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    days = pd.date_range("2019-01-01", periods=max(1, n // PER_DAY)).strftime("%Y-%m-%d")
    left = n
    for k, day in enumerate(days):
        m = left if k == len(days) - 1 else min(left, PER_DAY)
        left -= m
        t = pd.Timestamp(f"{day} 07:00")
        labels, times = [], []
        while len(labels) < m:
            run = int(rng.integers(5, 120))
            act = ACTIVITIES[int(rng.zipf(1.6)) % len(ACTIVITIES)]
            for _ in range(run):
                t += pd.Timedelta(seconds=int(rng.integers(20, 32)))
                labels.append(act)
                times.append(t)
            if rng.random() < 0.1:
                t += pd.Timedelta(minutes=int(rng.integers(10, 90)))  # camera off
        labels, times = labels[:m], times[:m]
        conf = rng.uniform(0.3, 1.0, m).astype(np.float32)
        df = pd.DataFrame({"image_id": [f"{day}-{i:05d}" for i in range(m)],
                           "path": [keyframes[i % len(keyframes)] for i in range(m)],
                           "timestamp": [str(x) for x in times], "error": "", "predicted_label": labels,
                           "confidence": conf, "smoothed_label": labels, "smoothed_confidence": conf})
        (out / f"day={day}").mkdir(parents=True, exist_ok=True)
        df.to_parquet(out / f"day={day}" / "smoothed-0.parquet", index=False)


SUMMARISE = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from lifelog_ray.events import write_summaries
ev = write_summaries(Path(sys.argv[1]), 300.0, 60.0)
t1 = time.perf_counter()
from lifelog_ray.lifelog_report import predictions_sections
html = "".join(predictions_sections(Path(sys.argv[1]).parents[1], None))
t2 = time.perf_counter()
print(json.dumps({"events": len(ev), "summaries_s": t1 - t0, "report_s": t2 - t1, "report_bytes": len(html.encode()),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def part_summaries(work: Path, sizes: list[int]) -> list[dict]:
    from PIL import Image

    frames = []
    for i in range(40):  # a few real key frames for the report's thumbnails
        p = work / "frames" / f"{i}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(p, quality=85)
        frames.append(str(p))
    rows = []
    for n in sizes:
        out = work / f"study-{n}" / "predictions" / "generated"
        t = time.perf_counter()
        write_prediction_set(out, n, frames)
        made = time.perf_counter() - t
        done = subprocess.run([sys.executable, "-c", SUMMARISE, str(out)], capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"frames": n, "days": n // PER_DAY, "write_set_s": round(made, 1), "events": r["events"],
                     "events_and_summaries_s": round(r["summaries_s"], 2), "report_section_s": round(r["report_s"], 2),
                     "report_section_kb": round(r["report_bytes"] / 1024, 1), "peak_rss_mb": round(r["peak_rss_mb"], 1)})
        print(rows[-1], flush=True)
    return rows


def part_predict(work: Path, n: int) -> dict:
    from PIL import Image

    from lifelog_ray.config import load_config
    from lifelog_ray.pipeline import run_study
    from lifelog_ray.predict import run_predict
    from lifelog_ray.sample import write_sample

    write_sample(work / "lifelog", seed=0, days=3, images_per_day=40, image_size=(96, 72))
    cfg = load_config(None, {"data.root": str(work / "lifelog"), "data.labels": str(work / "lifelog" / "labels.csv"),
                             "data.top_k": 5, "output.study": str(work / "study"), "extract.weights": "none",
                             "extract.image_size": 32, "extract.layers": "fc2", "extract.batch_size": 64,
                             "classify.classifiers": "naive_bayes",
                             "classify.search_space": str(ROOT / "jobs/configs/search_space_small.yaml"),
                             "finetune.methods": [], "ray.progress_bars": False})
    run_study(cfg, ("manifest", "extract", "classify"))
    rng = np.random.default_rng(0)
    new = work / "new"
    t = time.perf_counter()
    tiles = [Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)) for _ in range(50)]
    for i in range(n):
        day = f"2019-{1 + i // (31 * PER_DAY) % 12:02d}-{1 + i // PER_DAY % 28:02d}"
        s = 7 * 3600 + 25 * (i % PER_DAY)
        p = new / day / f"{day.replace('-', '')}_{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}_000.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        tiles[i % 50].save(p, quality=80)
    written = time.perf_counter() - t
    res = run_predict(cfg.model_copy(update={"extract": cfg.extract.model_copy(update={"batch_size": 64})}), str(new),
                      "approach1", "scale")
    return {"images": n, "write_images_s": round(written, 1), "predict_s": res.seconds,
            "images_per_s": round(n / max(res.seconds, 1e-9), 1), "events": res.events, "where": res.where}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000,725000")
    p.add_argument("--predict-images", type=int, default=100_000)
    p.add_argument("--skip-predict", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lifelog_scale.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lifelog-scale-"))
    res = {"cpus": os.cpu_count(), "summaries": part_summaries(work, [int(x) for x in args.sizes.split(",")])}
    if not args.skip_predict:
        res["predict"] = part_predict(work, args.predict_images)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
