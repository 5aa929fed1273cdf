"""Storage benchmark: the same small study with local paths, then with images and study on S3.

    .venv/bin/python benchmarks/storage.py                 # sample lifelog, 32 px, random weights
    .venv/bin/python benchmarks/storage.py --s3-endpoint http://minio:9000 --bucket mybucket

Without --s3-endpoint the S3 side is moto's server on 127.0.0.1 (the real S3 HTTP API, but no network
latency): the ratio then measures the cost of going through fsspec/HTTP, not of S3 itself. Prints the
seconds per stage for both runs and the S3 / local ratio; writes benchmarks/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def config(root: str, study: str, options: dict):
    from lifelog_ray.config import StudyConfig, load_config

    cfg = load_config(None, {
        "data.root": root, "data.labels": f"{root}/labels.csv", "data.top_k": 5, "output.study": study,
        "extract.weights": "none", "extract.image_size": 32, "extract.layers": "fc2,predictions",
        "extract.batch_size": 16, "classify.search_space": str(ROOT / "jobs/configs/search_space_small.yaml"),
        "classify.classifiers": "svm,naive_bayes,bayesian_ridge", "finetune.methods": "m3",
        "finetune.weights": "none", "finetune.image_size": 32, "finetune.epochs": 1, "finetune.m3_units": 16,
        "ray.progress_bars": False,
    })
    d = cfg.model_dump()
    d["storage"]["options"] = options
    return StudyConfig.model_validate(d)


def timed(cfg) -> dict[str, float]:
    from lifelog_ray.pipeline import run_study

    t0 = time.perf_counter()
    rows = run_study(cfg)
    out = {r.stage: round(r.seconds, 2) for r in rows}
    out["total"] = round(time.perf_counter() - t0, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--s3-endpoint", help="an S3-compatible endpoint; default: a local moto server")
    ap.add_argument("--bucket", default="lifelog-bench")
    ap.add_argument("--images-per-day", type=int, default=45)
    args = ap.parse_args()

    import logging

    import ray
    import s3fs

    from lifelog_ray.sample import write_sample

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = None
    if args.s3_endpoint:
        opts = {"endpoint_url": args.s3_endpoint}  # credentials from the environment
    else:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "bench", "secret": "bench"}
    fs = s3fs.S3FileSystem(**opts)
    if not fs.exists(args.bucket):
        fs.mkdir(args.bucket)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "lifelog"
        write_sample(root, seed=1, days=2, images_per_day=args.images_per_day, image_size=(96, 72))
        prefix = f"{args.bucket}/bench-{int(time.time())}"
        fs.put(f"{root}/", f"{prefix}/raw/", recursive=True)
        local = timed(config(str(root), str(Path(tmp) / "study"), {}))
        remote = timed(config(f"s3://{prefix}/raw", f"s3://{prefix}/study", {"s3": opts}))
        fs.rm(prefix, recursive=True)
    ratio = {k: round(remote[k] / local[k], 2) if local[k] > 0.05 else None for k in local}
    result = {"images": 2 * args.images_per_day, "endpoint": "moto (127.0.0.1)" if server else args.s3_endpoint,
              "cpus": os.cpu_count(), "local_s": local, "s3_s": remote, "s3_over_local": ratio}
    print(json.dumps(result, indent=1))
    out = ROOT / "benchmarks" / "results" / "storage.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    if server:
        server.stop()


if __name__ == "__main__":
    main()
