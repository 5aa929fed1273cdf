"""Ingest at a lifelog's scale (issue 28): `build_manifest` on N frames against the floor of its work.

    .venv/bin/python benchmarks/ingest.py                         # 100,000 and 1,000,000 frames
    .venv/bin/python benchmarks/ingest.py --sizes 100000

The lifelog is LSC-shaped: day folders of 1,450 frames (the LSC's rate), names that carry the time
(`YYYYMMDD_HHMMSS_000.jpg`), a labels CSV naming every frame with one of 10 activities. The files are empty:
ingest reads names, not pixels, when a name carries the time. For each N, in fresh processes:
- `floor`: what any ingest must do, walk the tree once (`os.walk`) and read the labels CSV (pandas);
- `build_manifest`: `lifelog-ray manifest`'s function, with its lease, rejects, splits and outputs.
Each reports wall time and peak RSS; the ratio of the two is the figure (in one run, on one machine).
Writes benchmarks/results/ingest.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PER_DAY = 1450
LABELS = ["using computer", "walking", "eating food", "commuting", "watching tv", "reading", "talking", "cooking",
          "shopping", "using mobile phone"]


def make_lifelog(root: Path, n: int) -> None:
    import datetime as dt

    import numpy as np
    import pandas as pd

    rels = []
    start = dt.datetime(2019, 1, 1)
    for i in range(n):
        day, k = divmod(i, PER_DAY)
        t = start + dt.timedelta(days=day, seconds=6 * 3600 + 25 * k)
        rels.append(f"{t:%Y-%m-%d}/{t:%Y%m%d_%H%M%S}_000.jpg")
    for d in sorted({r[:10] for r in rels}):
        (root / d).mkdir(parents=True)
    for r in rels:
        (root / r).touch()
    rng = np.random.default_rng(0)
    pd.DataFrame({"image_path": rels, "label": np.array(LABELS)[rng.integers(0, len(LABELS), n)]}).to_csv(
        root / "labels.csv", index=False)


def child(kind: str, root: Path, study: Path) -> dict:
    """One measurement, in this (fresh) process: wall time and peak RSS above the RSS after imports."""
    import os

    import pandas as pd

    from lifelog_ray.config import StudyConfig
    from lifelog_ray.ingest import build_manifest

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "floor":
        files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
        labels = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
        rows = len(labels)
        assert len(files) == rows + 1  # the frames and labels.csv
    else:
        cfg = StudyConfig.model_validate({"data": {"root": str(root), "labels": str(root / "labels.csv"),
                                                   "layout": "lsc", "top_k": 10}, "output": {"study": str(study)}})
        res = build_manifest(cfg)
        rows = len(res.manifest)
        assert rows + len(res.rejects) == res.input_rows
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": round(wall, 2), "peak_mb_above_imports": round((peak - base) / 1024, 1), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest.json")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="llr-ingest-"))
        try:
            t0 = time.perf_counter()
            make_lifelog(tmp / "lifelog", n)
            made = time.perf_counter() - t0
            row = {"frames": n, "days": -(-n // PER_DAY), "make_s": round(made, 1)}
            for kind in ("floor", "build_manifest"):
                out = subprocess.run([sys.executable, __file__, "--child", kind, str(tmp / "lifelog"), str(tmp / "study")],
                                     capture_output=True, text=True, check=True)
                row[kind] = json.loads(out.stdout.strip().splitlines()[-1])
            row["ratio"] = round(row["build_manifest"]["wall_s"] / max(row["floor"]["wall_s"], 1e-9), 2)
            row["per_frame_us"] = round(1e6 * row["build_manifest"]["wall_s"] / n, 1)
            results.append(row)
            print(f"{n:>9,} frames: build_manifest {row['build_manifest']['wall_s']:.1f}s "
                  f"(+{row['build_manifest']['peak_mb_above_imports']:.0f} MB), floor {row['floor']['wall_s']:.1f}s "
                  f"(+{row['floor']['peak_mb_above_imports']:.0f} MB): {row['ratio']:.1f}x the floor, "
                  f"{row['per_frame_us']:.1f} us a frame", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
