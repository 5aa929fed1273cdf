"""Shared fixtures: tiny generated lifelogs and one local Ray per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lifelog_ray.config import StudyConfig

ROOT = Path(__file__).resolve().parents[1]
GROUP = pytest.StashKey[str]()

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks set here
def pytest_collection_modifyitems(config, items):
    """Tiers: a test that needs the shared Ray, the S3 server or the session's whole-study run is `integration`
    (left out of `make test-fast`); tests that start their own Ray cluster (`cluster`) run after all the
    others, once the shared Ray is no longer needed (`make test` runs them in a pytest of their own, after the
    rest).

    Groups for pytest-xdist (`make test` runs the rest on two workers, `--dist loadgroup`): a module's tests stay
    on one worker (its module fixtures are made once), and every reader of the session's whole-study run joins
    one group (`demo_run` is made once). Groups are sent longest first, as far as the markers tell, so neither
    worker is left with a long group at the end."""
    for item in items:
        if {"ray_local", "s3", "demo_run"} & set(item.fixturenames) or item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.integration)
        group = "demo_run" if "demo_run" in item.fixturenames else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))
        item.stash[GROUP] = group
    weight: dict[str, float] = {}
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.stash[GROUP], i)
        # a rough cost: a slow test ~30 s, an integration one ~5 s, a unit test ~0.5 s
        cost = 30 if item.get_closest_marker("slow") else 5 if item.get_closest_marker("integration") else 0.5
        weight[item.stash[GROUP]] = weight.get(item.stash[GROUP], 0) + cost
    # the cluster tail last, then the heaviest groups first; a group's tests together (a module fixture is made
    # once in a run without xdist too) and in their written order (the sort is stable)
    items.sort(key=lambda item: (item.get_closest_marker("cluster") is not None, -weight[item.stash[GROUP]],
                                 first[item.stash[GROUP]]))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """A run whose groups would not hold is refused: on pytest 9.2 xdist's loadgroup stops grouping without a word
    (pytest-xdist#1386), and each worker would then make the session's whole-study run and split the modules."""
    if node.config.getoption("dist") == "loadgroup" and ids and not any("@" in i for i in ids):
        pytest.exit(f"pytest-xdist's --dist loadgroup does not group tests on pytest {pytest.__version__} "
                    "(pytest-xdist#1386); install the pytest that pyproject.toml pins (make venv)", returncode=4)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the test session (2 CPUs, like this machine; under xdist, one per worker that needs it),
    started the way the CLI starts it, so the workers' environment is the one users get."""
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


@dataclass
class DemoRun:
    """The session's whole study on local disk: its config, what `lifelog-ray run` printed, its exit code."""

    cfg: StudyConfig
    output: str
    returncode: int


# The demo's config, as `make demo` runs it, at test size: 32 px, one fine-tuning method, the small grid.
DEMO_SETS = {"extract.image_size": "32", "finetune.image_size": "32", "finetune.epochs": "2", "finetune.methods": "m1",
             "classify.search_space": str(ROOT / "jobs" / "configs" / "search_space_small.yaml")}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, sample_lifelog) -> DemoRun:
    """The session's one whole-study run on local disk, which many tests read: `lifelog-ray run` with the demo's
    config (jobs/configs/sample.yaml) in its own process, starting its own local Ray, as a user types it.
    test_console reads what it printed; test_study and test_curve read the study it wrote.
    (The S3 study is the cloud recipe's, in test_cluster.py; the README recipe's is test_job_submit.py's.)"""
    from lifelog_ray.config import load_config

    study = tmp_path_factory.mktemp("demo") / "study"
    sets = [a for k, v in {**DEMO_SETS, "predict.images": str(sample_lifelog.parent / "new-days")}.items()
            for a in ("--set", f"{k}={v}")]
    run = subprocess.run([str(Path(sys.executable).parent / "lifelog-ray"), "run", "--config",
                          str(ROOT / "jobs" / "configs" / "sample.yaml"), "--root", str(sample_lifelog),
                          "--labels", str(sample_lifelog / "labels.csv"), "--study", str(study),
                          "--ray-address", "local", *sets],
                         capture_output=True, text=True, timeout=1200, cwd=study.parent)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    return DemoRun(load_config(study / "config.yaml"), out, run.returncode)  # the config the run resolved


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
