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


# --- a received study is data, never code --------------------------------------------------------------------

def test_a_search_space_may_name_estimator_classes_only(tmp_path):
    """A search space's `estimator` was any dotted path that got called: `subprocess.Popen` ran a shell command
    in a Tune trial. Now only estimator classes (BaseEstimator) of scikit-learn, XGBoost and this package."""
    import yaml

    from lifelog_ray.classify.estimators import load_search_space

    marker = tmp_path / "ran"
    for estimator, why in (("subprocess.Popen", "refused"), ("os.system", "refused"), ("builtins.eval", "refused"),
                           ("sklearn.base.clone", "not a scikit-learn estimator class"),
                           ("sklearn.utils.Bunch", "not a scikit-learn estimator class"),
                           ("sklearn.svm._classes.__builtins__", "refused")):
        space = tmp_path / "space.yaml"
        space.write_text(yaml.safe_dump({"svm": {"estimator": estimator, "grid": {"args": [["touch", str(marker)]]}}}))
        with pytest.raises(LifelogError, match=why):
            load_search_space(space, ["svm"])
    assert not marker.exists()
    assert [s.estimator for s in load_search_space(None, ["svm", "xgboost", "bayesian_ridge"])] == [
        "sklearn.svm.SVC", "xgboost.XGBClassifier", "lifelog_ray.classify.estimators.BayesianRidgeClassifier"]


def test_the_curve_never_takes_a_search_space_from_the_studys_recorded_config(tmp_path):
    """`curve --study S` took the classify settings S recorded, its search-space path among them: a received
    study could point it at a file that names code. The recorded settings still apply, that path does not."""
    import yaml

    from lifelog_ray.config import load_config
    from lifelog_ray.curve import study_settings

    recorded = tmp_path / "classify"
    recorded.mkdir()
    (recorded / "config.yaml").write_text(yaml.safe_dump({"classify": {
        "search_space": str(tmp_path / "evil.yaml"), "pca": 0.9, "classifiers": ["svm"]}}))
    cfg = study_settings(load_config(None, {"output.study": str(tmp_path)}), "classify", recorded)
    assert cfg.classify.search_space is None and cfg.classify.pca == 0.9 and cfg.classify.classifiers == ["svm"]


def _small_finetuned(tmp_path):
    """A fine-tuned model as `finetune` writes it (M3 at 32 px), and the metrics.json fields predict reads."""
    import hashlib

    from lifelog_ray.backbones import BackboneSpec, legacy_keras_module
    from lifelog_ray.finetune import build_method_model

    keras = legacy_keras_module()
    keras.utils.set_random_seed(1)
    model = build_method_model(keras, BackboneSpec("vgg19", ("fc2",), "none", 32, 0, "float32"), "m3", 3, None, 4, 8)
    path = tmp_path / "model.keras"
    model.save(str(path))
    meta = {"architecture": {"method": "m3", "m2_trainable_layers": 4, "m3_units": 8}, "image_size": 32,
            "classes": ["a", "b", "c"], "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return keras, model, path, meta


def test_a_fine_tuned_model_is_rebuilt_in_code_and_only_its_weights_are_read(tmp_path):
    """predict loaded a received study's `model.keras` with tf-keras' `load_model`: a legacy HDF5 file under that
    name takes the legacy path, where a Lambda layer's code runs. Now the architecture is rebuilt from the run's
    recorded method and sizes, the file's hash must match the one recorded, and only its weights are read."""
    import hashlib
    import zipfile

    import numpy as np

    from lifelog_ray.finetune import load_finetuned

    keras, model, path, meta = _small_finetuned(tmp_path)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    loaded = load_finetuned(keras, path, "vgg19", meta)
    assert np.allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)

    marker = tmp_path / "code-ran"
    # the same weights, with a config.json that names a Lambda: never read, nothing runs, the same model
    hostile = tmp_path / "hostile.keras"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == "config.json":
                data = (b'{"class_name": "Lambda", "config": {"function": {"class_name": "__lambda__", '
                        b'"config": {"code": "' + str(marker).encode() + b'"}}}}')
            dst.writestr(item, data)
    again = load_finetuned(keras, hostile, "vgg19", {**meta, "model_sha256": hashlib.sha256(hostile.read_bytes()).hexdigest()})
    assert np.allclose(again.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6) and not marker.exists()

    # a legacy HDF5 model whose Lambda writes a file when it is rebuilt: refused, even with a matching hash
    inp = keras.Input((4,))
    out = keras.layers.Lambda(lambda t, m=str(marker): t + 0 * open(m, "w").write("ran"))(inp)
    h5 = tmp_path / "legacy.keras"
    keras.Model(inp, out).save(str(h5), save_format="h5")
    marker.unlink(missing_ok=True)  # building the Lambda above ran it here, in the test's own process
    with pytest.raises(LifelogError, match="not a Keras zip archive"):
        load_finetuned(keras, h5, "vgg19", {**meta, "model_sha256": hashlib.sha256(h5.read_bytes()).hexdigest()})
    assert not marker.exists()
    # a file changed after training: refused by its hash; a model recorded without one: refused, with what to do
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(LifelogError, match="SHA-256 differs"):
        load_finetuned(keras, path, "vgg19", meta)
    with pytest.raises(LifelogError, match="rerun `lifelog-ray finetune`"):
        load_finetuned(keras, path, "vgg19", {k: v for k, v in meta.items() if k != "model_sha256"})


# --- secrets stay out -----------------------------------------------------------------------------------------

def test_credentials_given_as_storage_options_are_written_nowhere(tmp_path):
    """Credentials given as `storage.options` were written into the study's config.yaml and shown in the report's
    resolved config. Every config the project writes now redacts them (the rest of the options stay)."""
    from lifelog_ray.config import REDACTED, load_config, write_resolved

    cfg = load_config(None, {"output.study": str(tmp_path / "study"),
                             "storage.options": {"s3": {"endpoint_url": "http://minio.internal:9000",
                                                        "key": "AKIAEXAMPLE", "secret": "s3cr3t-value",
                                                        "client_kwargs": {"aws_session_token": "tok-value"}},
                                                 "gs": {"token": "gcs-token-value"},
                                                 "abfs": {"account_key": "azure-key", "account_name": "acct"}}})
    assert cfg.storage.options["s3"]["secret"] == "s3cr3t-value"  # the run itself still has them
    text = write_resolved(cfg, tmp_path / "study").read_text()
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-value", "gcs-token-value", "azure-key"):
        assert secret not in text
    assert "http://minio.internal:9000" in text and "acct" in text and text.count(REDACTED) == 5


# --- names from data, and user mistakes: a one-line error or a reject, nothing half-written -------------------

def test_a_day_column_is_a_plain_name_and_a_missing_day_comes_from_the_timestamp(tmp_path):
    """A `day` column in a CSV given to predict became a folder name as given (`../../..` wrote outside the
    study); a CSV with `timestamp` and no `day` crashed. Now: refused in one line before any work; derived."""
    import pandas as pd

    from lifelog_ray.predict import list_images

    csv = tmp_path / "frames.csv"
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "timestamp": ["2016-08-15 08:00:00", "2016-08-16 09:30:00"]}).to_csv(
        csv, index=False)
    assert list(list_images(str(csv), (".jpg",))["day"]) == ["2016-08-15", "2016-08-16"]
    for day in ("../../..", "x/y", ".."):
        pd.DataFrame({"path": ["a.jpg"], "timestamp": ["2016-08-15 08:00:00"], "day": [day]}).to_csv(csv, index=False)
        with pytest.raises(LifelogError, match="day column's value .* is not a plain name"):
            list_images(str(csv), (".jpg",))


@pytest.mark.parametrize("args", [["--image-size", "0x0"], ["--days", "-1"], ["--images-per-day", "0"],
                                  ["--held-out-days", "-2", "--held-out", "{tmp}/new"]])
def test_sample_checks_its_arguments_before_writing_anything(tmp_path, capsys, args):
    out = tmp_path / "lifelog"
    assert cli.main(["sample", str(out), *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and args[0] in err[0], err
    assert not out.exists() and not (tmp_path / "new").exists()


def test_labels_render_whatever_characters_they_hold(tmp_path):
    """A label holding TeX (`$...$`) made `report` fail in matplotlib; a label or day from a received study's
    data went into HTML attributes unescaped. Every plot draws labels as text; every page escapes them."""
    import pandas as pd

    from lifelog_ray.lifelog_report import calendar_png, events_table, weekly_png

    acts = ["$\\frac{broken", "a_b^c $x$", "<b>bold</b>", "it's \"quoted\""]
    by = pd.DataFrame({"period": ["2016-08-15", "2016-08-16"] * 2, "activity": acts, "minutes": [10.0, 20, 30, 40]})
    assert calendar_png(by, acts).startswith("data:image/png;base64,")
    assert weekly_png(by.assign(period=["2016-W33"] * 4), acts).startswith("data:image/png;base64,")
    ev = pd.DataFrame({"event_id": [1], "day": ["2016-08-15' onmouseover='alert(1)"], "activity": ["x' onclick='y"],
                       "start": [pd.Timestamp("2016-08-15 08:00")], "end": [pd.Timestamp("2016-08-15 09:00")],
                       "duration_s": [3600.0], "n_frames": [100], "mean_confidence": [0.9], "short": [False],
                       "keyframe_id": ["k"], "keyframe_path": [str(tmp_path / "none.jpg")]})
    html = events_table(ev, "ev-x", ["x' onclick='y"], None)
    assert "onmouseover='alert" not in html and "onclick='y" not in html and "&#x27;" in html


def test_a_thumbnail_of_a_huge_image_keeps_memory_bounded(tmp_path):
    """A report thumbnail of a 12000x12000 PNG peaked at 1 GB. A JPEG is decoded at reduced scale; anything
    still above 40 MP after that is left out (its row stays in the page)."""
    import struct
    import subprocess
    import sys
    import zlib

    from PIL import Image

    png = tmp_path / "huge.png"  # written row by row: the test itself never holds the image
    with png.open("wb") as f:
        def chunk(kind: bytes, data: bytes) -> None:
            f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data)))
        f.write(b"\x89PNG\r\n\x1a\n")
        chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0))
        z, row, data = zlib.compressobj(6), b"\x00" + b"\x80" * 36000, b""
        data = b"".join(z.compress(row) for _ in range(12000)) + z.flush()
        chunk(b"IDAT", data)
        chunk(b"IEND", b"")
    jpg = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (200, 100, 50)).save(jpg, quality=70)
    code = ("import resource, sys; from lifelog_ray.html import thumb; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "got = [thumb(p) for p in sys.argv[1:]]; "
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, [g is not None for g in got])")
    out = subprocess.run([sys.executable, "-c", code, str(png), str(jpg)], capture_output=True, text=True, timeout=120)
    grew_mb, made = out.stdout.split(" ", 1)
    assert made.strip() == "[False, True]", out.stdout + out.stderr
    assert int(grew_mb) < 150, out.stdout  # was ~1 GB for the PNG alone


def test_a_file_name_that_is_not_utf8_becomes_a_reject(tmp_path):
    """A file whose name is not valid UTF-8 under the image root crashed `manifest` (its name could not be
    written to Parquet). Now it is a reject with its reason, the name shown with the bytes escaped."""
    import os
    from pathlib import Path

    from helpers import make_study

    from lifelog_ray.config import load_config
    from lifelog_ray.ingest import build_manifest
    from lifelog_ray.rejects import read_rejects

    root, rows = make_study(tmp_path)
    odd = os.fsdecode(os.fsencode(str(root / "2016-08-15")) + b"/20160815_090000_caf\xe9.jpg")
    Path(odd).write_bytes((root / rows[0][0]).read_bytes())  # a real image, under a name that is not UTF-8
    cfg = load_config(None, {"data.root": str(root), "data.labels": str(tmp_path / "labels.csv"),
                             "output.study": str(tmp_path / "study"), "data.top_k": 3})
    result = build_manifest(cfg)
    assert len(result.manifest) == len(rows)
    rejects = read_rejects(tmp_path / "study")
    odd_row = rejects[rejects["reason"] == "name_not_utf8"]
    assert len(odd_row) == 1 and odd_row["path"].iloc[0].endswith("caf\\xe9.jpg"), rejects.to_dict("records")


def test_without_a_dashboard_the_state_api_is_not_asked(ray_local, monkeypatch):
    """With a local Ray that has no dashboard, Ray's state API went to http://127.0.0.1:8265 with this cluster's
    auth token in the request: whoever listened there got it. Now nothing is asked where there is no dashboard."""
    import ray.util.state as state

    from lifelog_ray import placement

    asked = []
    monkeypatch.setattr(state, "list_actors", lambda *a, **k: asked.append(a) or [])
    monkeypatch.setattr(state, "list_cluster_events", lambda *a, **k: asked.append(a) or [])
    assert placement.ActorWatch("FeatureExtractor").where() is None
    placement.AutoscalerLog().poll()
    assert asked == []


@pytest.mark.parametrize("mistake", ["predict.images", "search_space", "labels", "classifier"])
def test_run_checks_every_stages_inputs_before_the_first_stage(tmp_path, capsys, mistake):
    """`lifelog-ray run` with a `predict.images` that does not exist ran manifest, extract, classify and
    fine-tuning first and failed at predict after nearly eight minutes. Now every stage's inputs are checked
    first: one line, exit 2, nothing run."""
    import yaml
    from helpers import make_study

    root, _ = make_study(tmp_path)
    evil = tmp_path / "space.yaml"
    evil.write_text(yaml.safe_dump({"svm": {"estimator": "subprocess.Popen", "grid": {}}}))
    cfg = {"data": {"root": str(root), "labels": str(tmp_path / "labels.csv")},
           "extract": {"weights": "none", "image_size": 32}, "finetune": {"weights": "none"},
           "classify": {"classifiers": ["svm"]},
           "predict": {"images": str(root)}, "output": {"study": str(tmp_path / "study")}}
    if mistake == "predict.images":
        cfg["predict"]["images"] = str(tmp_path / "no-such-days")
    elif mistake == "search_space":
        cfg["classify"]["search_space"] = str(evil)
    elif mistake == "labels":
        cfg["data"]["labels"] = str(tmp_path / "nope.csv")
    else:
        cfg["classify"]["classifiers"] = ["svm", "../svm"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["run", "--config", str(path), "--ray-address", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert {"predict.images": "predict.images", "search_space": "refused", "labels": "data.labels",
            "classifier": "not a plain name"}[mistake] in err[0], err
    assert not (tmp_path / "study" / "manifest.parquet").exists()
