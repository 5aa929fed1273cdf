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


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A manifest-only study (no features, no pipelines) and a few broken inputs beside it."""
    from lifelog_ray.config import load_config
    from lifelog_ray.ingest import build_manifest
    from lifelog_ray.sample import write_sample

    d = tmp_path_factory.mktemp("cli")
    write_sample(d / "lif", seed=0, days=2, images_per_day=20, image_size=(96, 72))
    build_manifest(load_config(None, {"data.root": str(d / "lif"), "data.labels": str(d / "lif" / "labels.csv"),
                                      "output.study": str(d / "st")}))
    (d / "bad.h5").write_text("not weights")
    (d / "bad.yaml").write_text("data: [\n")
    (d / "tax.yaml").write_text("categories: [a\n")
    return d


BAD = [  # (argv with {d} for the fixture's folder, what the one line must say)
    ("manifest --config {d}/nope.yaml --study {d}/x", "config file not found"),
    ("manifest --config {d}/bad.yaml --study {d}/x", "not valid YAML"),
    ("manifest --root {d}/lif --labels {d}/lif/labels.csv --study {d}/x --top-k -3", "data.top_k"),
    ("manifest --root {d}/lif --labels {d}/lif/labels.csv --study {d}/x --split 0.5,0.5", "data.split"),
    ("manifest --root {d}/lif --labels {d}/lif/labels.csv --study {d}/x --taxonomy {d}/tax.yaml", "not valid YAML"),
    ("manifest --root {d}/lif --labels {d}/lif/labels.csv --study {d}/x --taxonomy {d}/none.yaml", "not found"),
    ("extract --study {d}/st --model vgg99", "extract.models"),
    ("extract --study {d}/st --weights {d}/bad.h5", "does not fit vgg19"),
    ("extract --study {d}/st --weights none --batch-size 0", "extract.batch_size"),
    ("extract --study {d}/st --weights none --image-size 32 --layers fc9", "no layer(s) ['fc9']"),
    ("classify --study {d}/st", "run `lifelog-ray extract` first"),
    ("classify --study {d}/st --pca 1.5", "classify.pca"),
    ("finetune --study {d}/nostudy", "no manifest.parquet"),
    ("finetune --study {d}/st --methods m4", "finetune.methods"),
    ("finetune --study {d}/st --epochs -1", "finetune.epochs"),
    ("finetune --study {d}/st --workers 4 --batch-size 2", "global batch"),
    ("report --study {d}/nostudy", "no manifest.parquet"),
    ("predict --study {d}/st --images {d}/lif", "no trained pipeline"),
    ("predict --study {d}/st --images {d}/lif --pipeline foo", "--pipeline 'foo'"),
    ("audit --study {d}/st", "no classify results"),
    ("curve --study {d}/st --fractions x", "comma list of numbers"),
    ("run --study {d}/st --stages fit", "unknown stage(s) ['fit']"),
    ("sample {d}/s2 --image-size 320", "WIDTHxHEIGHT"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[a.split(" --")[0] + ":" + m[:20] for a, m in BAD])
def test_a_user_mistake_is_one_error_line_and_exit_2(small, capsys, argv, message):
    rc = main(argv.format(d=small).split())
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_verbose_is_accepted_before_or_after_the_subcommand():
    from lifelog_ray.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "report", "--study", "s"]).verbose
    assert parser.parse_args(["report", "--study", "s", "--verbose"]).verbose
    assert not parser.parse_args(["report", "--study", "s"]).verbose


def test_a_bug_of_ours_names_its_log_which_holds_the_traceback(small, capfd, monkeypatch):
    """Not a user mistake: the console gets one line naming the stage log; the traceback is in that log."""
    import lifelog_ray.report

    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(lifelog_ray.report, "build_report", broken)
    rc = main(["report", "--study", str(small / "st")])
    out, err = capfd.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    assert out.splitlines()[0] == "[report] started"
    (line,) = [x for x in err.splitlines() if x.strip()]
    log = line.split("the traceback is in ")[1]
    assert log.startswith(str(small / "st" / "logs" / "report-")) and log.endswith(".log")
    text = open(log, encoding="utf-8").read()
    assert "Traceback" in text and "RuntimeError: an internal bug" in text
