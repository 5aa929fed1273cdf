"""`lifelog-ray doctor`: what this install can do, checked without starting any work.

Versions, the devices each installed Keras backend sees, the ImageNet weights cache, the Ray cluster
a command would join, and the optional extras. Only what the project needs counts as broken.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .config import RayConfig

# Distribution name -> import name, for what every stage needs.
REQUIRED = {"ray": "ray", "tensorflow": "tensorflow", "tf-keras": "tf_keras", "keras": "keras", "xgboost": "xgboost",
            "scikit-learn": "sklearn", "pyarrow": "pyarrow", "pillow": "PIL", "pandas": "pandas"}
# Optional extras of pyproject.toml and a distribution that shows each is installed.
EXTRAS = {"gpu": "nvidia-cudnn-cu12", "cloud": "boto3", "audit": "cleanlab", "dev": "pytest"}


@dataclass
class Check:
    section: str
    name: str
    ok: bool
    detail: str
    needed: bool = False  # a failed needed check makes `doctor` exit 1

    def line(self) -> str:
        mark = "ok" if self.ok else ("FAIL" if self.needed else "--")
        return f"  {mark:<4} {self.name:<22} {self.detail}"


def version() -> str:
    try:
        return md.version("lifelog-ray")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def _packages() -> list[Check]:
    out = [Check("versions", "python", True, f"{platform.python_version()} ({platform.machine()})")]
    for dist, module in REQUIRED.items():
        try:
            v = md.version(dist)
        except md.PackageNotFoundError:
            out.append(Check("versions", dist, False, "not installed: pip install -e .", needed=True))
            continue
        try:
            importlib.import_module(module)
            out.append(Check("versions", dist, True, v))
        except Exception as e:  # noqa: BLE001 - any import failure means the stage using it is broken
            out.append(Check("versions", dist, False, f"{v} installed but `import {module}` fails: "
                                                      f"{type(e).__name__}: {e}", needed=True))
    return out


def _devices() -> list[Check]:
    out = []
    try:
        import tensorflow as tf

        devs = [d.device_type for d in tf.config.list_physical_devices()]
        out.append(Check("devices", "tensorflow", True, ", ".join(f"{devs.count(t)} {t}" for t in sorted(set(devs)))))
    except Exception as e:  # noqa: BLE001
        out.append(Check("devices", "tensorflow", False, f"{type(e).__name__}: {e}", needed=True))
    for name in ("jax", "torch"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            out.append(Check("devices", name, False, "not installed (optional Keras backend)"))
            continue
        try:
            if name == "jax":
                found = [d.platform for d in mod.devices()]
            else:
                found = ["cpu"] + ["cuda"] * mod.cuda.device_count()
            out.append(Check("devices", name, True, ", ".join(f"{found.count(t)} {t}" for t in sorted(set(found)))))
        except Exception as e:  # noqa: BLE001
            out.append(Check("devices", name, False, f"{type(e).__name__}: {e}"))
    return out


def _weights() -> list[Check]:
    from .backbones import IMAGENET_FILES, keras_cache_dir

    out = []
    for model, name in IMAGENET_FILES.items():
        p = keras_cache_dir() / name
        if p.is_file():
            out.append(Check("imagenet weights", model, True, f"{p} ({p.stat().st_size / 2**20:.0f} MiB)"))
        else:
            out.append(Check("imagenet weights", model, False, f"not cached at {p}: copy the official file there, "
                                                              f"or pass --weights PATH or --weights none"))
    return out


def _reachable(address: str) -> bool:
    u = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=3):
            return True
    except OSError:
        return False


def _ray(cfg: RayConfig) -> list[Check]:
    from .runtime import running_local_cluster

    explicit = cfg.address or os.environ.get("RAY_ADDRESS")
    token = Path.home() / ".ray" / "auth_token"
    has_token = bool(os.environ.get("RAY_AUTH_TOKEN")) or token.is_file()
    out = [Check("ray", "auth token", has_token,
                 "found" + (f" ({token})" if token.is_file() else " (RAY_AUTH_TOKEN)") if has_token
                 else f"none at {token} (a local Ray writes one when it starts)")]
    if explicit and explicit != "local":
        ok = _reachable(explicit)
        out.append(Check("ray", "cluster", ok, f"{explicit}: " + ("reachable" if ok else
                                                                  "NOT reachable: is the head up? is the address right?"),
                         needed=True))
    else:
        local = running_local_cluster()
        out.append(Check("ray", "cluster", True, f"a running local cluster at {local} (commands join it)" if local
                         else "none configured or running: each command starts a local Ray"))
    return out


def _extras() -> list[Check]:
    out = []
    for extra, dist in EXTRAS.items():
        try:
            out.append(Check("extras", extra, True, f"installed ({dist} {md.version(dist)})"))
        except md.PackageNotFoundError:
            out.append(Check("extras", extra, False, f"not installed (pip install -e '.[{extra}]')"))
    return out


def run_doctor(cfg: RayConfig | None = None) -> tuple[list[Check], bool]:
    """Every check, and whether everything the project needs works."""
    checks = _packages()
    if all(c.ok for c in checks if c.needed):
        checks += _devices() + _weights()
    checks += _ray(cfg or RayConfig()) + _extras()
    return checks, all(c.ok for c in checks if c.needed)


def format_checks(checks: list[Check]) -> str:
    lines, section = [f"lifelog-ray {version()}"], None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(f"{section}:")
        lines.append(c.line())
    return "\n".join(lines)
