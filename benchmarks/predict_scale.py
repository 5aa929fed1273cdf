"""`predict` at a lifelog's size, and what a resume saves (issue 29).

    .venv/bin/python benchmarks/predict_scale.py                      # 10,150 and 101,500 frames, resume at 10,150
    .venv/bin/python benchmarks/predict_scale.py --days 2,20 --resume-days 2   # a quick look

A small trained study (random VGG19 at 32 px, `fc2`, Naive Bayes: the classifier's cost is not what is measured
here) labels N camera frames (96x72 JPEGs, a day folder of 1,450 frames as in the LSC), each size in a fresh
process running `run_predict` (what `lifelog-ray predict` runs), on a local Ray of this machine. For each size:
the wall time of the whole command (Ray's start, the frames' listing, the pipeline, the per-day work, the events),
the seconds per 1,000 frames, and the driver process's peak RSS (sampled every 0.2 s; Ray's own processes and the
workers are not the driver). Then the smaller set again under another name: the process (and the Ray it started)
is killed with SIGKILL once half its frames are written, and the same command is run again: how many frames it
found done, its time, and the time it saved against a run from scratch. Writes benchmarks/results/predict_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
PER_DAY = 1450


def config(work: Path):
    from lifelog_ray.config import load_config

    return load_config(None, {
        "data.root": str(work / "lifelog"), "data.labels": str(work / "lifelog" / "labels.csv"), "data.top_k": 5,
        "output.study": str(work / "study"), "extract.weights": "none", "extract.image_size": 32,
        "extract.layers": "fc2", "extract.batch_size": 64, "classify.classifiers": "naive_bayes",
        "classify.search_space": str(ROOT / "jobs/configs/search_space_small.yaml"), "finetune.methods": [],
        "ray.progress_bars": False, "ray.address": "local"})


def prepare(work: Path, sets: list[int]) -> float:
    """The trained study, and the frames: a CSV of paths per set (in days); returns the seconds writing took."""
    import ray
    from PIL import Image

    from lifelog_ray.pipeline import run_study
    from lifelog_ray.sample import write_sample

    write_sample(work / "lifelog", seed=0, days=3, images_per_day=40, image_size=(96, 72))
    run_study(config(work), ("manifest", "extract", "classify"))
    ray.shutdown()  # each measured run starts its own
    rng = np.random.default_rng(0)
    tiles = [Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)) for _ in range(50)]
    t = time.perf_counter()
    rows = []
    for i in range(max(sets) * PER_DAY):
        day = (pd.Timestamp("2019-01-01") + pd.Timedelta(days=i // PER_DAY)).strftime("%Y-%m-%d")
        s = 7 * 3600 + 25 * (i % PER_DAY)
        p = work / "frames" / day / f"{day.replace('-', '')}_{s // 3600:02d}{s // 60 % 60:02d}{s % 60:02d}_000.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        tiles[i % 50].save(p, quality=80)
        rows.append(str(p))
    for n_days in sets:
        pd.DataFrame({"path": rows[: n_days * PER_DAY]}).to_csv(work / f"frames-{n_days}d.csv", index=False)
    return time.perf_counter() - t


def child(work: Path, images: str, name: str) -> None:
    from lifelog_ray.predict import run_predict

    t0 = time.perf_counter()
    res = run_predict(config(work), images, "approach1", name)
    print(json.dumps({"images": res.images, "already": res.already, "wall_s": time.perf_counter() - t0,
                      "predict_s": res.seconds, "events": res.events, "where": res.where}))


class PeakRss:
    def __init__(self, pid: int) -> None:
        import psutil

        self.proc, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.2):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:  # noqa: BLE001 - the process ended
                return

    def done(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


def rows_written(out: Path) -> int:
    import pyarrow.parquet as pq

    n = 0
    for f in out.glob("day=*/*.parquet"):
        try:
            n += pq.ParquetFile(f).metadata.num_rows
        except Exception:  # noqa: BLE001 - caught mid-rename
            pass
    return n


def run_child(work: Path, images: Path, name: str, kill_at: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(work), str(images), name]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    rss = PeakRss(p.pid)
    if kill_at is not None:
        out = work / "study" / "predictions" / name
        t0 = time.perf_counter()
        while p.poll() is None and rows_written(out) < kill_at:
            time.sleep(0.5)
        os.killpg(p.pid, signal.SIGKILL)  # the driver and the Ray it started: a machine going away
        p.wait(timeout=60)
        return {"killed_after_s": time.perf_counter() - t0, "written_when_killed": rows_written(out)}
    stdout, stderr = p.communicate()
    peak = rss.done()
    if p.returncode != 0:
        sys.exit(f"predict {name} failed:\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "driver_peak_rss_mb": round(peak / 2**20, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", default="7,70", help="sizes in days of 1,450 frames")
    p.add_argument("--resume-days", type=int, default=7)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "predict_scale.json")
    p.add_argument("--child", nargs=3, metavar=("WORK", "IMAGES", "NAME"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(Path(a.child[0]), a.child[1], a.child[2])
        return
    sizes = sorted(int(x) for x in a.days.split(","))
    work = Path(tempfile.mkdtemp(prefix="predict-scale-"))
    written = prepare(work, sorted({*sizes, a.resume_days}))
    print(f"study trained, {max(sizes) * PER_DAY:,} frames written in {written:.0f} s ({work})", flush=True)
    result = {"cpus": os.cpu_count(), "frames_per_day": PER_DAY, "sizes": [], "resume": {}}
    for d in sizes:
        r = run_child(work, work / f"frames-{d}d.csv", f"scale-{d}d")
        r["s_per_1000_frames"] = round(1000 * r["wall_s"] / r["images"], 2)
        result["sizes"].append({"days": d, **r})
        print(json.dumps(result["sizes"][-1]), flush=True)
    small, big = result["sizes"][0], result["sizes"][-1]
    result["per_frame_cost_ratio_small_over_big"] = round(small["s_per_1000_frames"] / big["s_per_1000_frames"], 3)
    result["driver_rss_ratio_big_over_small"] = round(big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3)
    n = a.resume_days * PER_DAY
    images = work / f"frames-{a.resume_days}d.csv"
    killed = run_child(work, images, "resume", kill_at=n // 2)
    resumed = run_child(work, images, "resume")
    scratch = next((s["wall_s"] for s in result["sizes"] if s["days"] == a.resume_days), None)
    result["resume"] = {"frames": n, **killed, "resumed": resumed, "from_scratch_s": scratch,
                        "saved_s": round(scratch - resumed["wall_s"], 1) if scratch else None}
    print(json.dumps(result["resume"]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"per-frame cost, {small['days']} days over {big['days']} days: "
          f"{result['per_frame_cost_ratio_small_over_big']}x; driver peak RSS {small['driver_peak_rss_mb']} -> "
          f"{big['driver_peak_rss_mb']} MB; resume after a kill at half way: {resumed['already']:,} frames already "
          f"done, {resumed['wall_s']:.0f} s against {scratch:.0f} s from scratch\nwrote {a.out}")


if __name__ == "__main__":
    main()
