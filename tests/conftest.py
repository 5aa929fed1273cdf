"""Shared fixtures: tiny generated lifelogs and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    """Tiers: a test that needs the shared Ray or the S3 server is `integration` (left out of `make
    test-fast`); tests that start their own Ray cluster (`cluster`) run after all the others, once the
    shared Ray is no longer needed."""
    for item in items:
        if {"ray_local", "s3"} & set(item.fixturenames) or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.get_closest_marker("cluster") is not None)  # stable: order kept otherwise


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, like this machine), started the way the CLI starts
    it, so the workers' environment is the one users get."""
    import ray

    from lifelog_ray.config import RayConfig
    from lifelog_ray.runtime import ensure_ray

    ensure_ray(RayConfig(address="local", num_cpus=2, progress_bars=False, log_to_driver=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_lifelog(tmp_path_factory) -> Path:
    """The bundled sample generator at a small size (shared by the tests that only read it)."""
    from lifelog_ray.sample import write_sample

    root = tmp_path_factory.mktemp("sample") / "lifelog"
    # and a held-out day beside it (new-days/, truth.csv): the study's predict stage labels it
    write_sample(root, seed=1, days=2, images_per_day=45, image_size=(96, 72), held_out=root.parent / "new-days",
                 held_out_days=1)
    return root


@pytest.fixture(scope="session")
def local_study(tmp_path_factory, sample_lifelog, ray_local):
    """The whole study, run once on local disk for every test that reads a finished study
    (test_study.py; the S3 backend has its own run in test_storage.py)."""
    from helpers import study_config

    from lifelog_ray.pipeline import run_study

    cfg = study_config(sample_lifelog, tmp_path_factory.mktemp("study") / "s")
    return cfg, run_study(cfg)


@pytest.fixture(scope="session")
def s3():
    """A real S3 HTTP API on 127.0.0.1 (moto), a bucket `lifelog`, and the options that reach it. One per
    session: moto keeps its buckets in process-wide state, so a second server would see the first's."""
    import logging

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # The test server takes any key; real credentials come from the environment or the instance profile.
    options = {"s3": {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}}
    fs = s3fs.S3FileSystem(**options["s3"])
    if not fs.exists("lifelog"):
        fs.mkdir("lifelog")
    yield fs, options
    server.stop()
