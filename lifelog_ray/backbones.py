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


BACKENDS = ("tensorflow", "jax")


def keras_module():
    """Keras 3 for inference (extraction, prediction, resolving weights): `tf.keras` where TensorFlow is
    installed, else plain `keras` on the JAX backend (a GPU node may have no TensorFlow)."""
    try:
        import tensorflow as tf
    except ImportError:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        return keras
    return tf.keras


def actor_env(backend: str) -> dict[str, str]:
    """The environment a model actor of ``backend`` starts with (Ray runtime_env): Keras reads
    KERAS_BACKEND once per process, so the backend is chosen per actor, not by the driver."""
    if backend == "jax":
        # JAX would take 75 % of the GPU's memory up front; the decoder and other actors need some.
        return {"KERAS_BACKEND": "jax", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return {"KERAS_BACKEND": "tensorflow"}


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
        # only the weights' shapes are needed: not get_weights(), which copies every array (~2 s at 224 px)
        return random_weights(_checked(build_base(keras, spec, None), spec).weights, spec.seed)
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
    ``like``: the model's weights, or anything with their ``shape`` and ``dtype`` (its variables).
    Scaled in place, in float64 then rounded as before (the same numbers, ~4x less time: 143 M weights at 224 px).
    """
    rng = np.random.default_rng(seed)
    out = []
    for i, w in enumerate(like):
        shape, dtype = tuple(w.shape), np.dtype(str(getattr(w.dtype, "name", w.dtype)))
        if len(shape) == 1:
            out.append(np.zeros(shape, dtype))
            continue
        std = np.sqrt(2.0 / np.prod(shape[:-1])) / (INPUT_SPREAD if i == 0 else 1.0)
        x = rng.standard_normal(shape, dtype=np.float32)
        np.multiply(x, std, out=x, casting="unsafe")  # computed in float64 (std is), stored as float32
        out.append(x if dtype == np.float32 else x.astype(dtype))
    return out


def _checked(model, spec: BackboneSpec):
    """The model, once every requested tap is one of its layers (checked on the driver, before Ray)."""
    names = [layer.name for layer in model.layers]
    unknown = [n for n in spec.layers if n not in names]
    if unknown:
        raise LifelogError(f"{spec.model} has no layer(s) {unknown}; its layers are: {', '.join(names)}")
    return model


def build_backbone(spec: BackboneSpec, weights: list[np.ndarray] | None, keras: Any = None) -> Backbone:
    """A model with one output per requested tap, so all taps come from one forward pass."""
    keras = keras or keras_module()
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


def _keras_for(backend: str):
    """This process's Keras 3, checked to run on ``backend`` (set by actor_env before the first import)."""
    if backend == "tensorflow":
        _configure_tf_devices()
        return keras_module()
    os.environ.setdefault("KERAS_BACKEND", backend)
    import keras

    if keras.backend.backend() != backend:
        raise LifelogError(f"extract.backend {backend}: this process's Keras already runs on "
                           f"{keras.backend.backend()} (KERAS_BACKEND is read once per process)")
    return keras


class _TensorflowRuntime:
    """The tapped model as one tf.function (uint8 in, float32 taps out), and the device ops GPU decode needs."""

    def __init__(self, keras, model, spec: BackboneSpec) -> None:
        import tensorflow as tf

        self.tf, s, name = tf, spec.image_size, spec.model

        @tf.function(input_signature=[tf.TensorSpec([None, s, s, 3], tf.uint8)], reduce_retracing=True)
        def forward(images):
            x = preprocess(keras, name, tf.cast(images, tf.float32))
            outs = model(x, training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return [tf.reshape(tf.cast(o, tf.float32), [tf.shape(o)[0], -1]) for o in outs]

        self._forward = forward

    def forward(self, images) -> list[np.ndarray]:
        return [o.numpy() for o in self._forward(images)]

    def to_device(self, image):
        if isinstance(image, np.ndarray):
            return self.tf.convert_to_tensor(image)
        return self.tf.experimental.dlpack.from_dlpack(image.__dlpack__())  # stays on the GPU

    def resize(self, images, size: int):
        """(N, H, W, 3) uint8 on the device -> (N, size, size, 3) uint8: one op for the whole stack."""
        out = self.tf.image.resize(images, (size, size), method="bilinear", antialias=True)
        return self.tf.cast(self.tf.clip_by_value(self.tf.round(out), 0, 255), self.tf.uint8)

    def stack(self, images: list):
        return self.tf.stack(images)

    def concat(self, batches: list):
        return batches[0] if len(batches) == 1 else self.tf.concat(batches, axis=0)

    def take(self, batch, order: np.ndarray):
        return self.tf.gather(batch, order)


class _JaxRuntime:
    """The tapped model as one jitted stateless call; batches are padded to one shape (no recompiles)."""

    def __init__(self, keras, model, spec: BackboneSpec, pad_to: int | None) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.pad_to, name = jax, jnp, pad_to, spec.model
        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward(images):
            x = preprocess(keras, name, images.astype(jnp.float32))
            outs, _ = model.stateless_call(trainable, frozen, x, training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            return [o.reshape(o.shape[0], -1).astype(jnp.float32) for o in outs]

        def _resize(images, size: int):  # (N, H, W, C): one compiled resize per input shape
            shape = (images.shape[0], size, size, images.shape[-1])
            out = jax.image.resize(images.astype(jnp.float32), shape, "linear", antialias=True)
            return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)

        self._forward = forward
        self._resize = jax.jit(_resize, static_argnums=1)

    def forward(self, images) -> list[np.ndarray]:
        images = self.jnp.asarray(images)
        n = images.shape[0]
        if self.pad_to and n < self.pad_to:
            images = self.jnp.concatenate([images, self.jnp.zeros((self.pad_to - n, *images.shape[1:]), images.dtype)])
        return [np.asarray(o[:n]) for o in self._forward(images)]

    def to_device(self, image):
        if isinstance(image, np.ndarray):
            return self.jnp.asarray(image)
        return self.jax.dlpack.from_dlpack(image)  # stays on the GPU

    def resize(self, images, size: int):
        return self._resize(images, size)

    def stack(self, images: list):
        return self.jnp.stack(images)

    def concat(self, batches: list):
        return batches[0] if len(batches) == 1 else self.jnp.concatenate(batches, axis=0)

    def take(self, batch, order: np.ndarray):
        return self.jnp.take(batch, self.jnp.asarray(order), axis=0)


class FeatureExtractor:
    """Model stage: built once per actor; each call maps a batch to one column per tap.

    ``decode="cpu"``: the batch holds decoded ``image`` pixels (images.decoded_images). ``decode="gpu"``: it
    holds file bytes (``data``, ``gpu_ok``, images.read_images); the actor decodes them on its GPU and
    resizes there, and a file the GPU path refuses is decoded by the CPU decoder here, one by one, with the
    CPU path's reject reasons. ``gpu_decoder``: a factory for the GPU decoder (default nvImageCodec).
    """

    def __init__(self, spec: BackboneSpec, weights: Any = None, backend: str = "tensorflow", decode: str = "cpu",
                 max_pixels: int = 89_478_485, jpeg_draft: bool = True, pad_to: int | None = None,
                 gpu_decoder: Any = None) -> None:
        if backend not in BACKENDS:
            raise LifelogError(f"extract.backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if weights is not None and type(weights).__name__ == "ObjectRef":
            import ray

            weights = ray.get(weights)
        t0 = time.perf_counter()
        keras = _keras_for(backend)
        self.spec, self.backend, self.decode = spec, backend, decode
        self.max_pixels, self.jpeg_draft = max_pixels, jpeg_draft
        self.backbone = build_backbone(spec, weights, keras)
        self.runtime = (_TensorflowRuntime(keras, self.backbone.model, spec) if backend == "tensorflow"
                        else _JaxRuntime(keras, self.backbone.model, spec, pad_to))
        self.decoded = {"gpu": 0, "cpu": 0}  # images decoded on each side in this actor (decode=gpu)
        self.gpu = None
        if decode == "gpu":
            from .gpu_decode import gpu_decoder as default_decoder

            self.gpu = (gpu_decoder or default_decoder)()
        log.info("built %s on %s (decode %s) taps=%s in %.1fs", spec.model, backend, decode,
                 [t.layer for t in self.backbone.taps], time.perf_counter() - t0)

    @property
    def taps(self) -> list[Tap]:
        return self.backbone.taps

    def features(self, images) -> list[np.ndarray]:
        return self.runtime.forward(images)

    def squash(self, decoded: list) -> Any:
        """Full-size decoded images (device or host, (H, W, 3) uint8) -> one (N, S, S, 3) uint8 device batch in
        the same order: images of one shape (a camera's frames) are stacked and resized by one device op."""
        rt, size = self.runtime, self.spec.image_size
        by_shape: dict[tuple, list[int]] = {}
        for k, img in enumerate(decoded):
            by_shape.setdefault(tuple(img.shape), []).append(k)
        pieces = [(rt.resize(rt.stack([rt.to_device(decoded[k]) for k in idx]), size), idx)
                  for idx in by_shape.values()]
        return self._in_order(pieces)

    def _in_order(self, pieces: list[tuple[Any, list[int]]]) -> Any:
        """Device batches, each with the row numbers of its rows -> one batch with its rows in row order."""
        rt = self.runtime
        order = [k for _, idx in pieces for k in idx]
        out = rt.concat([batch for batch, _ in pieces])
        return out if order == sorted(order) else rt.take(out, np.argsort(order))

    def _decode_here(self, batch: dict[str, np.ndarray]) -> tuple[Any, np.ndarray, np.ndarray]:
        """decode=gpu: (device batch of the decoded images, error, error_detail) for the batch's rows."""
        from .images import DecodeError, decode_image

        rt, size, n = self.runtime, self.spec.image_size, len(batch["image_id"])
        errors = np.asarray(batch["error"]).astype(object)
        details = np.asarray(batch["error_detail"]).astype(object)
        data, gpu_ok = batch["data"], np.asarray(batch["gpu_ok"], dtype=bool)
        to_gpu = [i for i in range(n) if errors[i] == "" and gpu_ok[i]]
        refused = [i for i in range(n) if errors[i] == "" and not gpu_ok[i]]
        on_gpu: dict[int, Any] = {}
        for i, img in zip(to_gpu, self.gpu.decode([bytes(data[i]) for i in to_gpu]) if to_gpu else []):
            shape = tuple(getattr(img, "shape", ()))
            if img is None or len(shape) != 3 or shape[-1] != 3:
                refused.append(i)
            else:
                on_gpu[i] = img
        self.decoded["gpu"] += len(on_gpu)
        on_cpu: dict[int, np.ndarray] = {}
        for i in sorted(refused):  # the CPU path, file by file: the same pixels and the same rejects
            try:
                on_cpu[i] = decode_image(bytes(data[i]), size, self.max_pixels, self.jpeg_draft)
                self.decoded["cpu"] += 1
            except DecodeError as e:
                errors[i], details[i] = e.reason, e.detail
        pieces = ([(self.squash(list(on_gpu.values())), list(on_gpu))] if on_gpu else []) + (
            [(rt.to_device(np.stack(list(on_cpu.values()))), list(on_cpu))] if on_cpu else [])
        return (self._in_order(pieces) if pieces else None), errors, details

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        if self.gpu is not None:
            images, errors, details = self._decode_here(batch)
            batch = {**batch, "error": errors.astype(str), "error_detail": details.astype(str)}
        ok = np.asarray(batch["error"]) == ""
        if self.gpu is None and ok.any():
            images = np.ascontiguousarray(batch["image"][ok])
        cols = {t.layer: np.zeros((n, t.width), dtype=np.float32) for t in self.taps}
        if ok.any():
            for t, o in zip(self.taps, self.features(images)):
                cols[t.layer][ok] = o
        out = {k: v for k, v in batch.items() if k not in ("image", "data", "gpu_ok")}  # not needed downstream
        for layer, arr in cols.items():
            out[f"feat__{layer}"] = arr
        return out
