"""Fine-tuning throughput: images/s per worker and time per epoch, 1 vs 2 Ray Train workers, same data.

    .venv/bin/python benchmarks/finetune.py [--method m1] [--size 64] [--epochs 3]

Uses the bundled synthetic sample (4 days x 60 images) and a seeded random init. Epoch 1 includes
TensorFlow graph building and the first pass of the data pipeline, so the steady state is the mean of
the later epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifelog_ray.config import load_config  # noqa: E402
from lifelog_ray.finetune import run_finetune  # noqa: E402
from lifelog_ray.ingest import build_manifest  # noqa: E402
from lifelog_ray.sample import write_sample  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="m1")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/finetune.json")
    args = ap.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="lifelog-ftbench-"))
    write_sample(work / "lifelog", seed=0, days=4, images_per_day=60, image_size=(320, 240))
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    res = {}
    for workers in (1, 2):
        cfg = load_config(None, {
            "data.root": str(work / "lifelog"), "data.labels": str(work / "lifelog" / "labels.csv"),
            "output.study": str(work / f"study{workers}"), "finetune.weights": "none",
            "finetune.image_size": args.size, "finetune.epochs": args.epochs, "finetune.methods": args.method,
            "finetune.workers": workers, "finetune.cpus_per_worker": 0.5, "finetune.patience": 99,
            "finetune.batch_size": 16, "ray.progress_bars": False})
        build_manifest(cfg)
        (run,) = run_finetune(cfg)
        h = pd.read_csv(run.output / "history.csv")
        later = h[h["epoch"] > 1]
        res[f"{workers}_workers"] = {
            "epoch_s": h["epoch_s"].round(2).tolist(),
            "steady_epoch_s": float(later["epoch_s"].mean()),
            "steady_images_per_s_per_worker": float(later["images_per_s_per_worker"].mean()),
            "steady_images_per_s_total": float(later["images_per_s_per_worker"].mean() * workers),
        }
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
