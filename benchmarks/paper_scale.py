"""Paper-scale feature sets (issue 29): loading one `flatten` set of the paper's size against pyarrow's own read.

    .venv/bin/python benchmarks/paper_scale.py                      # 19,527 x 25,088 (the paper's images, flatten)
    .venv/bin/python benchmarks/paper_scale.py --images 2000        # a quick look

The data cannot be downloaded here, so the features are synthetic (float32, the paper's width and size, 10
classes, the 60/20/20 split), written as extraction writes them (features/vgg19/flatten/*.parquet, one file per
unit of 512 images). Each measurement runs in a fresh process, so its peak memory is its own:
- `pyarrow`: `pyarrow.dataset(...).to_table()` and the features column into one (rows, width) float32 matrix;
- `loader`: `lifelog_ray.classify.data.load_feature_set(..., pca=None)`, what classify, audit and the curve call.
Each prints wall time and peak RSS above the process's RSS after its imports. Writes
benchmarks/results/paper_scale.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTH = 25_088  # VGG19 flatten at 224 px


def write_set(study: Path, images: int, width: int, unit: int = 512, seed: int = 0) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    out = study / "features" / "vgg19" / "flatten"
    out.mkdir(parents=True, exist_ok=True)
    splits = np.array(["train"] * 60 + ["val"] * 20 + ["test"] * 20)
    for start in range(0, images, unit):
        n = min(unit, images - start)
        ids = [f"img{i:07d}" for i in range(start, start + n)]
        feats = rng.random((n, width), dtype=np.float32)
        table = pa.table({
            "image_id": pa.array(ids, pa.string()),
            "label": pa.array([f"class{i % 10}" for i in range(start, start + n)], pa.string()),
            "split": pa.array(splits[np.arange(start, start + n) % 100].tolist(), pa.string()),
            "day": pa.array(["2016-08-15"] * n, pa.string()),
            "features": pa.FixedSizeListArray.from_arrays(feats.reshape(-1), width),
        })
        pq.write_table(table, out / f"unit{start // unit:05d}.parquet")
    return images * width * 4


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def measure(kind: str, study: Path) -> dict:
    import numpy as np
    import pyarrow.dataset as pads

    from lifelog_ray.classify.data import load_feature_set

    base = rss_mb()
    t0 = time.perf_counter()
    if kind == "pyarrow":
        t = pads.dataset(study / "features" / "vgg19" / "flatten", format="parquet").to_table()
        col = t.column("features").combine_chunks()
        X = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        shape = X.shape
        assert X.dtype == np.float32
    else:
        fs = load_feature_set(study, "vgg19", "flatten", None)
        shape = (sum(len(v) for v in fs.X.values()), fs.X["train"].shape[1])
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"kind": kind, "seconds": round(secs, 2), "peak_above_imports_mb": round(peak - base, 1),
            "rows": int(shape[0]), "width": int(shape[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=19_527)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--workdir", help="keep the synthetic study here (default: a temp folder, removed)")
    ap.add_argument("--measure", choices=["pyarrow", "loader"], help=argparse.SUPPRESS)
    ap.add_argument("--study", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_scale.json"))
    args = ap.parse_args()
    if args.measure:  # the child: one measurement in a fresh process
        print(json.dumps(measure(args.measure, Path(args.study))))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        study = Path(tmp) / "study"
        t0 = time.perf_counter()
        raw = write_set(study, args.images, args.width)
        print(f"wrote {args.images} x {args.width} float32 ({raw / 1e9:.2f} GB raw) in {time.perf_counter() - t0:.0f}s")
        results = {"images": args.images, "width": args.width, "raw_mb": round(raw / 2**20, 1)}
        for kind in ("pyarrow", "loader", "pyarrow", "loader"):  # twice each, alternating: the page cache warm
            got = json.loads(subprocess.run([sys.executable, __file__, "--measure", kind, "--study", str(study)],
                                            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            print(got)
            results.setdefault(kind, []).append(got)
    best = {k: min(results[k], key=lambda r: r["seconds"]) for k in ("pyarrow", "loader")}
    results["load_time_ratio"] = round(best["loader"]["seconds"] / best["pyarrow"]["seconds"], 2)
    results["loader_peak_over_raw"] = round(best["loader"]["peak_above_imports_mb"] / results["raw_mb"], 2)
    print(f"loader / pyarrow time: {results['load_time_ratio']}x; loader peak memory / raw bytes: "
          f"{results['loader_peak_over_raw']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
