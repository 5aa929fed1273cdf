"""GPU-side figures for extraction, on a machine with a GPU but without TensorFlow or Ray.

    KERAS_BACKEND=jax python benchmarks/gpu_probe.py [--batch 256] [--images 2048]

This is not the production path: it runs the same Keras VGG19 definition, with all four taps in one
multi-output model, on Keras 3's JAX backend. It measures the model's throughput per precision,
one pass against layer by layer, and how fast our decode stage (lifelog_ray.images.decode_image,
PIL with JPEG draft mode) runs on the machine's CPU cores. That shows whether decoding can feed the GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
LAYERS = ["flatten", "fc1", "fc2", "predictions"]


def _jpegs(n: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 255, (768 // 8, 1024 // 8, 3), dtype=np.uint8)).resize((1024, 768))
            for _ in range(8)]
    out = []
    for i in range(n):
        buf = io.BytesIO()
        base[i % 8].save(buf, "JPEG", quality=90)  # LSC images are 1024x768 JPEGs
        out.append(buf.getvalue())
    return out


def _decode_chunk(chunk: list[bytes]) -> int:
    from lifelog_ray.images import decode_image

    for b in chunk:
        decode_image(b, 224, 10**9)
    return len(chunk)


def decode_rate(n: int, workers: int) -> float:
    import multiprocessing as mp

    data = _jpegs(n)
    chunks = [data[i::workers] for i in range(workers)]
    # spawn, not fork: forked children of a multithreaded (JAX) parent can stall.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_decode_chunk, [c[:4] for c in chunks]))  # warm-up imports
        t0 = time.perf_counter()
        done = sum(ex.map(_decode_chunk, chunks))
    return done / (time.perf_counter() - t0)


def model_rate(layers: list[str], policy: str, batch: int, n: int) -> float:
    import keras

    keras.config.set_dtype_policy(policy)
    base = keras.applications.VGG19(weights=None, input_shape=(224, 224, 3))
    model = keras.Model(base.inputs, [base.get_layer(la).output for la in layers])
    x = np.random.default_rng(0).uniform(-120, 150, (batch, 224, 224, 3)).astype("float32")
    for _ in range(2):
        out = model.predict_on_batch(x)  # compile + warm-up
    steps = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model.predict_on_batch(x)
    np.asarray(out[0] if isinstance(out, list) else out)  # wait for the device
    keras.config.set_dtype_policy("float32")
    return steps * batch / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out") + "/gpu_probe.json")
    args = ap.parse_args()
    res = {"cpu_cores": os.cpu_count(), "batch": args.batch}
    # CPU decode first, before JAX starts its threads.
    for w in sorted({1, 8, os.cpu_count() or 1}):
        res[f"decode_img_s_{w}_workers"] = decode_rate(256 * w, w)
    if os.environ.get("DECODE_ONLY"):
        print(json.dumps(res, indent=1))
        return 0
    import jax
    import keras

    res.update({"device": str(jax.devices()[0]), "keras": keras.__version__, "backend": keras.backend.backend()})
    for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
        res[f"one_pass_img_s_{policy}"] = model_rate(LAYERS, policy, args.batch, args.images)
    secs = sum(args.images / model_rate([la], "mixed_bfloat16", args.batch, args.images) for la in LAYERS)
    res["layer_by_layer_img_s_mixed_bfloat16"] = args.images / secs
    res["one_pass_speedup_bf16"] = res["one_pass_img_s_mixed_bfloat16"] / res["layer_by_layer_img_s_mixed_bfloat16"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
