"""What the Keras 3 copy of a fine-tuned model costs, where it is made.

    .venv/bin/python benchmarks/keras3_export.py                 # M1, M2, M3 of VGG19 at 64 px (the demo's size)
    .venv/bin/python benchmarks/keras3_export.py --size 32 --methods m3

For each method, a tf-keras model as a Ray Train worker has it after training (random weights: the cost does not
depend on their values), saved as the worker saves it (`model.keras`). Then, in this one process and run:
- **in the driver, as before**: tf-keras' `load_model` of that file, then `export_keras3` (rebuild in Keras 3,
  copy the weights by name, save);
- **in the worker, as now**: `export_keras3` from the model in memory, the step the worker adds before writing
  its results (the driver then copies the file).
Writes benchmarks/results/keras3_export.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--methods", default="m1,m2,m3")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "keras3_export.json"))
    args = p.parse_args()

    from lifelog_ray.backbones import BackboneSpec, legacy_keras_module
    from lifelog_ray.config import FinetuneConfig
    from lifelog_ray.finetune import KERAS3_FILE, build_method_model, export_keras3

    tf_keras = legacy_keras_module()
    f = FinetuneConfig(image_size=args.size)
    spec = BackboneSpec("vgg19", ("fc2",), "none", args.size, 0, "float32")
    rows = []
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            model = build_method_model(tf_keras, spec, method, 10, None, f.m2_trainable_layers, f.m3_units)
            model.save(str(d / "model.keras"))
            export_keras3(model, spec, method, 10, f, d / "warm.keras")  # Keras 3's first build and save: not timed
            t0 = time.perf_counter()
            loaded = tf_keras.models.load_model(str(d / "model.keras"), compile=False)
            t1 = time.perf_counter()
            export_keras3(loaded, spec, method, 10, f, d / "driver.keras")
            t2 = time.perf_counter()
            export_keras3(model, spec, method, 10, f, d / KERAS3_FILE)
            t3 = time.perf_counter()
            row = {"method": method, "image_size": args.size, "model_mb": round((d / "model.keras").stat().st_size / 1e6, 1),
                   "driver_load_s": round(t1 - t0, 2), "driver_export_s": round(t2 - t1, 2),
                   "driver_total_s": round(t2 - t0, 2), "worker_export_s": round(t3 - t2, 2),
                   "saved_s": round((t2 - t0) - (t3 - t2), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model, loaded
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
