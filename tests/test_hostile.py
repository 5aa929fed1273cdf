"""Hostile and careless input: names from flags, folders and data never decide where files go (issue 30, begun)."""

from __future__ import annotations

import pytest

from lifelog_ray import cli, storage
from lifelog_ray.errors import LifelogError


@pytest.mark.parametrize("name", ["../victim", "/tmp/elsewhere", "..", "a/b", ".hidden", "", "x" * 200])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(name):
    with pytest.raises(LifelogError, match="not a plain name"):
        storage.plain_name(name, "predict --name")


def test_plain_names_pass_as_they_are():
    for name in ("new-days", "2016-08-16", "week_39", "set.v2"):
        assert storage.plain_name(name, "predict --name") == name


@pytest.mark.parametrize("how", ["--name ../victim", "--name {victim}", "images ."])
def test_predict_never_deletes_a_folder_outside_the_study(tmp_path, capsys, monkeypatch, how):
    """`predict` replaces its output folder: with a name that leaves STUDY/predictions/ it deleted that folder's
    files (or, run from an oddly named folder, the whole study). Now: one line, exit 2, nothing touched."""
    study, images, victim = tmp_path / "study", tmp_path / "new", tmp_path / "victim"
    for d in (study / "predictions", images, victim):
        d.mkdir(parents=True)
    (victim / "keep.txt").write_text("mine")
    (study / "config.yaml").write_text("output: {}\n")
    monkeypatch.chdir(images)
    flag, value = how.split(" ", 1)
    argv = ["predict", "--study", str(study), "--images", "." if flag == "images" else str(images)]
    if flag == "--name":
        argv += ["--name", value.format(victim=victim)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a plain name" in err[0], err
    assert (victim / "keep.txt").read_text() == "mine" and (study / "config.yaml").exists()
