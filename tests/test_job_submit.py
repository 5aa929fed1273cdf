"""The README's local cluster recipe (`ray start --head`, `ray job submit jobs/study.py`, `ray stop`), run as written
(its steps are `readme_recipe.run_recipe`, started with the session in the background by conftest.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from readme_recipe import readme_cluster_recipe


def test_readme_recipe_is_the_one_tested():
    cmds = readme_cluster_recipe()
    assert [c.split()[0] for c in cmds] == [".venv/bin/ray", "RAY_AUTH_MODE=token", "RAY_AUTH_MODE=token",
                                            ".venv/bin/ray"]
    assert cmds[0].startswith(".venv/bin/ray get-auth-token --generate > /dev/null")  # never prints the token
    assert "--base-dir \"$PWD\"" in cmds[2] and "\"$PWD/.venv/bin/python\"" in cmds[2]


@pytest.mark.slow
@pytest.mark.cluster  # its own Ray on the README's default ports: started before any other Ray of the session
def test_readme_cluster_recipe_runs_as_written(readme_recipe):
    """`ray start --head` / `ray job submit jobs/study.py`, typed as the README writes them in a fresh shell
    after `make demo` on a fresh machine (an empty home folder: no Ray token yet): the README's ports, token
    auth really on, the venv never activated. The job runs the whole sample study in an uploaded copy of the
    code and writes it where the user looks; a machine without the token gets one line saying what to set.
    The README's last line, `ray stop`, ends every Ray on a machine: the recipe stops only the head it started
    (its own RAY_TMPDIR)."""
    got = readme_recipe
    assert got["sample"].returncode == 0, got["sample"].stderr[-2000:]
    assert got["commands"][3] == ".venv/bin/ray stop"
    made_token = got["token"]
    assert made_token.returncode == 0 and made_token.stdout == "", made_token.stderr[-2000:]
    secret = got["secret"]
    assert secret and secret not in made_token.stderr
    up = got["start"]
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert got["unauthenticated"] in (401, 403), got["unauthenticated"]  # token auth is really on
    job = got["submit"]
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    joined = got["stranger"]  # another machine, no token: one line that says what to set
    err = joined.stderr.strip().splitlines()
    assert joined.returncode == 2 and len(err) == 1 and "RAY_AUTH_MODE=token" in err[0], joined.stderr[-3000:]
    assert "auth_token" in err[0] and secret not in joined.stdout + joined.stderr
    for stage in ("manifest", "extract", "classify", "finetune", "predict", "report"):  # the job log reads like the CLI
        assert f"[{stage}] done" in out, out[-4000:]
    assert "Traceback" not in out and "(pid=" not in out
    study = got["work"] / "demo" / "study"  # the config's relative path, from the user's folder, not the job's copy
    assert (study / "report" / "index.html").exists()
    table4 = pd.read_csv(study / "finetune" / "table4.csv")  # every method of the config trained and was scored
    assert len(table4) == 3 and table4["accuracy"].between(0, 100).all(), table4
