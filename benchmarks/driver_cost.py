"""The driver's own cost per image of `lifelog-ray extract`, against the plain Ray Data idiom (issue 28).

    .venv/bin/python benchmarks/driver_cost.py                        # 400 and 2,000 images, VGG19 at 32 px
    .venv/bin/python benchmarks/driver_cost.py --stand-in --size 224  # a model stage that costs nothing
    .venv/bin/python benchmarks/driver_cost.py --stand-in --size 224 --batch 128 --out benchmarks/results/driver_cost_standin_b128.json

Two pipelines on the same JPEGs (640x480, as a wearable camera writes them) and the same model (VGG19, its four
taps, a seeded random init: no download here), one model actor each, on a local Ray of this machine:
- `lifelog-ray`: `extract_model`, what `lifelog-ray extract` runs once its weights are resolved (decode tasks,
  the model actors, the shard writers, the units published by the writers' nodes, the ledger, the lease);
- `idiom`: `ray.data.read_binary_files` -> decode tasks (the same decoder) -> one model actor (the same
  `FeatureExtractor`) -> `write_parquet`, the plain Ray Data way to do the same with none of the guarantees.

Each (pipeline, size) runs in a fresh process that starts Ray first and then measures, in the driver process
and around the run only: CPU time (user + system, `getrusage`), the bytes its read/write calls moved
(`rchar`/`wchar` of /proc/self/io: files and pipes, not shared memory) and the bytes it wrote to storage
(`write_bytes`). The per-image figure is the difference between the two sizes divided by the difference in
images, so what a run pays once (planning, actor starts, Ray Data's start) cancels out.

`--stand-in`: the model actor is replaced, in both pipelines, by one that emits the four taps at VGG19's real
widths (flatten 25,088, fc1 4,096, fc2 4,096, predictions 1,000; zeros) and computes nothing, so everything but
the model is measured: decode, the writers' 137 KB an image, publishing. From the driver's CPU per image follows
how many GPUs one driver core could keep fed. Writes benchmarks/results/driver_cost.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = ("flatten", "fc1", "fc2", "predictions")
WIDTHS = {"flatten": 25_088, "fc1": 4_096, "fc2": 4_096, "predictions": 1_000}
H100_IMAGES_S = 3_500  # VGG19 model-only on one H100 (BENCHMARKS.md, 2026-11-24)


class StandIn:
    """A model stage that costs nothing: the taps at VGG19's real widths, zeros, for every decoded row."""

    def __init__(self, spec=None, weights=None, backend="tensorflow", decode="cpu", max_pixels=0, jpeg_draft=True,
                 pad_to=None, gpu_decoder=None):
        self.layers = list(spec.layers)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["image_id"])
        out = {k: v for k, v in batch.items() if k not in ("image", "data", "gpu_ok")}
        for layer in self.layers:
            out[f"feat__{layer}"] = np.zeros((n, WIDTHS[layer]), dtype=np.float32)
        return out


def io_counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(fields[k]) for k in ("rchar", "wchar", "write_bytes")}


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def config(root: Path, study: Path, size: int, batch: int):
    from lifelog_ray.config import load_config

    return load_config(None, {
        "data.root": str(root), "data.labels": str(root / "labels.csv"), "data.top_k": 20,
        "output.study": str(study), "ray.progress_bars": False, "ray.address": "local",
        "extract.models": "vgg19", "extract.layers": ",".join(LAYERS), "extract.weights": "none",
        "extract.image_size": str(size), "extract.batch_size": str(batch), "extract.unit_size": "256",
        "extract.num_actors": "1"})


def idiom(paths: list[str], spec, weights, size: int, batch: int, out: Path, model_cls) -> int:
    """The plain Ray Data chain: read the files, decode in tasks, one model actor, write Parquet."""
    import ray

    from lifelog_ray.images import decode_image

    def decode(batch: dict) -> dict:
        n = len(batch["path"])
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        for i, data in enumerate(batch["bytes"]):
            images[i] = decode_image(bytes(data), size, 89_478_485, True)
        return {"image_id": batch["path"], "image": images, "error": np.full(n, ""), "error_detail": np.full(n, "")}

    ds = ray.data.read_binary_files(paths, include_paths=True)
    ds = ds.map_batches(decode, batch_size=batch, batch_format="numpy")
    ds = ds.map_batches(model_cls, fn_constructor_kwargs={"spec": spec, "weights": ray.put(weights)}, batch_size=batch,
                        compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")
    ds.write_parquet(str(out))
    return len(paths)


def child(pipeline: str, root: Path, work: Path, size: int, batch: int, stand_in: bool) -> dict:
    """One measured run, in this (fresh) process."""
    import pandas as pd

    from lifelog_ray import extract as extract_mod
    from lifelog_ray.backbones import FeatureExtractor, resolve_weights
    from lifelog_ray.ingest import build_manifest
    from lifelog_ray.runtime import ensure_ray

    cfg = config(root, work / "study", size, batch)
    build_manifest(cfg)
    spec = extract_mod.spec_for(cfg, "vgg19")
    weights = resolve_weights(spec)
    ensure_ray(cfg.ray)
    if stand_in:
        extract_mod.FeatureExtractor = StandIn  # model_stage builds its actors from this name
    manifest = pd.read_parquet(cfg.study_dir / "manifest.parquet")
    io0, cpu0, t0 = io_counters(), cpu_s(), time.perf_counter()
    if pipeline == "lifelog-ray":
        s = extract_mod.extract_model(cfg, "vgg19", weights)
        n = s.processed + s.rejected
    else:
        n = idiom(manifest["path"].tolist(), spec, weights, size, batch, work / "idiom",
                  StandIn if stand_in else FeatureExtractor)
    wall, cpu, io1 = time.perf_counter() - t0, cpu_s() - cpu0, io_counters()
    return {"pipeline": pipeline, "images": n, "wall_s": wall, "driver_cpu_s": cpu,
            **{k: io1[k] - io0[k] for k in io0}}


def make_lifelog(root: Path, n: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from extract import make_lifelog as draw  # the extraction benchmark's camera frames

    draw(root, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs=2, default=[400, 2000])
    p.add_argument("--size", type=int, default=32, help="the model's input (px); 32 is VGG's smallest")
    p.add_argument("--batch", type=int, default=16, help="images per model batch (extract.batch_size), both pipelines")
    p.add_argument("--stand-in", action="store_true", help="a model stage that computes nothing (real widths)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=3, metavar=("PIPELINE", "ROOT", "WORK"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        pipeline, root, work = a.child
        print(json.dumps(child(pipeline, Path(root), Path(work), a.size, a.batch, a.stand_in)))
        return
    out = a.out or ROOT / "benchmarks" / "results" / ("driver_cost_standin.json" if a.stand_in else "driver_cost.json")
    runs = []
    with tempfile.TemporaryDirectory(prefix="driver-cost-") as tmp:
        for n in a.sizes:
            make_lifelog(Path(tmp) / f"lifelog{n}", n)
        for n in a.sizes:
            for pipeline in ("lifelog-ray", "idiom"):
                work = Path(tmp) / f"{pipeline}{n}"
                cmd = [sys.executable, __file__, "--size", str(a.size), "--batch", str(a.batch),
                       *(["--stand-in"] if a.stand_in else []),
                       "--child", pipeline, str(Path(tmp) / f"lifelog{n}"), str(work)]
                got = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"RAY_DEDUP_LOGS": "0"})
                if got.returncode != 0:
                    sys.exit(f"{pipeline} at {n} images failed:\n{got.stderr[-3000:]}")
                run = json.loads(got.stdout.strip().splitlines()[-1])
                runs.append(run)
                print(f"{pipeline:12s} {run['images']:6d} images: {run['wall_s']:6.1f} s, driver CPU "
                      f"{run['driver_cpu_s']:6.2f} s, read {run['rchar'] / 1e6:8.1f} MB, written "
                      f"{run['wchar'] / 1e6:8.1f} MB", flush=True)
    per_image = {}
    for pipeline in ("lifelog-ray", "idiom"):
        small, big = (r for r in runs if r["pipeline"] == pipeline)
        dn = big["images"] - small["images"]
        per_image[pipeline] = {
            "driver_cpu_ms": 1e3 * (big["driver_cpu_s"] - small["driver_cpu_s"]) / dn,
            "read_bytes": (big["rchar"] - small["rchar"]) / dn,
            "written_bytes": (big["wchar"] - small["wchar"]) / dn,
            "storage_written_bytes": (big["write_bytes"] - small["write_bytes"]) / dn,
            "images_s": dn / (big["wall_s"] - small["wall_s"]),
        }
    ours, plain = per_image["lifelog-ray"], per_image["idiom"]
    result = {"sizes": a.sizes, "image_size": a.size, "batch": a.batch, "stand_in": a.stand_in, "runs": runs, "per_image": per_image,
              "cpu_ratio": ours["driver_cpu_ms"] / plain["driver_cpu_ms"] if plain["driver_cpu_ms"] > 0 else None,
              "one_driver_core_images_s": 1e3 / ours["driver_cpu_ms"] if ours["driver_cpu_ms"] > 0 else None}
    if result["one_driver_core_images_s"]:
        result["h100s_one_driver_core_feeds"] = result["one_driver_core_images_s"] / H100_IMAGES_S
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for pipeline, v in per_image.items():
        print(f"{pipeline:12s} per image: driver CPU {v['driver_cpu_ms']:.3f} ms, read {v['read_bytes']:,.0f} B, "
              f"written {v['written_bytes']:,.0f} B (to storage {v['storage_written_bytes']:,.0f} B), "
              f"{v['images_s']:.0f} images/s")
    if result["cpu_ratio"] is not None:
        print(f"driver CPU per image, lifelog-ray / idiom: {result['cpu_ratio']:.2f}x")
    if result.get("h100s_one_driver_core_feeds"):
        print(f"one driver core at this cost: {result['one_driver_core_images_s']:,.0f} images/s, "
              f"{result['h100s_one_driver_core_feeds']:.1f} H100s at {H100_IMAGES_S:,} images/s")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
