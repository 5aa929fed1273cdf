"""Ray at the edge: connect to a cluster (or start a local Ray), and the resources it offers."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

from .config import RayConfig

log = logging.getLogger(__name__)

# Every Ray worker of ours gets this environment, however Ray was started (CLI, job, Python API, tests):
# TensorFlow's C++ INFO lines and DeprecationWarnings stay out of the logs.
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def running_local_cluster() -> str | None:
    """The GCS address of a cluster started here with `ray start`, if it still answers."""
    path = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"
    try:
        address = path.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None  # none, or a stale entry left by a head that died: start our own


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Use an initialised Ray as is; else `cfg.address` / RAY_ADDRESS (a job's cluster); else a running
    local cluster (`ray start --head`); else a new local Ray for this process. `address: local` always
    starts a new local Ray (the tests use it, so they never join a cluster you have running)."""
    import ray

    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS") or running_local_cluster()
        kwargs = {"runtime_env": {"env_vars": WORKER_ENV}, "log_to_driver": cfg.log_to_driver}
        if address and address != "local":
            log.info("connecting to Ray at %s", address)
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                     **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) the cluster has now."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
