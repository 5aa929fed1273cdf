"""The README's local cluster recipe (`ray start --head`, `ray job submit jobs/study.py`, `ray stop`), run as written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


def test_readme_recipe_is_the_one_tested():
    cmds = readme_cluster_recipe()
    assert [c.split()[0] for c in cmds] == [".venv/bin/ray", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token",
                                            ".venv/bin/ray"]
    assert cmds[0].startswith(".venv/bin/ray get-auth-token --generate > /dev/null")  # never prints the token
    assert "--base-dir \"$PWD\"" in cmds[2] and "\"$PWD/.venv/bin/python\"" in cmds[2]


@pytest.mark.slow
@pytest.mark.cluster  # sorted last (conftest): it stops the session's Ray to free the README's default ports
def test_readme_cluster_recipe_runs_as_written(tmp_path):
    """`ray start --head` / `ray job submit jobs/study.py`, typed as the README writes them in a fresh shell
    after `make demo` on a fresh machine (an empty home folder: no Ray token yet): the README's ports, token
    auth really on, the venv never activated. The job runs the whole sample study in an uploaded copy of the
    code and writes it where the user looks; a machine without the token gets one line saying what to set.
    The README's last line, `ray stop`, ends every Ray on a machine: the test stops only the head it started
    (its own RAY_TMPDIR)."""
    import urllib.error
    import urllib.request

    import ray

    from lifelog_ray.local_cluster import node_ip, stop_ray_under

    ray.shutdown()  # the session's Ray holds Ray's default agent ports (52365, ...) the README's head needs
    work = tmp_path / "checkout"
    shutil.copytree(ROOT, work, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "demo", "__pycache__", ".pytest_cache", ".ruff_cache", "out"))
    (work / ".venv").symlink_to(ROOT / ".venv")  # `make demo` made it; the README's commands name it
    ray_tmp = Path(tempfile.mkdtemp(prefix="llr-readme-", dir="/tmp"))  # short: Ray's socket paths live in it
    home = tmp_path / "home"  # a fresh machine's: no ~/.ray/auth_token
    home.mkdir()
    env = fresh_shell_env() | {"RAY_TMPDIR": str(ray_tmp), "HOME": str(home)}

    def sh(cmd: str, timeout: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    demo = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1]
    sample = next(line.strip() for line in demo.splitlines() if "lifelog-ray sample" in line)
    # what `make demo` does first, at a seventh of the sample's size (3 days of 16 small frames, one new day; 8 of
    # the top 10 categories): the recipe and its config are the README's (224 px, every method), only the lifelog
    # is smaller (the full one takes ~12 min here, 3 days of 24 frames ~4.7 min: the time goes into the config's
    # work, not the recipe's)
    small = " --days 3 --images-per-day 16 --image-size 96x72 --held-out-days 1"
    made = sh(sample.replace("$(BIN)", ".venv/bin").replace("$(DEMO_DIR)", "demo") + small, 300)
    assert made.returncode == 0, made.stderr[-2000:]
    token, start, submit, stop = readme_cluster_recipe()
    assert stop == ".venv/bin/ray stop"
    try:
        made_token = sh(token, 120)
        assert made_token.returncode == 0 and made_token.stdout == "", made_token.stderr[-2000:]
        secret = (home / ".ray" / "auth_token").read_text().strip()
        assert secret and secret not in made_token.stderr
        up = sh(start, 300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # token auth is really on: the job API refuses a request without the token
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/", timeout=30)
        assert refused.value.code in (401, 403), refused.value
        job = sh(submit, 1500)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-6000:]
        # another machine (another home, no token) joining this cluster: one line that says what to set
        stranger = tmp_path / "stranger"
        stranger.mkdir()
        joined = subprocess.run(["bash", "-c", ".venv/bin/lifelog-ray predict --config jobs/configs/sample.yaml "
                                 "--ray-address 127.0.0.1:6379 --name tokenless"], cwd=work, timeout=300,
                                env=env | {"HOME": str(stranger), "RAY_AUTH_MODE": "token"}, capture_output=True,
                                text=True)
        err = joined.stderr.strip().splitlines()
        assert joined.returncode == 2 and len(err) == 1 and "RAY_AUTH_MODE=token" in err[0], joined.stderr[-3000:]
        assert "auth_token" in err[0] and secret not in joined.stdout + joined.stderr
    finally:
        stop_ray_under(ray_tmp, f"{node_ip()}:6379")  # the client server names only the GCS address
        shutil.rmtree(ray_tmp, ignore_errors=True)
    for stage in ("manifest", "extract", "classify", "finetune", "predict", "report"):  # the job log reads like the CLI
        assert f"[{stage}] done" in out, out[-4000:]
    assert "Traceback" not in out and "(pid=" not in out
    study = work / "demo" / "study"  # the config's relative path, from the user's folder, not the job's copy
    assert (study / "report" / "index.html").exists()
    table4 = pd.read_csv(study / "finetune" / "table4.csv")  # every method of the config trained and was scored
    assert len(table4) == 3 and table4["accuracy"].between(0, 100).all(), table4
