"""Stages declare what they need: `run --stages` and jobs/study.py add a needed stage only when its output is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT

from lifelog_ray.errors import LifelogError
from lifelog_ray.pipeline import STAGES, parse_stages, plan


def test_parse_stages():
    assert parse_stages(None) == STAGES and parse_stages("") == STAGES
    assert parse_stages(" extract, classify ") == ("extract", "classify")
    with pytest.raises(LifelogError, match=r"unknown stage\(s\) \['fit'\]"):
        parse_stages("extract,fit")


def test_needed_stages_run_first_only_when_their_output_is_missing(tmp_path):
    assert plan(tmp_path, ("finetune",)) == ("manifest", "finetune")  # fine-tuning needs no features
    assert plan(tmp_path, ("classify",)) == ("manifest", "extract", "classify")
    assert plan(tmp_path, ("report", "manifest")) == ("manifest", "report")  # always in pipeline order
    assert plan(tmp_path, ("predict",)) == ("manifest", "extract", "classify", "predict")  # the best pipeline first
    (tmp_path / "manifest.parquet").write_bytes(b"")
    assert plan(tmp_path, ("classify",)) == ("extract", "classify")
    (tmp_path / "features").mkdir()
    assert plan(tmp_path, ("classify",)) == ("classify",)
    assert plan(tmp_path, STAGES) == STAGES


@pytest.mark.integration
def test_job_smoke_test_runs_a_stage_with_only_what_it_needs():
    # The report needs only the manifest; the whole study through this script is test_job_submit's.
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "study.py"), "--smoke-test", "--stages", "report"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    stages = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert stages == ["manifest", "report"], out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "study.py"), "--smoke-test", "--stages", "fit"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --stages") and "Traceback" not in bad.stderr


def test_the_predict_stage_needs_images(tmp_path):
    from lifelog_ray.config import load_config
    from lifelog_ray.pipeline import run_study

    cfg = load_config(None, {"output.study": str(tmp_path / "s")})
    with pytest.raises(LifelogError, match="--stages predict: no images to label; set predict.images"):
        run_study(cfg, ("predict",))
    # in a whole run without images it is off, like fine-tuning without methods (test_console's demo run)
