"""Extraction on a local autoscaling cluster shaped like cluster.yaml, from zero workers.

    .venv/bin/python benchmarks/cluster.py                  # 400 frames at 64 px, 1 then 2 GPU nodes
    .venv/bin/python benchmarks/cluster.py --images 200 --size 32 --gpu-nodes 2

Each run starts a fresh lifelog_ray.local_cluster.LocalCluster (Ray's autoscaler, cluster.yaml's node types,
1 CPU per node, 1 GPU per GPU node; TensorFlow computes on the CPU), then runs `extract` as a driver on
the head. It records, from the driver's start: the nodes for the first model actors (the autoscaler's
launch), the first feature written, and the whole run; and the images/s after the first feature. The
nodes share this machine's cores, so the figures measure overhead and placement, not speed-up.
Writes benchmarks/results/cluster.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

DRIVER = """
import json, sys, time
t_start = time.perf_counter()
from lifelog_ray.config import load_config
from lifelog_ray.extract import run_extract
cfg = load_config(sys.argv[1], {"ray.address": "auto"})
s = run_extract(cfg)[0]
print(json.dumps({"driver_s": time.perf_counter() - t_start, "processed": s.processed, "rejected": s.rejected,
                  "seconds": s.seconds, "first_output_s": s.first_output_s, "first_output_rows": s.first_output_rows,
                  "pool_s": s.pool_s, "pool": s.pool, "placement": s.placement}))
"""


def make_lifelog(root: Path, n: int) -> None:
    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        rel = f"2016-08-15/20160815_{8 + i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}_000.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(root / rel, quality=85)
        rows.append((rel, ["walking", "eating food", "car"][i % 3]))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(root / "labels.csv", index=False)


def run(gpu_nodes: int, work: Path, size: int) -> dict:
    import yaml

    from lifelog_ray.config import load_config
    from lifelog_ray.ingest import build_manifest
    from lifelog_ray.local_cluster import LocalCluster

    study = work / f"study-{gpu_nodes}"
    cfg = {"data": {"root": str(work / "lifelog"), "labels": str(work / "lifelog" / "labels.csv"), "top_k": 3,
                    "taxonomy": None},
           "extract": {"weights": "none", "image_size": size, "batch_size": 16, "unit_size": 64,
                       "layers": ["fc2", "predictions"]},
           "output": {"study": str(study)}, "ray": {"progress_bars": False}}
    path = work / f"config-{gpu_nodes}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    build_manifest(load_config(path))
    with LocalCluster(max_workers={"gpu_worker": gpu_nodes, "cpu_worker": 1}, idle_timeout_s=30) as cluster:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", DRIVER, str(path)], env=cluster.process_env(),
                              capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        res = json.loads(done.stdout.strip().splitlines()[-1])
    steady = (res["processed"] + res["rejected"] - res["first_output_rows"]) / max(res["seconds"] - res["first_output_s"], 1e-9)
    return {"gpu_nodes": gpu_nodes, "wall_s": round(wall, 1), "nodes_for_pool_s": round(res["pool_s"], 1),
            "pool_actors": res["pool"], "first_feature_s": round(res["first_output_s"], 1),
            "extract_s": round(res["seconds"], 1), "images": res["processed"] + res["rejected"],
            "images_per_s_after_first": round(steady, 1), "placement": res["placement"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=64, help="model input side (px)")
    p.add_argument("--gpu-nodes", default="1,2", help="comma list of GPU node counts to run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lifelog-cluster-bench-"))
    make_lifelog(work / "lifelog", args.images)
    rows = [run(int(g), work, args.size) for g in args.gpu_nodes.split(",")]
    out = {"images": args.images, "size": args.size, "cpus": os.cpu_count(), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
