"""The README's local cluster recipe (`ray start --head`, `ray job submit jobs/study.py`, `ray stop`) as a user types
it: the steps, run by `conftest.py` in the background from the session's start (test_job_submit.py checks them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NICE = 10  # a background scenario: the CPU the other tests leave idle (conftest.py)


def readme_cluster_recipe() -> list[str]:
    """The README's local-cluster commands, continuation lines joined, exactly as a user copies them."""
    text = (ROOT / "README.md").read_text("utf-8")
    block = text.split("Locally, as a cluster with the Jobs API:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def fresh_shell_env() -> dict[str, str]:
    """A shell that never activated the venv: no venv on PATH, no RAY_ADDRESS, nothing set up by us."""
    venv_bin = str(BIN)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)
    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VIRTUAL_ENV", "PYTEST"))} | {"PATH": path}


def run_recipe(tmp: Path, head_up: threading.Event) -> dict:
    """Every step of the recipe, typed in a fresh shell after `make demo` on a fresh machine (an empty home
    folder: no Ray token yet), in a copy of the checkout; returns what each step gave. ``head_up`` is set once
    the README's head holds its ports (Ray's defaults: no other Ray of the session may start before it). The
    README's last line, `ray stop`, ends every Ray on a machine: this stops only the head it started (its own
    RAY_TMPDIR)."""
    from lifelog_ray.local_cluster import node_ip, stop_ray_under

    got: dict = {}
    work = tmp / "checkout"
    ray_tmp = Path(tempfile.mkdtemp(prefix="llr-readme-", dir="/tmp"))  # short: Ray's socket paths live in it
    try:
        shutil.copytree(ROOT, work, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "demo", "__pycache__", ".pytest_cache", ".ruff_cache", "out"))
        (work / ".venv").symlink_to(ROOT / ".venv")  # `make demo` made it; the README's commands name it
        home = tmp / "home"  # a fresh machine's: no ~/.ray/auth_token
        home.mkdir()
        env = fresh_shell_env() | {"RAY_TMPDIR": str(ray_tmp), "HOME": str(home)}
        got.update(work=work, home=home)

        def sh(cmd: str, timeout: int, **more) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", "-c", cmd], cwd=work, env=env | more, capture_output=True, text=True,
                                  timeout=timeout, preexec_fn=lambda: os.nice(NICE))

        demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1]
        sample = next(line.strip() for line in demo.splitlines() if "lifelog-ray sample" in line)
        # what `make demo` does first, at a seventh of the sample's size (3 days of 16 small frames, one new day; 8
        # of the top 10 categories): the recipe and its config are the README's (224 px, every method), only the
        # lifelog is smaller (the full one takes ~12 min here, 3 days of 24 frames ~4.7 min: the time goes into
        # the config's work, not the recipe's)
        small = " --days 3 --images-per-day 16 --image-size 96x72 --held-out-days 1"
        got["sample"] = sh(sample.replace("$(BIN)", ".venv/bin").replace("$(DEMO_DIR)", "demo") + small, 300)
        if got["sample"].returncode:
            return got
        token, start, submit, stop = got["commands"] = readme_cluster_recipe()
        got["token"] = sh(token, 120)
        if got["token"].returncode:
            return got
        got["secret"] = (home / ".ray" / "auth_token").read_text().strip()
        got["start"] = sh(start, 300)
        head_up.set()
        if got["start"].returncode:
            return got
        try:  # token auth is really on: the job API refuses a request without the token
            urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/", timeout=30)
            got["unauthenticated"] = 200
        except urllib.error.HTTPError as e:
            got["unauthenticated"] = e.code
        got["submit"] = sh(submit, 3000)  # in the background: it may wait for idle CPU for most of the session
        # another machine (another home, no token) joining this cluster: one line that says what to set
        stranger = tmp / "stranger"
        stranger.mkdir()
        got["stranger"] = sh(".venv/bin/lifelog-ray predict --config jobs/configs/sample.yaml "
                             "--ray-address 127.0.0.1:6379 --name tokenless", 300, HOME=str(stranger),
                             RAY_AUTH_MODE="token")
        return got
    finally:
        head_up.set()
        stop_ray_under(ray_tmp, f"{node_ip()}:6379")  # the client server names only the GCS address
        shutil.rmtree(ray_tmp, ignore_errors=True)
