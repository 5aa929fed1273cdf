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

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(config, items):
    """Tiers: a test that needs the shared Ray, the S3 server or the session's whole-study run is `integration`
    (left out of `make test-fast`); tests that start their own Ray cluster (`cluster`) run after all the
    others, once the shared Ray is no longer needed."""
    for item in items:
        if {"ray_local", "s3", "demo_run", "chaos_soak"} & set(item.fixturenames) or item.get_closest_marker("cluster"):
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


@dataclass
class DemoRun:
    """The session's whole study on local disk: its config, what `lifelog-ray run` printed, its exit code."""

    cfg: StudyConfig
    output: str
    returncode: int


# The demo's config, as `make demo` runs it, at test size: 32 px, one fine-tuning method, the small grid.
DEMO_SETS = {"extract.image_size": "32", "finetune.image_size": "32", "finetune.epochs": "2", "finetune.methods": "m1",
             "classify.search_space": str(ROOT / "jobs" / "configs" / "search_space_small.yaml")}


# Two whole-process scenarios start with the session, in the background, at a lower CPU priority (nice 10): each
# is a self-contained process tree (its own local Ray) whose test only reads what it printed and wrote, so it runs
# in the CPU time the other tests leave idle (a fifth of the suite's: Ray starting, processes importing,
# subprocesses waited on) rather than after them. Its fixture waits for it. Only what the session selected starts.
BACKGROUND_NICE = 10


class Background:
    """One background scenario: a process started now, its output in a file (a pipe nobody reads would fill)."""

    def __init__(self, argv: list[str], log: Path, cwd: Path, timeout_s: float, writes: Path) -> None:
        self.log, self.timeout_s, self.writes = log, timeout_s, writes  # writes: what the test reads after it
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
                                         preexec_fn=lambda: os.nice(BACKGROUND_NICE))

    def result(self) -> tuple[int, str]:
        """Wait for it (its own timeout counts from the start of the session); its exit code and what it printed."""
        try:
            code = self.proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            code = self.proc.wait()
        return code, self.log.read_text(errors="replace")

    def stop(self) -> None:
        """A scenario left running (its test deselected or failed first) ends with the session, its Ray included."""
        from lifelog_ray.local_cluster import kill_tree

        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
            self.proc.wait()


_BACKGROUND: dict[str, Background] = {}


@pytest.fixture(scope="session", autouse=True)
def _background_scenarios(request, tmp_path_factory):
    """Start the session's background scenarios that some selected test uses (`demo_run`, `chaos_soak`)."""
    used = {name for item in request.session.items for name in item.fixturenames}
    lifelog_ray = str(Path(sys.executable).parent / "lifelog-ray")
    if "demo_run" in used:
        lifelog = request.getfixturevalue("sample_lifelog")
        study = tmp_path_factory.mktemp("demo") / "study"
        sets = [a for k, v in {**DEMO_SETS, "predict.images": str(lifelog.parent / "new-days")}.items()
                for a in ("--set", f"{k}={v}")]
        _BACKGROUND["demo_run"] = Background(
            [lifelog_ray, "run", "--config", str(ROOT / "jobs" / "configs" / "sample.yaml"), "--root", str(lifelog),
             "--labels", str(lifelog / "labels.csv"), "--study", str(study), "--ray-address", "local", *sets],
            study.parent / "run.log", study.parent, timeout_s=1200, writes=study)
    if "chaos_soak" in used:
        out = tmp_path_factory.mktemp("chaos")
        _BACKGROUND["chaos_soak"] = Background(
            [sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--kills", "3", "--days", "3",
             "--images-per-day", "24", "--second-run-share", "0.5", "--seed", "1", "--out", str(out / "chaos.json")],
            out / "chaos.log", out, timeout_s=1500, writes=out / "chaos.json")
    yield
    for scenario in _BACKGROUND.values():
        scenario.stop()


@pytest.fixture(scope="session")
def demo_run(_background_scenarios) -> DemoRun:
    """The session's one whole-study run on local disk, which many tests read: `lifelog-ray run` with the demo's
    config (jobs/configs/sample.yaml) in its own process, starting its own local Ray, as a user types it (started
    with the session, in the background). test_console reads what it printed; test_study and test_curve read the
    study it wrote. (The S3 study is the cloud recipe's, in test_cluster.py; the README recipe's is
    test_job_submit.py's.)"""
    from lifelog_ray.config import load_config

    scenario = _BACKGROUND["demo_run"]
    code, out = scenario.result()
    assert code == 0, out[-5000:]
    return DemoRun(load_config(scenario.writes / "config.yaml"), out, code)  # the config the run resolved


@pytest.fixture(scope="session")
def chaos_soak(_background_scenarios) -> tuple[int, str, dict | None]:
    """benchmarks/chaos.py's short version (3 kills of extract runs and of their model actors, raced second runs),
    in its own process tree (started with the session, in the background): its exit code, output and stats."""
    import json

    scenario = _BACKGROUND["chaos_soak"]
    code, out = scenario.result()
    return code, out, json.loads(scenario.writes.read_text()) if scenario.writes.exists() else None


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
