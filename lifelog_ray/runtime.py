"""Ray at the edge: connect to a cluster (or start a local Ray), and the resources it offers."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

from .config import RayConfig
from .errors import LifelogError

log = logging.getLogger(__name__)

# Every Ray worker of ours gets this environment, however Ray was started (CLI, job, Python API, tests):
# TensorFlow's C++ INFO lines and DeprecationWarnings stay out of the logs.
# Ray Train's controller polls its workers every 2 s by default: every fine-tuning run (and each run of the
# data-availability curve) then waits up to 2 s more to end; 0.5 s costs a cheap status call per worker.
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONWARNINGS": "ignore::DeprecationWarning",
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


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
            try:
                ray.init(address=address, **kwargs)
            except Exception as e:  # noqa: BLE001 - only a refused token is the user's to fix; the rest re-raised
                if not is_auth_error(e):
                    raise
                raise LifelogError(
                    f"Ray at {address} refused this machine: it runs with token authentication and this machine "
                    f"has no token for it, or another one. Put the cluster's token (on its head: "
                    f"`ray get-auth-token`) in ~/.ray/auth_token or RAY_AUTH_TOKEN, and set RAY_AUTH_MODE=token"
                ) from None
        else:
            ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                     **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress_bars


def is_auth_error(e: BaseException) -> bool:
    """Ray refused the connection for its auth token (Ray's AuthenticationError, or its message in another)."""
    from ray.exceptions import AuthenticationError

    text = str(e).lower()
    return isinstance(e, AuthenticationError) or "authentication token" in text or "unauthenticated" in text


def cluster_resources() -> tuple[float, float]:
    """(CPUs, GPUs) the cluster has now."""
    import ray

    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))
