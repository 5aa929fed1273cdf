"""`ray start --head` + `ray job submit jobs/study.py`: the cluster path users take, end to end on one machine."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifelog_ray.config import config_to_yaml
from lifelog_ray.extract import accounting

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.cluster
def test_submit_study_job_to_a_local_head(tmp_path, local_study):
    """The job extracts a second backbone (vgg16) into the session's finished local study on the head's
    workers: the whole study runs once per storage backend, and the head still does real Ray work."""
    gcs, dash = free_port(), free_port()
    # Ray 2.60 starts local clusters with token auth; clients send ~/.ray/auth_token only in token mode.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
         f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
         # Fixed default agent ports (52365, ...) are taken by the test session's own Ray: pick free ones.
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while True:  # wait for the job API to answer
            ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                capture_output=True, timeout=60).returncode == 0
            if ok:
                break
            assert time.time() < deadline, "Ray head did not come up"
            time.sleep(3)
        cfg = local_study[0].model_copy(deep=True)
        cfg.extract.models = ["vgg16"]
        study = cfg.study_dir
        cfg_file = tmp_path / "job.yaml"
        cfg_file.write_text(config_to_yaml(cfg))
        ray_cmd = [str(BIN / "ray"), "job"]
        submit = ray_cmd + ["submit", "--address", address, "--submission-id", "lifelog-test", "--no-wait",
                            "--working-dir", str(ROOT), "--", "python", "jobs/study.py", "--config", str(cfg_file),
                            "--stages", "extract"]
        for _ in range(40):  # the job agent can come up a little after the dashboard answers
            sub = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300)
            if sub.returncode == 0 or "No available agent" not in sub.stdout + sub.stderr:
                break
            time.sleep(3)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        deadline = time.time() + 900
        while time.time() < deadline:
            st = subprocess.run(ray_cmd + ["status", "--address", address, "lifelog-test"], env=env,
                                capture_output=True, text=True, timeout=60)
            status = (st.stdout + st.stderr).lower()
            if any(w in status for w in ("succeeded", "failed", "stopped")):
                break
            time.sleep(5)
        logs = subprocess.run(ray_cmd + ["logs", "--address", address, "lifelog-test"], env=env,
                              capture_output=True, text=True, timeout=120).stdout
        assert "succeeded" in status, status[-2000:] + logs[-4000:]
        assert "extract" in logs and "vgg16" in logs
        assert sorted(p.name for p in (study / "features" / "vgg16").iterdir()
                      if p.is_dir() and not p.name.startswith("_")) == ["fc2", "predictions"]
        for model in ("vgg16", "vgg19"):  # every image once, in features or in rejects, for both backbones
            for layer, a in accounting(study, model, ["fc2", "predictions"]).items():
                assert a["manifest"] == a["features"] + a["rejects"] == a["unique"] + a["rejects"], (model, layer, a)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` takes its cluster down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        current = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would clear; ours only
        if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()
