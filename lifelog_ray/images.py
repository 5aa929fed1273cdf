"""Decode stage: bytes -> RGB uint8 at the model's input size, one row at a time so a bad file is a reject."""

from __future__ import annotations

import io
import logging
import time
import warnings

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from . import storage
from .storage import Options

log = logging.getLogger(__name__)

_JPEG = {"JPEG", "MPO"}


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clip (PIL's convert would saturate at 255).
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Transparent pixels carry arbitrary colour: composite on white, as a viewer shows them.
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _os_reason(e: OSError) -> str:
    msg = str(e).lower()
    return "truncated" if "truncated" in msg or "broken data stream" in msg else "unreadable"


def decode_image(data: bytes, size: int, max_pixels: int, jpeg_draft: bool = True) -> np.ndarray:
    """Return (size, size, 3) uint8, squashed to a square as Keras' `load_img(target_size=...)` does."""
    if len(data) == 0:
        raise DecodeError("empty_file", "zero bytes")
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between the limit and twice it: treat both as a decompression bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                im = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                raise DecodeError("not_an_image", "not a recognised image format") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise DecodeError("decompression_bomb", str(e)) from None
            except OSError as e:  # a header cut short
                raise DecodeError(_os_reason(e), str(e)) from None
            try:
                if getattr(im, "n_frames", 1) > 1:
                    im.seek(0)  # multi-page TIFF / animated: the first frame
                if jpeg_draft and im.format in _JPEG and min(im.size) >= 2 * size:
                    im.draft("RGB", (size, size))  # DCT-domain downscale: far less work for big JPEGs
                im.load()
                im = ImageOps.exif_transpose(im)
                im = _to_rgb(im)
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise DecodeError("decompression_bomb", str(e)) from None
            except OSError as e:
                raise DecodeError(_os_reason(e), str(e)) from None
            except (ValueError, SyntaxError, TypeError) as e:
                raise DecodeError("unreadable", f"{type(e).__name__}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


def read_error(path: str, e: OSError) -> tuple[str, str]:
    """(reason, detail) of a file that could not be read. On an object store only a missing key is the
    file's own fault: anything else (throttled past every retry, access denied, no endpoint) is raised, so
    the task fails and the run stops to be resumed, rather than turning the image into a reject."""
    if isinstance(e, FileNotFoundError):
        return "missing_file", f"{path} no longer exists"
    if storage.is_uri(str(path)):
        raise storage.StorageError(f"{path}: the object store failed after its retries ({type(e).__name__}: {e}); "
                                   f"rerun the same command to resume") from e
    return "unreadable", f"{type(e).__name__}: {e}"


class ImageDecoder:
    """Ray Data stage: adds `image` (N, S, S, 3) uint8 and `error`/`error_detail` ("" when decoded)."""

    def __init__(self, size: int, max_pixels: int, jpeg_draft: bool = True, options: Options | None = None) -> None:
        self.size = size
        self.max_pixels = max_pixels
        self.jpeg_draft = jpeg_draft
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        paths = batch["path"]
        n = len(paths)
        images = np.zeros((n, self.size, self.size, 3), dtype=np.uint8)
        errors = np.full(n, "", dtype=object)
        details = np.full(n, "", dtype=object)
        for i, (p, data) in enumerate(zip(paths, storage.read_each([str(p) for p in paths], self.options))):
            if isinstance(data, OSError):
                errors[i], details[i] = read_error(p, data)
                continue
            try:
                images[i] = decode_image(data, self.size, self.max_pixels, self.jpeg_draft)
            except DecodeError as e:
                errors[i], details[i] = e.reason, e.detail
        out = {k: v for k, v in batch.items()}
        out["image"] = images
        out["error"] = errors.astype(str)
        out["error_detail"] = details.astype(str)
        log.debug("decoded %d images in %.3fs", n, time.perf_counter() - t0)
        return out


def decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int, jpeg_draft: bool = True,
                 options: Options | None = None) -> dict:
    """Function form of the decode stage, so Ray Data runs it as plain (elastic) tasks. The batch also carries
    the object-store retries its reads needed (`retried_<layer>`, storage.retry_columns)."""
    before = storage.retry_counts()
    out = ImageDecoder(size, max_pixels, jpeg_draft, options)(batch)
    return {**out, **storage.retry_columns(len(batch["path"]), before)}


def decoded_images(rows: pd.DataFrame, size: int, max_pixels: int, batch_size: int, jpeg_draft: bool = True,
                   options: Options | None = None):
    """Manifest rows (with a `path` column) -> a streaming Ray Dataset of decoded images.

    The one decode chain of extract, finetune and predict. Each row gains `image` (S, S, 3) uint8,
    `error` and `error_detail` ("" when decoded). Blocks hold a few model batches, so the elastic CPU
    decode tasks stream ahead of the model stage without a big backlog.
    """
    ds = image_rows(rows, batch_size)
    return ds.map_batches(decode_batch, fn_kwargs={"size": size, "max_pixels": max_pixels, "jpeg_draft": jpeg_draft,
                                                   "options": options},
                          batch_size=batch_size, num_cpus=0.5, batch_format="numpy")


def read_batch(batch: dict[str, np.ndarray], max_pixels: int, options: Options | None = None) -> dict:
    """Read stage of ``extract.decode: gpu``: each row gains its file's bytes (``data``), whether the GPU
    decoder can take it (``gpu_ok``, from the JPEG header) and ``error``/``error_detail`` for a file that
    cannot be read. Decoding happens in the model actor."""
    from .gpu_decode import jpeg_gpu_ok

    before = storage.retry_counts()
    paths = batch["path"]
    n = len(paths)
    data = np.empty(n, dtype=object)
    gpu_ok = np.zeros(n, dtype=bool)
    errors = np.full(n, "", dtype=object)
    details = np.full(n, "", dtype=object)
    for i, (p, got) in enumerate(zip(paths, storage.read_each([str(p) for p in paths], options))):
        data[i] = b""
        if isinstance(got, OSError):
            errors[i], details[i] = read_error(p, got)
            continue
        data[i] = got
        gpu_ok[i] = jpeg_gpu_ok(got, max_pixels)
    out = {k: v for k, v in batch.items()}
    out["data"], out["gpu_ok"] = data, gpu_ok
    out["error"], out["error_detail"] = errors.astype(str), details.astype(str)
    return {**out, **storage.retry_columns(n, before)}


def image_rows(rows: pd.DataFrame, batch_size: int):
    """Manifest rows -> a Ray Dataset in blocks of a few model batches (the streaming unit of every chain)."""
    import ray

    step = 4 * batch_size
    return ray.data.from_pandas([rows.iloc[i: i + step] for i in range(0, len(rows), step)])


def read_images(rows: pd.DataFrame, max_pixels: int, batch_size: int, options: Options | None = None):
    """Manifest rows -> a streaming Ray Dataset of file bytes, for a model stage that decodes on its GPU."""
    return image_rows(rows, batch_size).map_batches(
        read_batch, fn_kwargs={"max_pixels": max_pixels, "options": options}, batch_size=batch_size,
        num_cpus=0.25, batch_format="numpy")
