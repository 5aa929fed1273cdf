"""Label taxonomy as data: raw lifelog labels -> merged study categories (case/space-insensitive)."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import yaml

from .errors import LifelogError

_WS = re.compile(r"\s+")


def normalize_label(label: str) -> str:
    return _WS.sub(" ", str(label)).strip().casefold()


class Taxonomy:
    """Maps raw labels to categories; `None` from `merge` means the label is outside the taxonomy."""

    def __init__(self, categories: dict[str, list[str]], source: str = "<dict>") -> None:
        self.source = source
        self.categories = list(categories)
        self._map: dict[str, str] = {}
        for cat, raws in categories.items():
            for raw in [cat, *(raws or [])]:
                key = normalize_label(raw)
                prev = self._map.get(key)
                if prev is not None and prev != cat:
                    raise LifelogError(f"taxonomy {source}: raw label {raw!r} maps to both {prev!r} and {cat!r}")
                self._map[key] = cat

    @classmethod
    def load(cls, spec: str | os.PathLike | None) -> Taxonomy | None:
        """`paper` is the bundled 25-category taxonomy; None means labels are used as given."""
        if spec is None or str(spec).lower() in ("none", "null", ""):
            return None
        if str(spec) == "paper":
            text = resources.files("lifelog_ray.resources").joinpath("taxonomy_paper.yaml").read_text("utf-8")
            source = "bundled paper taxonomy"
        else:
            try:
                text = Path(spec).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise LifelogError(f"taxonomy file not found: {spec} (--taxonomy paper|none|PATH.yaml)") from None
            except (OSError, UnicodeDecodeError) as e:
                raise LifelogError(f"taxonomy {spec}: cannot be read as text ({type(e).__name__})") from None
            source = str(spec)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise LifelogError(f"taxonomy {source}: not valid YAML ({str(e).splitlines()[0]})") from None
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, dict) or not cats:
            raise LifelogError(f"taxonomy {source}: expected a mapping 'categories: {{Category: [raw labels]}}'")
        return cls({str(k): [str(x) for x in (v or [])] for k, v in cats.items()}, source)

    def merge(self, raw: str) -> str | None:
        return self._map.get(normalize_label(raw))
