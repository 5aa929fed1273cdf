"""Feature extraction: Keras-equivalent taps, bad images as rejects, resume, growth, Ray-free readers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import LAYERS, SIZE, bad_corpus, extract_config, make_study
from PIL import Image

from lifelog_ray.backbones import BackboneSpec, WeightsError, resolve_weights
from lifelog_ray.errors import LifelogError
from lifelog_ray.extract import accounting, read_features, run_extract
from lifelog_ray.images import DecodeError, decode_image
from lifelog_ray.ingest import build_manifest


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_features_equal_keras_predict_for_every_tap(tmp_path, ray_local):
    """Both weight formats a user may hold: Keras 3 `.weights.h5` and the official legacy HDF5 layout."""
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    root, _ = make_study(tmp_path, n_per_class=4)
    keras.utils.set_random_seed(7)
    ref = keras.applications.VGG19(weights=None, input_shape=(SIZE, SIZE, 3))
    native = tmp_path / "vgg19.weights.h5"
    ref.save_weights(native)
    import h5py

    official = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels.h5"
    with h5py.File(official, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, ref)
    build_manifest(extract_config(tmp_path, root))
    manifest = pd.read_parquet(tmp_path / "study" / "manifest.parquet")
    taps = keras.Model(ref.inputs, [ref.get_layer(n).output for n in LAYERS])
    imgs = np.stack([
        keras.utils.img_to_array(keras.utils.load_img(p, target_size=(SIZE, SIZE), interpolation="bilinear"))
        for p in manifest["path"]
    ])
    expected = dict(zip(LAYERS, taps.predict(keras.applications.vgg19.preprocess_input(imgs), verbose=0)))
    # Both files load to the same weights (checked here, in this process); one extraction through Ray then
    # gives Keras' own predictions for every tap.
    from lifelog_ray.backbones import resolve_weights
    from lifelog_ray.extract import spec_for

    loaded = [resolve_weights(spec_for(extract_config(tmp_path, root, weights=str(w)), "vgg19")) for w in (native, official)]
    assert all(np.array_equal(a, b) for a, b in zip(*loaded)) and len(loaded[0]) == len(ref.get_weights())
    run_extract(extract_config(tmp_path, root, weights=str(official)))
    for layer in LAYERS:
        t = read_features(tmp_path / "study", "vgg19", layer).to_pandas().set_index("image_id")
        got = np.stack(t.loc[manifest["image_id"], "features"].to_numpy())
        assert got.shape == expected[layer].shape
        np.testing.assert_allclose(got, expected[layer], rtol=1e-4, atol=1e-5 * np.abs(expected[layer]).max())
    # extract.store_dtype float16: half the bytes on disk, recorded in _extract.json, Keras' values to float16's
    # precision, and read back as float32 by classify's loader (audit's and the curve's too)
    half = extract_config(tmp_path, root, weights=str(official), store_dtype="float16")
    half.output.study = str(tmp_path / "half")
    build_manifest(half)
    run_extract(half)
    assert json.loads((tmp_path / "half" / "features" / "vgg19" / "_extract.json").read_text())["store_dtype"] == "float16"
    from lifelog_ray.classify.data import load_feature_set

    for layer in LAYERS:
        t = read_features(tmp_path / "half", "vgg19", layer)
        assert t.schema.field("features").type.value_type == pa.float16(), t.schema
        fs = load_feature_set(tmp_path / "half", "vgg19", layer, None)
        got = {i: x for s in fs.X for i, x in zip(fs.ids[s], fs.X[s])}
        got = np.stack([got[i] for i in manifest["image_id"]])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected[layer], rtol=2e-3, atol=1e-3 * np.abs(expected[layer]).max())
    with pytest.raises(LifelogError, match="store_dtype"):  # a study stays one type: no silent mix of the two
        run_extract(extract_config(tmp_path, root, weights=str(official)).model_copy(
            update={"output": half.output}))


def test_decode_handles_modes_and_orientation():
    import io

    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", exif=exif.tobytes())
    out = decode_image(buf.getvalue(), 32, 10**8)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert out[:8].mean() > 200 and out[-8:].mean() < 50  # rotated: the white half is now on top
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), 32, 10**8).min() == 255  # 16-bit white stays white
    with pytest.raises(DecodeError) as e:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"0" * 50, 32, 10**8)
    assert e.value.reason in ("not_an_image", "truncated", "unreadable")


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_bad_images_become_rejects_and_accounting_holds(tmp_path, ray_local):
    root, rows = make_study(tmp_path, n_per_class=3)
    corpus = bad_corpus(root)
    rows += [(p, lab) for p, lab, _ in corpus]
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(tmp_path / "labels.csv", index=False)
    c = extract_config(tmp_path, root, max_image_pixels=40_000)  # 300x300 = 90,000 px: over twice the limit
    build_manifest(c)
    (summary,) = run_extract(c)
    want = {Path(p).stem: r for p, _, r in corpus}
    rejects = pd.read_parquet(tmp_path / "study" / "rejects.parquet")
    ext = rejects[rejects["stage"] == "extract"].set_index("image_id")
    for stem, reason in want.items():
        if reason:
            assert ext.loc[stem, "reason"] == reason, (stem, ext.loc[stem].to_dict())
        else:
            assert stem not in ext.index
    assert summary.rejected == 4 and summary.processed == len(rows) - 4
    for layer, a in accounting(tmp_path / "study", "vgg19", LAYERS).items():
        assert a["manifest"] == a["features"] + a["rejects"], layer
        assert a["features"] == a["unique"]
    # a second backbone added to the study later: its accounting holds too, and rejects.parquet keeps every
    # backbone's rejects (one row per backbone and image), not only the last run's
    (added,) = run_extract(extract_config(tmp_path, root, max_image_pixels=40_000, models="vgg16", layers="fc2"))
    assert added.rejected == 4 and added.processed == len(rows) - 4
    a = accounting(tmp_path / "study", "vgg16", ["fc2"])["fc2"]
    assert a["manifest"] == a["features"] + a["rejects"] and a["features"] == a["unique"]
    ext = pd.read_parquet(tmp_path / "study" / "rejects.parquet").query("stage == 'extract'")
    assert sorted(ext["detail"].str.split(":").str[0].value_counts().items()) == [("vgg16", 4), ("vgg19", 4)], ext


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_resume_growth_and_readers_without_ray(tmp_path, ray_local):
    root, rows = make_study(tmp_path, n_per_class=6)
    c = extract_config(tmp_path, root, layers="fc2,predictions")
    build_manifest(c)
    (first,) = run_extract(c)
    assert first.processed == 18
    model_dir = tmp_path / "study" / "features" / "vgg19"
    # Simulate an interruption: one unit's marker never written, its parts half there. And the lifelog grows by a
    # day. One rerun (each is a Ray run): the lost unit is redone whole, only the new images are extracted.
    markers = sorted((model_dir / "_units").glob("*.json"))
    lost = json.loads(markers[0].read_text())
    markers[0].unlink()
    make_study(tmp_path, n_per_class=2, day="2016-08-17", root=root, rows=rows)
    build_manifest(c)
    (again,) = run_extract(c)
    assert again.processed == len(lost["image_ids"]) + 6 and again.skipped == 18 - len(lost["image_ids"])
    for layer in ("fc2", "predictions"):
        ids = read_features(tmp_path / "study", "vgg19", layer, ["image_id"]).column("image_id").to_pylist()
        assert len(ids) == len(set(ids)) == 24
    # Plain pyarrow / pandas / DuckDB read the shards; month folders keep a multi-year lifelog tidy.
    t = pq.read_table(model_dir / "fc2")
    assert t.schema.field("features").type.list_size == 4096
    assert {p.name for p in (model_dir / "fc2").iterdir()} == {"2016-08"}
    df = pd.read_parquet(model_dir / "predictions")
    assert set(df.columns) >= {"image_id", "label", "split", "day", "features"} and len(df) == 24
    import duckdb

    n = duckdb.sql(f"select count(*) from read_parquet('{model_dir}/fc2/*/*.parquet')").fetchall()[0][0]
    assert n == 24
    # Asking for other taps than the folder holds is a clear error, not a silent mix.
    with pytest.raises(LifelogError, match="--overwrite"):
        run_extract(extract_config(tmp_path, root, layers="fc1"))
    shutil.rmtree(tmp_path / "study" / "features")


def test_weights_errors_are_immediate_and_helpful(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    import lifelog_ray.backbones as bb

    real = bb.build_base

    def offline(keras, spec, weights=None):  # what Keras does without network: the download raises
        if weights == "imagenet":
            raise OSError("URL fetch failure: no network")
        return real(keras, spec, weights)

    monkeypatch.setattr(bb, "build_base", offline)
    with pytest.raises(WeightsError, match=r"--weights PATH"):
        resolve_weights(BackboneSpec("vgg19", weights="imagenet", image_size=224))
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights(BackboneSpec("vgg19", weights=str(tmp_path / "nope.h5"), image_size=SIZE))
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(WeightsError, match="does not fit"):
        resolve_weights(BackboneSpec("vgg19", weights=str(bad), image_size=SIZE))
    with pytest.raises(LifelogError, match="224"):
        BackboneSpec("vgg19", weights="imagenet", image_size=64)


def test_unknown_layer_is_a_one_line_error_before_any_ray_work(tmp_path, capsys):
    """`extract --layers fc9` used to fail inside the Ray actors after four tracebacks."""
    from lifelog_ray.cli import main

    root, _ = make_study(tmp_path, n_per_class=4)
    build_manifest(extract_config(tmp_path, root))
    rc = main(["extract", "--study", str(tmp_path / "study"), "--weights", "none", "--image-size", "32",
               "--layers", "fc2,fc9"])
    err = capsys.readouterr().err
    assert rc == 2 and "no layer(s) ['fc9']" in err and "Traceback" not in err
    assert not (tmp_path / "study" / "features").exists()  # refused before extraction began
