"""Publishing extracted units (issue 28): what the driver pays per unit, in the driver (as before) and now.

    .venv/bin/python benchmarks/publish.py                    # 8 units of 512 images, VGG19's four taps at 224 px
    .venv/bin/python benchmarks/publish.py --units 4 --parts 1
    .venv/bin/python benchmarks/publish.py --store s3 --units 4   # on an S3 API (moto, in a process of its own)

Each unit is staged as the writers stage it (``--parts`` Parquet parts per layer, float32, the taps' real widths:
flatten 25,088, fc1 4,096, fc2 4,096, predictions 1,000), then published two ways, on the same files:
- `driver`: what extract's driver did until 2026-12-07, `UnitLedger.publish` and the marker in the driver's
  loop, one unit after another (reading the parts back, concatenating, writing the unit's file);
- `tasks`: what it does now, `UnitTracker.record` with the writers' summary rows: the driver counts and hands each
  unit to its writer node's publisher (a `UnitPublisher` actor running `publish_unit`), and collects them at the end.
For each: the driver's CPU time per unit (its own cost: the images per second one driver core could pass at
that cost), and the wall time until every unit is published. With tasks the driver keeps at most
`max_in_flight` publishing tasks running (extract sets 2 per model actor, at least 4; here 4), so when publishing
falls behind, the driver waits: that wait is back-pressure, not the driver's work, and is not in its CPU time.
With `--store s3` the staged parts, the units and the markers live in a bucket of a local S3 server (moto's,
started as a process of its own, so its CPU is not counted as the driver's): in the driver, every unit's bytes come
down to the driver and go back up. Writes benchmarks/results/publish.json (or --out; publish_s3.json with s3).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lifelog_ray import storage  # noqa: E402
from lifelog_ray.extract import UnitLedger, UnitTracker  # noqa: E402

WIDTHS = {"flatten": 25_088, "fc1": 4_096, "fc2": 4_096, "predictions": 1_000}


def stage_units(model_dir: Path, run: str, units: int, unit_size: int, parts: int, seed: int = 0) -> pd.DataFrame:
    """Staged parts as ShardWriter writes them; returns the writers' summary rows (one per part)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(units):
        unit, ids = f"2016-08-{15 + u:02d}_u{u:04d}", [f"img{u:04d}_{i:04d}" for i in range(unit_size)]
        for k, chunk in enumerate(np.array_split(np.array(ids), parts)):
            part = f"{unit}_p{k}"
            for layer, width in WIDTHS.items():
                feats = rng.random((len(chunk), width), dtype=np.float32)
                table = pa.table({"image_id": pa.array(chunk.tolist()), "label": ["walking"] * len(chunk),
                                  "split": ["train"] * len(chunk), "day": [unit[:10]] * len(chunk),
                                  "features": pa.FixedSizeListArray.from_arrays(feats.reshape(-1), width)})
                storage.write_table_atomic(table, model_dir / "_staging" / run / layer / f"{part}.parquet")
            rows.append({"unit": unit, "part": part, "n_ok": len(chunk), "rejects": "[]", "day": unit[:10],
                         "ids": chunk.tolist()})
    return pd.DataFrame(rows)


def pending_of(rows: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame([{"image_id": i, "unit": r.unit, "day": r.day} for r in rows.itertuples() for i in r.ids])


def in_driver(model_dir: Path, rows: pd.DataFrame) -> dict:
    ledger, staging = UnitLedger(model_dir), model_dir / "_staging" / "driver"
    w0, c0 = time.perf_counter(), time.process_time()
    for unit, g in rows.groupby("unit", sort=False):
        published = ledger.publish(unit, g["day"].iloc[0], g["part"].tolist(), list(WIDTHS), staging)
        ledger.complete(unit, g["day"].iloc[0], sorted(published), [unit], [])
    wall = time.perf_counter() - w0
    return {"driver_cpu_s": time.process_time() - c0, "until_published_s": wall}


def in_tasks(model_dir: Path, rows: pd.DataFrame) -> dict:
    import ray

    node = ray.get_runtime_context().get_node_id()
    tracker = UnitTracker(UnitLedger(model_dir), pending_of(rows), "vgg19", list(WIDTHS),
                          model_dir / "_staging" / "tasks")
    batches = [b.assign(node=node)[["unit", "part", "n_ok", "rejects", "node"]] for _, b in rows.groupby("unit")]
    w0, c0 = time.perf_counter(), time.process_time()
    for b in batches:  # what the streaming loop hands the tracker: the writers' rows, one per part
        tracker.record(b)
    tracker.collect()
    out = {"driver_cpu_s": time.process_time() - c0, "until_published_s": time.perf_counter() - w0,
           "units_published": tracker.published}
    tracker.close()
    return out


def staged_mb(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in storage.files(model_dir / "_staging", (".parquet",))) / 1e6


@contextlib.contextmanager
def s3_server() -> Iterator[dict]:
    """moto's S3 server in a process of its own, a bucket `bench`, and the storage options that reach it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        options = {"s3": {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}}
        import s3fs

        fs = s3fs.S3FileSystem(**options["s3"])
        deadline = time.monotonic() + 60
        while True:
            try:
                fs.mkdir("bench")
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.3)
        yield options
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--unit-size", type=int, default=512)
    ap.add_argument("--parts", type=int, default=2, help="staged parts per unit and layer (batch 32, unit 512: most have 2+)")
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / ("publish.json" if args.store == "local" else "publish_s3.json")
    import ray

    from lifelog_ray.config import RayConfig
    from lifelog_ray.runtime import ensure_ray

    ensure_ray(RayConfig(address="local", num_cpus=2, progress_bars=False, log_to_driver=False))
    tmp = Path(tempfile.mkdtemp(prefix="llr-publish-"))
    with contextlib.ExitStack() as stack:  # on the way out: Ray, then the S3 server, then the folder
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        if args.store == "s3":
            options = stack.enter_context(s3_server())
            root = storage.to_path("s3://bench/publish", options)
        else:
            root = tmp
        stack.callback(ray.shutdown)
        images = args.units * args.unit_size
        result: dict = {"store": args.store, "units": args.units, "unit_size": args.unit_size, "parts": args.parts,
                        "taps": WIDTHS}
        for how, fn in (("driver", in_driver), ("tasks", in_tasks)):
            model_dir = root / how / "features" / "vgg19"
            rows = stage_units(model_dir, how, args.units, args.unit_size, args.parts)
            mb = staged_mb(model_dir)
            r = fn(model_dir, rows)
            markers = len(list(storage.files(model_dir / "_units", (".json",))))
            assert markers == args.units, (how, markers)
            r |= {"staged_mb": round(mb, 1), "driver_cpu_ms_per_unit": 1000 * r["driver_cpu_s"] / args.units,
                  "driver_images_per_cpu_s": images / max(r["driver_cpu_s"], 1e-9)}
            result[how] = r
            print(f"{how:>6}: driver CPU {r['driver_cpu_s']:.3f}s for {args.units} units ({mb:.0f} MB staged): "
                  f"{r['driver_cpu_ms_per_unit']:.1f} ms a unit, {r['driver_images_per_cpu_s']:,.0f} images per "
                  f"driver CPU second; every unit published after {r['until_published_s']:.2f}s")
        result["driver_cpu_ratio"] = result["driver"]["driver_cpu_s"] / max(result["tasks"]["driver_cpu_s"], 1e-9)
        print(f"the driver's CPU per unit: {result['driver_cpu_ratio']:.0f}x less with tasks")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
