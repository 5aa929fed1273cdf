"""Paper-scale feature sets (issue 29): loading one `flatten` set of the paper's size against pyarrow's own read.

    .venv/bin/python benchmarks/paper_scale.py                      # 19,527 x 25,088 (the paper's images, flatten)
    .venv/bin/python benchmarks/paper_scale.py --images 2000        # a quick look

The data cannot be downloaded here, so the features are synthetic (float32, the paper's width and size, 10
classes, the 60/20/20 split), written as extraction writes them (features/vgg19/flatten/*.parquet, one file per
unit of 512 images). Each measurement runs in a fresh process, so its peak memory is its own:
- `pyarrow`: `pyarrow.dataset(...).to_table()` and the features column into one (rows, width) float32 matrix;
- `loader`: `lifelog_ray.classify.data.load_feature_set(..., pca=None)`, what classify, audit and the curve call.
With `--protocols` (what `protocol: both` costs), instead:
- `separate`: the set loaded twice, once per protocol (the shards' splits, then a day-split map), as classify
  did until it read each set once;
- `shared`: `load_feature_sets(..., protocols=[None, days])`, one read for both (what classify's task runs now).
`--pca 0.95` fits each protocol's PCA too (the same work in both; slow at the paper's width on 2 cores).
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


def day_map(study: Path) -> dict[str, str]:
    """A day protocol's stand-in: other splits for the same images (every 5th row moved), as a `split_day` map."""
    import pyarrow.dataset as pads

    ids = pads.dataset(study / "features" / "vgg19" / "flatten", format="parquet").to_table(
        columns=["image_id"]).column(0).to_pylist()
    return {i: ("train", "train", "train", "val", "test")[k % 5] for k, i in enumerate(ids)}


def measure(kind: str, study: Path, pca: float | None = None) -> dict:
    import numpy as np
    import pyarrow.dataset as pads

    from lifelog_ray.classify.data import load_feature_set, load_feature_sets

    days = day_map(study) if kind in ("separate", "shared") else None

    base = rss_mb()
    t0 = time.perf_counter()
    if kind == "pyarrow":
        t = pads.dataset(study / "features" / "vgg19" / "flatten", format="parquet").to_table()
        col = t.column("features").combine_chunks()
        X = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
        shape = X.shape
        assert X.dtype == np.float32
    elif kind == "separate":
        sets = [load_feature_set(study, "vgg19", "flatten", pca, splits=s) for s in (None, days)]
        shape = (sum(len(v) for v in sets[0].X.values()), sets[0].X["train"].shape[1])
    elif kind == "shared":
        sets = load_feature_sets(study, "vgg19", "flatten", pca, protocols=[None, days])
        shape = (sum(len(v) for v in sets[0].X.values()), sets[0].X["train"].shape[1])
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
    ap.add_argument("--protocols", action="store_true", help="both protocols: one read against two")
    ap.add_argument("--pca", type=float, help="with --protocols: fit each protocol's PCA too (e.g. 0.95)")
    ap.add_argument("--measure", choices=["pyarrow", "loader", "separate", "shared"], help=argparse.SUPPRESS)
    ap.add_argument("--study", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_scale.json"))
    args = ap.parse_args()
    if args.measure:  # the child: one measurement in a fresh process
        print(json.dumps(measure(args.measure, Path(args.study), args.pca)))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        study = Path(tmp) / "study"
        t0 = time.perf_counter()
        raw = write_set(study, args.images, args.width)
        print(f"wrote {args.images} x {args.width} float32 ({raw / 1e9:.2f} GB raw) in {time.perf_counter() - t0:.0f}s")
        results = {"images": args.images, "width": args.width, "raw_mb": round(raw / 2**20, 1)}
        kinds = ("separate", "shared") if args.protocols else ("pyarrow", "loader")
        results["pca"] = args.pca
        for kind in kinds * 2:  # twice each, alternating: the page cache warm
            cmd = [sys.executable, __file__, "--measure", kind, "--study", str(study)]
            cmd += ["--pca", str(args.pca)] if args.pca else []
            got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True
                                            ).stdout.strip().splitlines()[-1])
            print(got)
            results.setdefault(kind, []).append(got)
    best = {k: min(results[k], key=lambda r: r["seconds"]) for k in kinds}
    a, b = kinds
    results["time_ratio"] = round(best[b]["seconds"] / best[a]["seconds"], 2)
    results[f"{b}_peak_over_raw"] = round(best[b]["peak_above_imports_mb"] / results["raw_mb"], 2)
    results[f"{a}_peak_over_raw"] = round(best[a]["peak_above_imports_mb"] / results["raw_mb"], 2)
    if not args.protocols:
        results["load_time_ratio"] = results["time_ratio"]
        results["loader_peak_over_raw"] = results[f"{b}_peak_over_raw"]
    print(f"{b} / {a} time: {results['time_ratio']}x; peak memory / raw bytes: {a} {results[f'{a}_peak_over_raw']}x, "
          f"{b} {results[f'{b}_peak_over_raw']}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
