"""Keras 3 on more than one backend, and decoding on the model actor's GPU with its CPU fallback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import LAYERS, SIZE, bad_corpus, extract_config, make_study
from PIL import Image

from lifelog_ray import cli
from lifelog_ray.backbones import BackboneSpec, FeatureExtractor, resolve_weights
from lifelog_ray.errors import LifelogError
from lifelog_ray.extract import read_features, resolve_decode, run_extract, settle_decode
from lifelog_ray.gpu_decode import jpeg_gpu_ok
from lifelog_ray.images import DecodeError, decode_batch, decode_image, read_batch
from lifelog_ray.ingest import build_manifest


def _close(a: np.ndarray, b: np.ndarray) -> float:
    """The issue's criterion: max|a-b| / max|b| (must be <= 1e-4)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


# JAX side, in a process where `import tensorflow` fails, as on a GPU node without TensorFlow.
JAX_SIDE = """
import sys
sys.modules["tensorflow"] = None
import json
import numpy as np
from pathlib import Path
import lifelog_ray.extract, lifelog_ray.predict  # the whole extraction path imports without TensorFlow
from lifelog_ray.backbones import BackboneSpec, FeatureExtractor, resolve_weights
work = Path(sys.argv[1])
images = np.load(work / "images.npy")
out = {}
for model in ("vgg19", "vgg16"):
    for fmt in ("weights.h5", "h5"):
        spec = BackboneSpec(model, ("flatten", "fc1", "fc2", "predictions"), str(work / f"{model}.{fmt}"), 32)
        weights = resolve_weights(spec)  # the same weights files on every backend
        ref = np.load(work / f"{model}_weights.npz")
        assert all(np.array_equal(w, ref[f"arr_{i}"]) for i, w in enumerate(weights)), (model, fmt)
    ex = FeatureExtractor(spec, weights, backend="jax", pad_to=8)
    np.savez(work / f"{model}_jax.npz", *ex.features(images))
full = np.load(work / "full.npz")
np.save(work / "squash_jax.npy", np.asarray(ex.squash([full[k] for k in sorted(full.files)])))
import keras
print(json.dumps({"backend": keras.backend.backend(), "tensorflow": sys.modules.get("tensorflow") is not None}))
"""


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
@pytest.mark.integration  # a subprocess
def test_jax_backend_equals_tensorflow_for_every_tap_without_tensorflow(tmp_path):
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    full = [rng.integers(0, 256, (48, 64, 3) if k % 2 else (30, 20, 3), dtype=np.uint8) for k in range(4)]
    np.savez(tmp_path / "full.npz", *full)  # decoded frames of two shapes, for the on-device squash
    expected = {}
    for i, model in enumerate(("vgg19", "vgg16")):
        keras.utils.set_random_seed(11 + i)
        ref = getattr(keras.applications, model.upper())(weights=None, input_shape=(SIZE, SIZE, 3))
        ref.save_weights(tmp_path / f"{model}.weights.h5")  # Keras 3's format
        with h5py.File(tmp_path / f"{model}.h5", "w") as f:  # the official (legacy HDF5) layout
            legacy_h5_format.save_weights_to_hdf5_group(f, ref)
        np.savez(tmp_path / f"{model}_weights.npz", *ref.get_weights())
        spec = BackboneSpec(model, tuple(LAYERS), str(tmp_path / f"{model}.h5"), SIZE)
        tf_actor = FeatureExtractor(spec, resolve_weights(spec))
        expected[model] = tf_actor.features(images)
    res = subprocess.run([sys.executable, "-c", JAX_SIDE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"backend": "jax", "tensorflow": False}
    for model in ("vgg19", "vgg16"):
        got = np.load(tmp_path / f"{model}_jax.npz")
        for i, layer in enumerate(LAYERS):
            assert got[f"arr_{i}"].shape == expected[model][i].shape
            assert _close(got[f"arr_{i}"], expected[model][i]) <= 1e-4, (model, layer)
    # decode gpu squashes decoded frames on the device: JAX's resize gives TensorFlow's pixels, within one level
    squash_tf = np.asarray(tf_actor.squash(full)).astype(int)
    assert np.abs(np.load(tmp_path / "squash_jax.npy").astype(int) - squash_tf).max() <= 1


def test_extract_on_jax_through_ray_records_the_backend_and_refuses_a_mix(tmp_path, ray_local):
    from lifelog_ray.extract import spec_for

    root, _ = make_study(tmp_path, n_per_class=4)
    jax_cfg = extract_config(tmp_path, root, layers="fc2,predictions", backend="jax")
    build_manifest(jax_cfg)
    (sj,) = run_extract(jax_cfg)  # the model actors run Keras on JAX (KERAS_BACKEND set per actor)
    assert sj.processed == 12
    sig = json.loads((tmp_path / "study" / "features" / "vgg19" / "_extract.json").read_text())
    assert (sig["backend"], sig["decode"]) == ("jax", "cpu")  # decode auto on a machine without a GPU
    # the TensorFlow reference, in this process (Ray adds nothing to it): the same weights, the same decode
    manifest = pd.read_parquet(tmp_path / "study" / "manifest.parquet")
    spec = spec_for(jax_cfg, "vgg19")
    pixels = np.stack([decode_image(Path(p).read_bytes(), SIZE, jax_cfg.extract.max_image_pixels)
                       for p in manifest["path"]])
    tf = dict(zip(spec.layers, FeatureExtractor(spec, resolve_weights(spec)).features(pixels)))
    for layer, ref in tf.items():
        got = read_features(tmp_path / "study", "vgg19", layer).to_pandas().set_index("image_id")
        a = np.stack(got.loc[manifest["image_id"], "features"])
        assert _close(a, ref) <= 1e-4, layer
    with pytest.raises(LifelogError, match="'backend': 'jax'.*'backend': 'tensorflow'.*--overwrite"):
        run_extract(extract_config(tmp_path, root, layers="fc2,predictions"))  # more images would mix backends


# --- decode on the GPU, with the CPU decoder for what it refuses ----------------------------------------------

class RefusingDecoder:
    """A stand-in for the GPU decoder on a machine without one: it decodes at full size (as nvJPEG does,
    leaving the resize to the actor) and refuses some files, as a GPU decoder may (corrupt, odd layouts)."""

    name = "test"

    def __init__(self, refuse_every: int = 3) -> None:
        self.refuse_every, self.calls, self.seen = refuse_every, 0, 0
        self.refused: list[bytes] = []

    def decode(self, files: list[bytes]) -> list[np.ndarray | None]:
        self.calls += 1
        out = []
        for data in files:
            self.seen += 1
            try:
                if self.seen % self.refuse_every == 0:
                    raise ValueError("refused")
                out.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            except Exception:  # noqa: BLE001 - what nvJPEG does with a file it cannot take: refuse it
                out.append(None)
                self.refused.append(data)
        return out


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_the_jpeg_header_check_sends_only_what_the_gpu_path_decodes_like_the_cpu():
    rgb = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    assert jpeg_gpu_ok(_jpeg(rgb), 10**8) and jpeg_gpu_ok(_jpeg(rgb[..., 0]), 10**8)  # colour, grey
    upright = Image.Exif()
    upright[0x0112] = 1
    assert jpeg_gpu_ok(_jpeg(rgb, exif=upright.tobytes()), 10**8)
    refused = {
        "progressive": _jpeg(rgb, progressive=True),
        "cmyk": (lambda b: (Image.fromarray(rgb).convert("CMYK").save(b, "JPEG"), b.getvalue())[1])(io.BytesIO()),
        "rotated": _jpeg(rgb, exif=exif.tobytes()),
        "over the pixel limit": _jpeg(rgb),
        "png": (lambda b: (Image.fromarray(rgb).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "truncated header": _jpeg(rgb)[:20],
        "cut short in the scan": _jpeg(rgb)[:-200],
        "empty": b"",
    }
    for what, data in refused.items():
        assert not jpeg_gpu_ok(data, 1000 if what == "over the pixel limit" else 10**8), what
    # a whole header but a scan cut short: the CPU decoder rejects it, so the GPU decoder must never see it
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(refused["cut short in the scan"], SIZE, 10**8)
    assert jpeg_gpu_ok(_jpeg(rgb) + b"\x00" * 16, 10**8)  # zero padding after the end marker is harmless


def test_gpu_decode_falls_back_to_the_cpu_decoder_with_the_same_rejects(tmp_path):
    root, rows = make_study(tmp_path, n_per_class=3)
    rows += [(p, lab) for p, lab, _ in bad_corpus(root)]
    d = root / "2016-08-16"
    rgb = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    for k, kw in enumerate([{}, {"progressive": True}, {"quality": 60}, {}]):
        Image.fromarray(np.roll(rgb, 7 * k, axis=1)).save(d / f"20160816_12000{k}_000.jpg", "JPEG", **kw)
        rows.append((f"2016-08-16/20160816_12000{k}_000.jpg", "car"))
    rows.append(("2016-08-16/20160816_130000_000.jpg", "car"))  # listed, then deleted before extraction
    batch = {"image_id": np.array([Path(p).stem for p, _ in rows]), "path": np.array([str(root / p) for p, _ in rows]),
             "label": np.array([lab for _, lab in rows])}
    max_pixels = 40_000
    spec = BackboneSpec("vgg19", ("fc2", "predictions"), "none", SIZE)
    weights = resolve_weights(spec)
    cpu = FeatureExtractor(spec, weights)(decode_batch(batch, SIZE, max_pixels))
    decoder = RefusingDecoder()
    gpu_actor = FeatureExtractor(spec, weights, decode="gpu", max_pixels=max_pixels, gpu_decoder=lambda: decoder)
    read = read_batch(batch, max_pixels)
    assert "image" not in read and read["data"].dtype == object  # the CPU tasks only read bytes
    gpu = gpu_actor(read)
    # every row is in the output, the rejects and their reasons are the CPU path's
    assert list(gpu["image_id"]) == list(cpu["image_id"])
    assert list(gpu["error"]) == list(cpu["error"]) and list(gpu["error_detail"]) == list(cpu["error_detail"])
    assert sum(e != "" for e in gpu["error"]) == 5  # empty, truncated, not an image, bomb, missing file
    assert "data" not in gpu and "gpu_ok" not in gpu
    # files never sent to the GPU decoder, or refused by it, went through the CPU decoder: the same features
    sent = read["gpu_ok"] & (read["error"] == "")
    refused = np.array([bytes(x) in decoder.refused for x in read["data"]]) & sent
    ok = gpu["error"] == ""
    assert gpu_actor.decoded["gpu"] == (sent & ~refused).sum() > 0 and refused.any() and decoder.calls == 1
    assert gpu_actor.decoded["cpu"] == (ok & (~sent | refused)).sum() > 0
    for layer in ("fc2", "predictions"):
        a, b = gpu[f"feat__{layer}"], cpu[f"feat__{layer}"]
        on_cpu = ok & (~sent | refused)
        assert np.array_equal(a[on_cpu], b[on_cpu])
        # decoded on the "GPU": full decode, then the actor's antialiased bilinear squash; close to PIL's path
        on_gpu = ok & sent & ~refused
        assert np.isfinite(a[on_gpu]).all() and a[on_gpu].any()
        assert not a[~ok].any() and not b[~ok].any()
    # the actor's squash to a square matches the CPU path's (PIL's antialiased bilinear, no DCT draft)
    jpg = (d / "20160816_120000_000.jpg").read_bytes()
    full = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    mine = np.asarray(gpu_actor.squash([full]))[0]
    assert mine.shape == (SIZE, SIZE, 3) and mine.dtype == np.uint8
    assert np.abs(mine.astype(int) - decode_image(jpg, SIZE, 10**8, jpeg_draft=False)).mean() < 2
    # frames of one shape are squashed as one stack; a batch of mixed shapes keeps its order
    rng = np.random.default_rng(2)
    mixed = [rng.integers(0, 255, (48, 64, 3) if k % 3 else (30, 20, 3), dtype=np.uint8) for k in range(7)]
    together = np.asarray(gpu_actor.squash(mixed))
    assert together.shape == (7, SIZE, SIZE, 3)
    for k, img in enumerate(mixed):
        assert np.array_equal(together[k], np.asarray(gpu_actor.squash([img]))[0]), k


def test_decode_choice_and_its_one_line_errors(tmp_path, monkeypatch, capsys, ray_local):
    import lifelog_ray.extract as ex

    assert resolve_decode("auto", None, "cpu")[0] == "cpu"
    assert resolve_decode("cpu", None, "gpu")[0] == "cpu"
    with pytest.raises(LifelogError, match="no GPU"):
        resolve_decode("gpu", None, "cpu")
    with pytest.raises(LifelogError, match="no GPU"):
        resolve_decode("auto", "gpu", "cpu")  # a study decoded on GPUs, continued on a CPU-only cluster
    monkeypatch.setattr(ex, "_gpu_decode_usable", lambda wait_s: (False, "nvImageCodec is not installed"))
    assert resolve_decode("auto", None, "gpu") == ("cpu", "the GPU nodes cannot decode JPEGs: nvImageCodec is not "
                                                          "installed")
    with pytest.raises(LifelogError, match="cannot decode JPEGs \\(nvImageCodec is not installed\\).*gpu-jax"):
        resolve_decode("gpu", None, "gpu")
    monkeypatch.setattr(ex, "_gpu_decode_usable", lambda wait_s: (True, "nvimgcodec"))
    assert resolve_decode("auto", None, "gpu")[0] == "gpu" and resolve_decode("auto", "cpu", "gpu")[0] == "cpu"
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    with pytest.raises(LifelogError, match="decoded on the CPU; this run would decode on the GPU"):
        settle_decode(model_dir, {"decode": "cpu"}, "gpu", "gpu")
    monkeypatch.undo()
    # the CLI on this GPU-less machine: exit 2, one line, no image read
    root, _ = make_study(tmp_path, n_per_class=4)
    build_manifest(extract_config(tmp_path, root))
    study = tmp_path / "study"
    assert cli.main(["extract", "--study", str(study), "--weights", "none", "--image-size", "32",
                     "--decode", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Ray cluster has no GPU" in err[0] and "--decode cpu" in err[0]
    assert not list((study / "features" / "vgg19").glob("*/*/*.parquet"))
    assert pd.read_parquet(study / "manifest.parquet").shape[0] == 12
