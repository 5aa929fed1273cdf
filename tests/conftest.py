"""Shared fixtures: tiny generated lifelogs and one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_image(path: Path, color: tuple[int, int, int] = (120, 60, 30), size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 10, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, like this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_lifelog(tmp_path_factory) -> Path:
    """The bundled sample generator at a small size (shared by the tests that only read it)."""
    from lifelog_ray.sample import write_sample

    root = tmp_path_factory.mktemp("sample") / "lifelog"
    write_sample(root, seed=1, days=2, images_per_day=45, image_size=(96, 72))
    return root
