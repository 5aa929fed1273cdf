"""Decoding on the model actor's GPU: a JPEG header check on the CPU, nvJPEG through NVIDIA nvImageCodec on
the GPU, and the CPU decoder for every file the GPU path refuses, so rejects stay the CPU path's.

The CPU read tasks only read bytes and look at the JPEG header (`jpeg_gpu_ok`): baseline or extended
Huffman JPEG, 1 or 3 components, no EXIF rotation, under the pixel limit, ending in its end-of-image
marker. Everything else (progressive, CMYK, PNG, a rotated frame, a bomb, a corrupt header, a file cut
short) and every file the GPU decoder fails on is decoded by `images.decode_image` in the actor, one by
one, exactly as with `extract.decode: cpu`.
"""

from __future__ import annotations

import logging
import struct
from typing import Any, Protocol

log = logging.getLogger(__name__)

_SOF_OK = {0xC0, 0xC1}  # baseline, extended sequential (Huffman): what nvJPEG's hardware and GPU paths take
_SOF_ANY = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # every start-of-frame marker


def jpeg_gpu_ok(data: bytes, max_pixels: int) -> bool:
    """True when the GPU decoder can take this file and give what the CPU path gives (checked on the header)."""
    if len(data) < 4 or data[:2] != b"\xff\xd8":
        return False
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        # cut short (or trailed by other data): PIL rejects a truncated scan, while nvJPEG may fill it in
        # and return an image; the CPU decoder gives such a file its reject reason
        return False
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2: i + 4])
        seg = data[i + 4: i + 2 + length]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00" and _exif_orientation(seg[6:]) not in (None, 1):
            return False  # the CPU path rotates it (exif_transpose): keep one code path for that
        if marker in _SOF_ANY:
            if marker not in _SOF_OK or len(seg) < 6:
                return False
            height, width = struct.unpack(">HH", seg[1:5])
            return seg[5] in (1, 3) and 0 < width * height <= max_pixels
        if marker == 0xDA:  # start of scan before any frame header: corrupt
            return False
        i += 2 + length
    return False


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of IFD0 in a TIFF-structured EXIF block, or None."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    end = "<" if tiff[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", tiff[4:8])
        (count,) = struct.unpack(end + "H", tiff[ifd: ifd + 2])
        for k in range(count):
            entry = tiff[ifd + 2 + 12 * k: ifd + 14 + 12 * k]
            tag, _typ, _cnt = struct.unpack(end + "HHI", entry[:8])
            if tag == 0x0112:
                return struct.unpack(end + "H", entry[8:10])[0]
    except struct.error:
        return None
    return None


class GpuDecoder(Protocol):
    """Decodes a batch of JPEG files on the GPU: one (H, W, 3) uint8 device image per file (anything that
    exposes ``__dlpack__``, or a NumPy array), or None for a file it refuses."""

    name: str

    def decode(self, files: list[bytes]) -> list[Any | None]: ...


class NvImageCodecDecoder:
    """nvJPEG through NVIDIA nvImageCodec (`nvidia-nvimgcodec-cu12/-cu13`): batched, on the hardware JPEG
    decoders where the GPU has them (A100, H100), else on the SMs. No CPU backend: a file the GPU cannot
    decode comes back as None and goes to our CPU decoder, whose rejects are the CPU path's."""

    name = "nvimgcodec"

    def __init__(self, device_id: int = 0) -> None:
        from nvidia import nvimgcodec

        kinds = [nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY,
                 nvimgcodec.BackendKind.HYBRID_CPU_GPU]
        self._nv = nvimgcodec
        self._decoder = nvimgcodec.Decoder(device_id=device_id, backends=[nvimgcodec.Backend(k) for k in kinds])
        # interleaved 8-bit RGB whatever the file holds (grey too), as the CPU path's convert("RGB")
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.I_RGB)

    def decode(self, files: list[bytes]) -> list[Any | None]:
        """One nvimgcodec.Image (on the GPU, DLPack-capable, shape (H, W, 3)) or None per file."""
        if not files:
            return []
        try:
            return list(self._decoder.decode([self._nv.CodeStream(f) for f in files], params=self._params))
        except Exception as e:  # noqa: BLE001 - a batch-level failure: every file goes to the CPU decoder
            log.warning("nvImageCodec failed on a batch of %d files (%s); decoding them on the CPU", len(files), e)
            return [None] * len(files)


def gpu_decoder() -> GpuDecoder:
    """The GPU decoder of this process (nvImageCodec); raises ImportError/RuntimeError when unusable."""
    return NvImageCodecDecoder()


def probe() -> tuple[bool, str]:
    """Can this process decode a JPEG on its GPU? (run on a GPU node: `extract.decode` auto/gpu)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(buf, "JPEG")
    try:
        out = gpu_decoder().decode([buf.getvalue()])
    except ImportError as e:
        return False, f"nvImageCodec is not installed ({e}); install the gpu or gpu-jax extra"
    except Exception as e:  # noqa: BLE001 - no driver, no device, a broken install: all mean "no"
        return False, f"{type(e).__name__}: {e}"
    if not out or out[0] is None:
        return False, "nvImageCodec could not decode a baseline JPEG on this GPU"
    return True, NvImageCodecDecoder.name


__all__ = ["jpeg_gpu_ok", "GpuDecoder", "NvImageCodecDecoder", "gpu_decoder", "probe"]
