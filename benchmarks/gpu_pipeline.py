"""The real extraction pipeline on one GPU node: figures a-e of BENCHMARKS.md's GPU section.

    python benchmarks/gpu_pipeline.py --images 32768            # on the GPU node (Ray + this package installed)
    python benchmarks/gpu_pipeline.py --smoke                   # the same steps at toy size, on any machine

a. CPU decode + resize img/s of LSC-size (1024x768) JPEGs at 1, 8 and all processes (our decode stage);
b. GPU decode + resize img/s (nvImageCodec, then the backend's antialiased bilinear squash on the device);
c. model-only img/s per Keras backend (each in its own process: KERAS_BACKEND is per process), float32
   and mixed bf16/fp16, four taps in one pass, from pixels already on the device's host;
d. `run_extract` (what `lifelog-ray extract` runs) through Ray on --images JPEGs on the node's disk, with
   decode=cpu and decode=gpu, steady state = images after the first output / time after the first output;
e. GPU utilisation during d (nvidia-smi, every 0.5 s), mean over the steady state;
and how close fc2 features of the same images are between the two decode paths (d_fidelity_fc2).
Writes benchmarks/results/gpu_pipeline.json (or --out). Weights are a seeded random init (--weights none):
throughput does not depend on their values.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
LAYERS = ["flatten", "fc1", "fc2", "predictions"]


def jpegs(n: int, size=(1024, 768), distinct: int = 64) -> list[bytes]:
    """LSC-size baseline JPEGs with camera-like content (smooth scene + noise), ``distinct`` different ones."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(n, distinct)):
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        im = np.asarray(Image.fromarray(small).resize(size, Image.BILINEAR), dtype=np.int16)
        im = np.clip(im + rng.normal(0, 6, im.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def _decode_chunk(args: tuple[list[bytes], int]) -> int:
    from lifelog_ray.images import decode_image

    chunk, size = args
    for b in chunk:
        decode_image(b, size, 10**9)
    return len(chunk)


def cpu_decode_rate(data: list[bytes], workers: int, size: int) -> float:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [(data[i::workers], size) for i in range(workers)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_decode_chunk, [(c[:2], size) for c, _ in chunks]))  # imports, warm-up
        t0 = time.perf_counter()
        done = sum(ex.map(_decode_chunk, chunks))
    return done / (time.perf_counter() - t0)


def part_model(backend: str, size: int, batch: int, n: int) -> dict:
    """c (and b, on a GPU): run in a process of its own, with KERAS_BACKEND set before any import."""
    from lifelog_ray.backbones import BackboneSpec, FeatureExtractor, resolve_weights

    out: dict = {"backend": backend}
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    weights = None
    for precision in ("float32", "bfloat16", "float16"):
        spec = BackboneSpec("vgg19", tuple(LAYERS), "none", size, precision=precision)
        weights = weights or resolve_weights(spec)
        ex = FeatureExtractor(spec, weights, backend=backend, pad_to=batch)
        ex.features(images)  # compile, warm up
        steps = max(2, n // batch)
        t0 = time.perf_counter()
        for _ in range(steps):
            ex.features(images)  # returns host arrays: the device has finished
        out[f"model_img_s_{precision}"] = round(steps * batch / (time.perf_counter() - t0), 1)
    try:
        from lifelog_ray.gpu_decode import gpu_decoder

        dec = gpu_decoder()
    except Exception as e:  # noqa: BLE001 - no GPU decoder here: b is not measured
        out["gpu_decode"] = f"not measured: {type(e).__name__}: {e}"
        return out
    data = jpegs(batch * 4)

    def decode_resize(files):
        imgs = dec.decode(files)
        batch_dev = ex.squash(imgs)  # what the model actor does with a batch the GPU decoded
        np.asarray(batch_dev[:1])  # wait for the device
        return len(imgs)

    decode_resize(data[:batch])
    t0 = time.perf_counter()
    done = sum(decode_resize(data[i: i + batch]) for i in range(0, len(data), batch))
    out["gpu_decode_resize_img_s"] = round(done / (time.perf_counter() - t0), 1)
    return out


class GpuSampler:
    """nvidia-smi utilisation every 0.5 s, in the background."""

    def __init__(self) -> None:
        self.proc = None
        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                          "-lms", "500"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            pass

    def stop(self) -> list[tuple[float, float]]:
        if self.proc is None:
            return []
        self.proc.terminate()
        t_end = time.time()
        lines = [ln for ln in self.proc.communicate()[0].splitlines() if ln.strip()]
        # one line per 0.5 s up to now: stamp them backwards from the end
        return [(t_end - 0.5 * (len(lines) - k), float(ln.split(",")[0])) for k, ln in enumerate(lines)]


def part_pipeline(work: Path, n: int, size: int, batch: int, decode: str, backend: str) -> dict:
    """d and e: run_extract through Ray on the lifelog under ``work``, one decode path."""
    from lifelog_ray.config import load_config
    from lifelog_ray.extract import run_extract

    cfg = load_config(None, {
        "data.root": str(work / "lifelog"), "data.labels": str(work / "lifelog" / "labels.csv"), "data.top_k": 10,
        "data.taxonomy": "none", "output.study": str(work / "study"), "extract.weights": "none", "extract.image_size": size,
        "extract.batch_size": batch, "extract.decode": decode, "extract.backend": backend,
        "extract.overwrite": True, "ray.progress_bars": False})
    sampler = GpuSampler()
    t_start = time.time()
    (s,) = run_extract(cfg)
    samples = sampler.stop()
    steady_from = t_start + s.first_output_s
    util = [u for t, u in samples if t >= steady_from]
    done = s.processed + s.rejected
    from lifelog_ray.extract import read_features

    fc2 = read_features(work / "study", "vgg19", "fc2").to_pandas().sort_values("image_id").head(512)
    np.save(work / f"fc2_{decode}.npy", np.stack(fc2["features"]))  # for the cpu-vs-gpu fidelity check
    return {"decode": decode, "backend": backend, "images": done, "seconds": round(s.seconds, 1),
            "first_output_s": round(s.first_output_s, 1),
            "steady_img_s": round((done - s.first_output_rows) / max(s.seconds - s.first_output_s, 1e-9), 1),
            "gpu_util_mean_steady": round(float(np.mean(util)), 1) if util else None,
            "gpu_util_samples": len(util)}


def write_lifelog(root: Path, n: int) -> None:
    import pandas as pd

    data = jpegs(n)
    rows = []
    for i, b in enumerate(data):
        day = f"2018-05-{1 + i // 4000:02d}"
        rel = f"{day}/{day.replace('-', '')}_{i // 3600 % 24:02d}{i // 60 % 60:02d}{i % 60:02d}_{i:06d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b)
        rows.append((rel, ["walking", "car", "eating food", "screen"][i % 4]))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(root / "labels.csv", index=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32768)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--backends", default="tensorflow,jax")
    ap.add_argument("--pipeline-backend", default="jax", help="the backend of part d")
    ap.add_argument("--work", help="where the lifelog and study go (default: a temp folder)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks the script on any machine")
    ap.add_argument("--part", choices=["model"], help=argparse.SUPPRESS)  # internal: one backend's process
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_pipeline.json"))
    args = ap.parse_args()
    if args.smoke:
        args.images, args.size, args.batch = 64, 32, 8
    if args.part == "model":
        print(json.dumps(part_model(args.backend, args.size, args.batch, 8 * args.batch)))
        return 0
    res: dict = {"node": {"cpus": os.cpu_count()}, "args": vars(args)}
    with __import__("contextlib").suppress(FileNotFoundError, subprocess.CalledProcessError):
        res["node"]["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                            capture_output=True, text=True, check=True).stdout.strip()
    sample = jpegs(64 if args.smoke else 2048)
    res["a_cpu_decode_img_s"] = {w: round(cpu_decode_rate(sample[: 32 * w] if args.smoke else sample, w, args.size), 1)
                                 for w in sorted({1, 8, os.cpu_count() or 1}) if w <= (os.cpu_count() or 1)}
    res["c_model"] = {}
    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
        r = subprocess.run([sys.executable, __file__, "--part", "model", "--backend", backend, "--size", str(args.size),
                            "--batch", str(args.batch)], env=env, capture_output=True, text=True)
        res["c_model"][backend] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                                   else f"failed: {r.stderr[-500:]}")
    work = Path(args.work or tempfile.mkdtemp(prefix="lifelog-gpu-bench-"))
    if not (work / "lifelog" / "labels.csv").exists():
        write_lifelog(work / "lifelog", args.images)
    from lifelog_ray.config import load_config
    from lifelog_ray.ingest import build_manifest

    build_manifest(load_config(None, {"data.root": str(work / "lifelog"), "data.labels": str(work / "lifelog" / "labels.csv"),
                                      "data.top_k": 10, "data.taxonomy": "none", "output.study": str(work / "study")}))
    res["d_pipeline"] = {}
    from lifelog_ray.config import RayConfig
    from lifelog_ray.runtime import cluster_resources, ensure_ray

    ensure_ray(RayConfig(progress_bars=False))
    decodes = ["cpu", "gpu"] if cluster_resources()[1] >= 1 else ["cpu"]
    for decode in decodes:
        try:
            res["d_pipeline"][decode] = part_pipeline(work, args.images, args.size, args.batch, decode,
                                                      args.pipeline_backend)
        except Exception as e:  # noqa: BLE001 - record it and go on with the other path
            res["d_pipeline"][decode] = f"failed: {type(e).__name__}: {e}"
    if all((work / f"fc2_{d}.npy").exists() for d in ("cpu", "gpu")):
        # the same 512 images decoded both ways (PIL with its DCT draft vs nvJPEG + the device squash): the
        # features should be close, not equal; a far-off figure means a decode or stream-ordering bug
        a, b = np.load(work / "fc2_gpu.npy"), np.load(work / "fc2_cpu.npy")
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        res["d_fidelity_fc2"] = {"max_abs_over_max": round(float(np.abs(a - b).max() / np.abs(b).max()), 5),
                                 "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
