"""VGG16/VGG19 backbones: weight resolution, layer taps as data, and the one-pass multi-tap model stage."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LifelogError

log = logging.getLogger(__name__)

# Keras' own cache names for the ImageNet weights (keras.applications downloads them there).
IMAGENET_FILES = {
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels.h5",
    "vgg16": "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
}
_POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


class WeightsError(LifelogError):
    """Weights that cannot be had: says how to pass a local file instead."""


@dataclass(frozen=True)
class BackboneSpec:
    model: str = "vgg19"
    layers: tuple[str, ...] = ("flatten", "fc1", "fc2", "predictions")
    weights: str = "imagenet"  # imagenet | none | PATH
    image_size: int = 224
    seed: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.model not in IMAGENET_FILES:
            raise LifelogError(f"unknown model {self.model!r}; choose one of {sorted(IMAGENET_FILES)}")
        if self.weights == "imagenet" and self.image_size != 224:
            raise LifelogError("imagenet weights with the classifier top need image_size 224")


@dataclass(frozen=True)
class Tap:
    """One tapped layer: its name and the width of its (flattened) output; drives the Parquet schema."""

    layer: str
    width: int


@dataclass
class Backbone:
    spec: BackboneSpec
    model: Any  # keras.Model with one output per tap
    taps: list[Tap] = field(default_factory=list)


def keras_module():
    """Keras 3 (as `tf.keras`) for inference: extraction and prediction."""
    import tensorflow as tf

    return tf.keras


def legacy_keras_module():
    """tf-keras (Keras 2) for training: MultiWorkerMirroredStrategy's `model.fit` works with it and fails
    with Keras 3. Imported by name, since Ray's TF backend imports TensorFlow in the worker before it sets
    TF_USE_LEGACY_KERAS, so `tf.keras` would still be Keras 3 there."""
    import tf_keras

    return tf_keras


def application(keras, model: str):
    """The one model map: a model name -> its keras.applications constructor (either Keras)."""
    return getattr(keras.applications, model.upper())


def preprocess(keras, model: str, x):
    return getattr(keras.applications, model).preprocess_input(x)


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def build_base(keras, spec: BackboneSpec, weights: str | None = None):
    """The full backbone (with its classifier top) under the spec's precision policy."""
    prev = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(_POLICY[spec.precision])
    try:
        return application(keras, spec.model)(
            include_top=True, weights=weights, input_shape=(spec.image_size, spec.image_size, 3)
        )
    finally:
        keras.mixed_precision.set_global_policy(prev)


def resolve_weights(spec: BackboneSpec) -> list[np.ndarray]:
    """Load the spec's weights once (on the driver), failing fast with a clear message."""
    keras = keras_module()
    w = spec.weights
    if w.lower() == "none":
        return random_weights(_checked(build_base(keras, spec, None), spec).get_weights(), spec.seed)
    if w.lower() == "imagenet":
        cached = keras_cache_dir() / IMAGENET_FILES[spec.model]
        try:
            model = build_base(keras, spec, "imagenet")
        except Exception as e:  # noqa: BLE001 - download or cache problems all end the same way
            raise WeightsError(
                f"cannot load ImageNet weights for {spec.model}: not cached at {cached} and the download "
                f"failed ({type(e).__name__}: {e}). Copy the official file "
                f"{IMAGENET_FILES[spec.model]} there, or pass it with --weights PATH "
                f"(or --weights none for a seeded random init)"
            ) from None
        return _checked(model, spec).get_weights()
    path = Path(w)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (--weights imagenet|none|PATH)")
    if not (path.name.endswith(".h5") or path.name.endswith(".hdf5")):
        raise WeightsError(f"{path}: expected a Keras HDF5 weights file (.h5 or .weights.h5)")
    model = build_base(keras, spec, None)
    try:
        model.load_weights(str(path))
    except Exception as e:  # noqa: BLE001
        raise WeightsError(
            f"{path}: does not fit {spec.model} at input {spec.image_size}x{spec.image_size} "
            f"({type(e).__name__}: {e})"
        ) from None
    return _checked(model, spec).get_weights()


# Caffe-style preprocessing (BGR, ImageNet mean subtracted) leaves pixels spread about +-128, std ~64.
INPUT_SPREAD = 64.0


def random_weights(like: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """A seeded random init that keeps activations of order 1 through all 19 layers (`--weights none`).

    Keras' default (Glorot-uniform kernels) halves the variance at every ReLU layer, so a random VGG19's
    block5 activations are ~200x smaller than its input and fc2's ~1,000x: a new softmax on top then
    barely moves in a few epochs, and every fine-tuning method predicts the majority class. He-normal
    kernels (std sqrt(2 / fan_in)) preserve the variance through ReLUs; the first kernel is divided by
    the input's spread so the scale is ~1 from the first layer on. Biases start at zero, as in Keras.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i, w in enumerate(like):
        if w.ndim == 1:
            out.append(np.zeros_like(w))
            continue
        std = np.sqrt(2.0 / np.prod(w.shape[:-1])) / (INPUT_SPREAD if i == 0 else 1.0)
        out.append((rng.standard_normal(w.shape, dtype=np.float32) * std).astype(w.dtype))
    return out


def _checked(model, spec: BackboneSpec):
    """The model, once every requested tap is one of its layers (checked on the driver, before Ray)."""
    names = [layer.name for layer in model.layers]
    unknown = [n for n in spec.layers if n not in names]
    if unknown:
        raise LifelogError(f"{spec.model} has no layer(s) {unknown}; its layers are: {', '.join(names)}")
    return model


def build_backbone(spec: BackboneSpec, weights: list[np.ndarray] | None) -> Backbone:
    """A model with one output per requested tap, so all taps come from one forward pass."""
    keras = keras_module()
    base = build_base(keras, spec, None)
    if weights is not None:
        base.set_weights(weights)
    _checked(base, spec)
    outputs = [base.get_layer(n).output for n in spec.layers]
    taps = [Tap(n, int(np.prod(o.shape[1:]))) for n, o in zip(spec.layers, outputs)]
    return Backbone(spec, keras.Model(base.inputs, outputs), taps)


def tap_widths(spec: BackboneSpec) -> list[Tap]:
    return build_backbone(spec, None).taps


def _configure_tf_devices() -> None:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:  # share the GPU with decode/other actors instead of grabbing all of its memory
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass


class FeatureExtractor:
    """Model stage: built once per actor; each call maps a decoded batch to one column per tap."""

    def __init__(self, spec: BackboneSpec, weights: Any = None) -> None:
        _configure_tf_devices()
        import tensorflow as tf

        if weights is not None and type(weights).__name__ == "ObjectRef":
            import ray

            weights = ray.get(weights)
        t0 = time.perf_counter()
        self.spec = spec
        self.backbone = build_backbone(spec, weights)
        keras = keras_module()
        model, name = self.backbone.model, spec.model
        s = spec.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)], reduce_retracing=True)
        def forward(images):
            x = preprocess(keras, name, tf.cast(images, tf.float32))
            outs = model(x, training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return [tf.reshape(tf.cast(o, tf.float32), [tf.shape(o)[0], -1]) for o in outs]

        self._forward = forward
        log.info("built %s taps=%s in %.1fs", name, [t.layer for t in self.backbone.taps], time.perf_counter() - t0)

    @property
    def taps(self) -> list[Tap]:
        return self.backbone.taps

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        return [o.numpy() for o in self._forward(images)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        ok = np.asarray(batch["error"]) == ""
        cols = {t.layer: np.zeros((n, t.width), dtype=np.float32) for t in self.taps}
        if ok.any():
            outs = self.features(np.ascontiguousarray(batch["image"][ok]))
            for t, o in zip(self.taps, outs):
                cols[t.layer][ok] = o
        out = {k: v for k, v in batch.items() if k != "image"}  # pixels are not needed downstream
        for layer, arr in cols.items():
            out[f"feat__{layer}"] = arr
        return out
