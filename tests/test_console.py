"""What a person reads: `lifelog-ray run` on the demo's config prints stage lines, progress and summaries,
and nothing of Ray's, TensorFlow's or absl's; those go to STUDY/logs/<stage>-<time>.log."""

from __future__ import annotations

import re

import pytest

from lifelog_ray.console import Console

STAGES = ("manifest", "extract", "classify", "finetune", "predict", "report")
NOISE = ("Traceback", " INFO ", "(pid=", "oneDNN", "absl", "cuda", "PlacementGroupCleaner", "Running Dataset",
         "WARNING:")


@pytest.mark.slow  # reads the session's whole-study run (conftest.py's demo_run: the demo's config, its own process)
def test_demo_run_prints_under_100_lines_with_every_stage_summary(demo_run):
    out, study = demo_run.output, demo_run.cfg.study_dir
    assert demo_run.returncode == 0, out[-5000:]
    lines = out.splitlines()
    assert len(lines) <= 100, out
    for stage in STAGES:
        assert f"[{stage}] started" in out and re.search(rf"^\[{stage}\] done in [\d.]+s: ", out, re.M), out
        assert re.search(rf"^  {stage} +done ", out, re.M), out  # the closing summary table
    assert re.search(r"^  extract vgg19 \[#+\] \d+/\d+ images", out, re.M)  # the progress bar, a line per tenth
    assert re.search(r"^  finetune vgg19/m1 \[#+\] 2/2 epochs", out, re.M)
    noisy = [x for x in lines if any(n in x for n in NOISE)]
    assert not noisy, noisy
    logs = {p.name.split("-")[0] for p in (study / "logs").iterdir()}
    assert set(STAGES) <= logs
    extract_log = next((study / "logs").glob("extract-*.log")).read_text()
    assert "INFO" in extract_log  # what the console left out is in the stage's log


def test_progress_prints_a_line_per_tenth_when_not_a_terminal(tmp_path):
    import io

    out = io.StringIO()
    with Console(out=out, err=out):
        from lifelog_ray import progress

        for done in range(0, 201):
            progress.report("extract vgg19", done, 200, "images")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 0 %, 10 %, ..., 100 %
    assert lines[-1].startswith("  extract vgg19 [########################] 200/200 images")
