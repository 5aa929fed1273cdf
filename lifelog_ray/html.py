"""HTML building blocks for the report: escaping, tables, embedded images (nothing is fetched over the network)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pandas as pd

from . import storage


def escape(x: object) -> str:
    return html.escape(str(x))


def png_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def table(df: pd.DataFrame, highlight_max: list[str] | None = None, fmt: str = "{:.2f}") -> str:
    cols = list(df.columns)
    best = {c: df[c].max() for c in (highlight_max or []) if c in df and df[c].notna().any()}
    out = ["<table><thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in cols) + "</tr></thead><tbody>"]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            text = fmt.format(v) if isinstance(v, (float, np.floating)) and not pd.isna(v) else ("—" if pd.isna(v) else v)
            cls = ' class="best"' if c in best and v == best[c] else ""
            cells.append(f"<td{cls}>{escape(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</tbody></table>"


# A thumbnail's source is decoded whole unless it is a JPEG (decoded at 1/2 to 1/8 scale): above this many
# pixels (after that reduction) it is left out, so a report's memory stays bounded whatever a study holds.
THUMB_MAX_PIXELS = 40_000_000


def thumb(path: str, options: storage.Options | None = None, size: tuple[int, int] = (300, 225)) -> str | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(storage.read_bytes(path, options))) as im:
            im.draft("RGB", (2 * size[0], 2 * size[1]))  # JPEG: DCT scaling, before anything is decoded
            if im.width * im.height > THUMB_MAX_PIXELS:
                return None
            im.thumbnail(size)
            im = ImageOps.exif_transpose(im).convert("RGB")
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
            return png_uri(buf.getvalue(), "image/jpeg")
    except Exception:  # noqa: BLE001 - a thumbnail that fails is left out, the row stays in the table
        return None
