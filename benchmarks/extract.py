"""Extraction benchmark: ratios in one run, on one machine, on the same images.

    .venv/bin/python benchmarks/extract.py                  # defaults: 256 JPEGs (640x480), VGG19 at 224
    .venv/bin/python benchmarks/extract.py --images 64 --skip-memory   # a quick look

1. model-only throughput (pre-decoded tensors, same batch size, same process)
2. the full Ray Data pipeline (read, decode, resize, infer, write), steady state after the first output
3. the paper's layer-by-layer approach (one forward pass per tap) vs one pass for all taps
4. float32 vs bfloat16 (throughput, top-1 agreement of the `predictions` tap)
5. peak memory of the whole Ray process tree, N vs 4N images (it must not grow with N)
Weights are a seeded random init (no download here); throughput does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifelog_ray.backbones import BackboneSpec, FeatureExtractor, resolve_weights  # noqa: E402
from lifelog_ray.config import load_config  # noqa: E402
from lifelog_ray.images import decode_image  # noqa: E402
from lifelog_ray.sample import ACTIVITIES, draw_scene  # noqa: E402
from lifelog_ray.storage import read_bytes  # noqa: E402

LAYERS = ("flatten", "fc1", "fc2", "predictions")


def make_lifelog(root: Path, n: int, size=(640, 480)) -> None:
    rng = np.random.default_rng(0)
    names = list(ACTIVITIES)
    rows = []
    for i in range(n):
        day = f"2016-08-{15 + i // 1000:02d}"
        rel = f"{day}/{day.replace('-', '')}_{(i % 1000) // 60 + 8:02d}{i % 60:02d}{i % 37:02d}_{i:03d}.jpg"
        (root / day).mkdir(parents=True, exist_ok=True)
        act = names[i % len(names)]
        draw_scene(act, size, rng).save(root / rel, quality=90)
        rows.append((rel, ACTIVITIES[act].raw_labels[0]))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(root / "labels.csv", index=False)


def cfg_for(root: Path, study: Path, **extract):
    over = {"data.root": str(root), "data.labels": str(root / "labels.csv"), "data.top_k": 20,
            "output.study": str(study), "ray.progress_bars": False}
    over.update({f"extract.{k}": v for k, v in extract.items()})
    return load_config(None, over)


def model_rate(ex: FeatureExtractor, images: np.ndarray, batch: int) -> tuple[float, list[np.ndarray]]:
    ex.features(images[:batch])  # warm-up: trace and allocate
    outs: list[list[np.ndarray]] = []
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        outs.append(ex.features(images[i: i + batch]))
    secs = time.perf_counter() - t0
    return len(images) / secs, [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


class TreeMemory:
    """Peak summed RSS of this process and every Ray process (driver, raylet, workers, object store)."""

    def __init__(self) -> None:
        import psutil

        self.psutil, self.peak, self._stop = psutil, 0, threading.Event()

    def _rss(self) -> int:
        total = 0
        for p in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid == self.psutil.Process().pid or "ray" in cmd or "raylet" in (p.info["name"] or ""):
                total += p.info["memory_info"].rss if p.info["memory_info"] else 0
        return total

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss())
                time.sleep(0.5)
        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--memory-images", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/out/extract.json")
    args = ap.parse_args()
    import ray

    from lifelog_ray.extract import run_extract
    from lifelog_ray.ingest import build_manifest

    work = Path(tempfile.mkdtemp(prefix="lifelog-bench-"))
    root = work / "lifelog"
    make_lifelog(root, args.images)
    cfg = cfg_for(root, work / "study", weights="none", image_size=args.size, batch_size=args.batch_size,
                  unit_size=max(args.batch_size, 32))
    manifest = build_manifest(cfg).manifest
    res: dict = {"images": len(manifest), "size": args.size, "batch_size": args.batch_size}
    spec = BackboneSpec("vgg19", LAYERS, "none", args.size)
    weights = resolve_weights(spec)
    t0 = time.perf_counter()
    images = np.stack([decode_image(read_bytes(p), args.size, 10**9) for p in manifest["path"]])
    res["decode_img_s_one_core"] = len(images) / (time.perf_counter() - t0)

    one = FeatureExtractor(spec, weights)
    res["model_only_img_s"], f32 = model_rate(one, images, args.batch_size)
    per_tap = []
    for layer in LAYERS:
        ex = FeatureExtractor(BackboneSpec("vgg19", (layer,), "none", args.size), weights)
        r, _ = model_rate(ex, images, args.batch_size)
        per_tap.append(len(images) / r)
    res["layer_by_layer_s"] = sum(per_tap)
    res["one_pass_s"] = len(images) / res["model_only_img_s"]
    res["one_pass_speedup"] = res["layer_by_layer_s"] / res["one_pass_s"]
    bf = FeatureExtractor(BackboneSpec("vgg19", LAYERS, "none", args.size, precision="bfloat16"), weights)
    res["bf16_img_s"], b16 = model_rate(bf, images, args.batch_size)
    res["bf16_speedup"] = res["bf16_img_s"] / res["model_only_img_s"]
    res["bf16_top1_agreement"] = float((f32[3].argmax(1) == b16[3].argmax(1)).mean())
    del one, bf

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    (s,) = run_extract(cfg)
    steady = (s.processed + s.rejected - s.first_output_rows) / max(s.seconds - s.first_output_s, 1e-9)
    res.update(pipeline_img_s_end_to_end=(s.processed + s.rejected) / s.seconds, pipeline_img_s_steady=steady,
               pipeline_startup_s=s.first_output_s, pipeline_vs_model=steady / res["model_only_img_s"])
    if not args.skip_memory:  # streaming: memory must not grow with the number of images
        for n in (args.memory_images, 4 * args.memory_images):
            mroot = work / f"mem{n}"
            make_lifelog(mroot, n, size=(320, 240))
            mcfg = cfg_for(mroot, work / f"mstudy{n}", weights="none", image_size=32, batch_size=32, unit_size=256)
            build_manifest(mcfg)
            with TreeMemory() as mem:
                run_extract(mcfg)
            res[f"peak_rss_mb_{n}"] = mem.peak / 2**20
    ray.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    for k, v in res.items():
        print(f"{k:>28}: {v:.3f}" if isinstance(v, float) else f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
