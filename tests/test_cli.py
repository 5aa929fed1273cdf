"""The command line's own contract: --version, doctor, and one-line errors for user mistakes."""

from __future__ import annotations

import socket

import pytest

from lifelog_ray.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lifelog-ray 0.1")


def test_doctor_reports_every_section_and_exits_0_when_healthy(capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for section in ("versions:", "devices:", "imagenet weights:", "ray:", "extras:"):
        assert section in out, out
    for package in ("ray", "tensorflow", "tf-keras", "keras", "xgboost", "scikit-learn", "pyarrow"):
        assert f" {package} " in out, package
    assert "everything the project needs works" in out


def test_doctor_fails_on_an_unreachable_configured_cluster(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["doctor", "--ray-address", f"127.0.0.1:{port}"]) == 1
    out = capsys.readouterr().out
    assert "FAIL cluster" in out and "NOT reachable" in out
