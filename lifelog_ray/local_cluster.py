"""A Ray cluster on this machine shaped like a cluster.yaml, for tests and benchmarks: Ray's own autoscaler.

`LocalCluster` reads a cluster launcher YAML's `available_node_types` (names, min/max workers, which
types have GPUs) and starts a head with Ray's autoscaler on the `fake_multinode` provider. The
autoscaler then starts and stops real raylets on this machine, one per worker node it launches,
exactly as it would launch EC2 instances. Each node is scaled down to the machine: `cpus_per_node`
CPUs (1), and 1 GPU for a type that declares GPUs. Ray schedules on that GPU, but TensorFlow and JAX
still compute on the CPU. Placement, scaling and scheduling are the real autoscaler's.

Ray 2.60's wheel does not ship the example YAML that `ray.cluster_utils.AutoscalingCluster` reads,
and that helper runs `ray stop --force`, which ends every Ray on the machine. This one writes its
own config. It keeps everything it starts under its own temp folder (`RAY_TMPDIR`), with its own
ports, and stops only processes that name that folder or its GCS address, plus their children. The
head node type is always called `ray.head.default`, because the provider names the head that way.
The provider is Ray's fake one with two changes (`LocalNodeProvider`): a node it launched is marked up
to date, as a cloud's node updater marks it, so that the autoscaler replaces a lost node; and each node
unpacks runtime environments in a folder of its own, as separate machines do.
Token auth is on (`RAY_AUTH_MODE=token`, `~/.ray/auth_token`), as on the cloud cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import LifelogError

FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's name for the head; the YAML's head type maps onto it
REPO_CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    """The address Ray gives this machine's nodes (the one `ray start` picks)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(name)] = (ppid, cmd)
    return out


def descendants(roots: set[int], table: dict[int, tuple[int, str]] | None = None) -> set[int]:
    """``roots`` and every process below them."""
    table = table if table is not None else _processes()
    found, todo = set(roots), list(roots)
    while todo:
        parent = todo.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in found:
                found.add(pid)
                todo.append(pid)
    return found


def kill_one_below(root: int, title: str) -> int | None:
    """SIGKILL one process below ``root`` whose command line holds ``title`` (Ray titles an actor's process by its
    class, e.g. "ray::MapWorker(MapBatches(FeatureExtractor))"): its pid, or None when none is alive. Only
    ``root``'s own: another Ray on the machine (another test worker's, another user's) is never touched."""
    table = _processes()
    for pid in sorted(descendants({root}, table) - {root}):
        if title in table[pid][1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                return pid
    return None


def stop_ray_under(root: Path | str, gcs_address: str | None = None) -> int:
    """Stop the Ray processes started with ``RAY_TMPDIR=root`` (they name it in their command lines) or
    for the GCS at ``gcs_address``, and their children; nothing else. Not `ray stop`, which ends every Ray
    on the machine. Returns how many processes it stopped."""
    table = _processes()
    marks = (str(root),) + ((gcs_address,) if gcs_address else ())
    roots = {pid for pid, (_, cmd) in table.items() if pid != os.getpid() and any(m in cmd for m in marks)}
    pids = descendants(roots, table)
    kill_processes(pids)
    return len(pids)


def kill_tree(pid: int) -> int:
    """SIGKILL a process and every process below it at once: a machine going away. A local Ray's workers leave
    their driver's process group, so killing the group alone lets them run on for a moment (and finish a task).
    The tree is stopped first (SIGSTOP), so nothing in it starts a process while it is being killed. Returns how
    many processes were killed."""
    found: set[int] = set()
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        found |= descendants({pid} | found)
        for p in sorted(found):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
    return len(found)


def kill_processes(pids: set[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if sig == signal.SIGTERM:
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _provider_class():
    """Ray's fake multi-node provider, with two things real machines have:

    - a node it launched is marked up to date, as a cloud's node updater marks it. The fake one leaves every
      worker `uninitialized`, and the autoscaler then never replaces a lost node (it only terminates
      up-to-date nodes that stop sending heartbeats);
    - each node unpacks runtime environments (a job's working_dir) in a folder of its own. The fake nodes
      share one session folder, so a node that garbage-collected a job's package (when it goes idle)
      deleted it under every other node, the head's job driver included.
    """
    import copy
    import json

    import ray
    import ray._private.ray_constants as ray_constants
    from ray._common.network_utils import build_address
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler.tags import (
        NODE_KIND_WORKER,
        STATUS_UP_TO_DATE,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )

    class LocalNodeProvider(FakeMultiNodeProvider):
        def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
            # FakeMultiNodeProvider's, with the node's own runtime_env folder and its status up to date
            resources = copy.deepcopy(resources)
            with self.lock:
                node_type = tags[TAG_RAY_USER_NODE_TYPE]
                next_id = self._next_hex_node_id()
                gcs = self._gcs_address or build_address(ray._private.services.get_node_ip_address(), 6379)
                ray_params = ray._private.parameter.RayParams(
                    min_worker_port=0, max_worker_port=0, dashboard_port=None, dashboard_agent_listen_port=0,
                    num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0),
                    object_store_memory=resources.pop("object_store_memory", None), resources=resources,
                    labels=labels, redis_address=gcs, gcs_address=gcs,
                    runtime_env_dir_name=f"runtime_resources_{next_id[-5:]}",
                    env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": next_id, "RAY_CLOUD_INSTANCE_ID": next_id,
                              "RAY_NODE_TYPE_NAME": node_type,
                              ray_constants.RESOURCES_ENVIRONMENT_VARIABLE: json.dumps(resources),
                              ray_constants.LABELS_ENVIRONMENT_VARIABLE: json.dumps(labels)})
                node = ray._private.node.Node(ray_params, head=False, shutdown_at_exit=False, spawn_reaper=False)
                all_tags = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: node_type,
                            TAG_RAY_NODE_NAME: next_id}
                all_tags.update(tags)
                all_tags[TAG_RAY_NODE_STATUS] = STATUS_UP_TO_DATE  # the raylet runs: Ray is set up on the node
                self._nodes[next_id] = {"tags": all_tags, "node": node}

        def set_node_tags(self, node_id, tags):
            with self.lock:
                self._nodes[node_id]["tags"].update(tags)

    return LocalNodeProvider


def __getattr__(name: str):
    # `provider: {type: external, module: lifelog_ray.local_cluster.LocalNodeProvider}`: built on first use,
    # so importing this module does not import Ray's autoscaler.
    if name == "LocalNodeProvider":
        return _provider_class()
    raise AttributeError(name)


@dataclass(frozen=True)
class NodeTypeSpec:
    """One worker node type of a cluster YAML, as the local cluster scales it down."""

    name: str
    min_workers: int
    max_workers: int
    gpus: int  # GPUs per node in the YAML (the local node gets 1 when this is > 0)


def node_types_of(cluster_yaml: dict) -> list[NodeTypeSpec]:
    """The worker node types of a launcher config; a type must declare its CPU (and GPU) resources."""
    head = cluster_yaml.get("head_node_type")
    out = []
    for name, t in (cluster_yaml.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = t.get("resources") or {}
        if "CPU" not in res:
            raise LifelogError(f"cluster config: node type {name} declares no resources (CPU, GPU); declare them, "
                               f"e.g. resources: {{CPU: 8, GPU: 1}}, so the autoscaler and lifelog-ray know its shape")
        out.append(NodeTypeSpec(name, int(t.get("min_workers", 0)), int(t.get("max_workers", 0)), int(res.get("GPU", 0))))
    return out


@dataclass
class LocalCluster:
    """A local autoscaling Ray cluster built from a cluster launcher YAML (default: this repository's).

    ``max_workers`` caps a node type's count (this machine cannot hold cluster.yaml's 8 GPU nodes);
    ``min_workers`` overrides a type's minimum; ``idle_timeout_s`` is how long an idle worker lives.
    Use as a context manager, or call start() and stop().
    """

    cluster_yaml: Path = REPO_CLUSTER_YAML
    cpus_per_node: int = 1
    max_workers: dict[str, int] = field(default_factory=dict)
    min_workers: dict[str, int] = field(default_factory=dict)
    idle_timeout_s: float = 30.0
    heartbeat_timeout_s: int = 15  # how long a silent worker lives before the autoscaler replaces it
    object_store_mb: int = 400
    env: dict[str, str] = field(default_factory=dict)  # more environment for the head (and so every node)

    def __post_init__(self) -> None:
        self.source = yaml.safe_load(Path(self.cluster_yaml).read_text())
        self.types = node_types_of(self.source)
        self.root: Path | None = None
        self.gcs_port = self.dashboard_port = 0
        self.ip = ""

    # --- the config ----------------------------------------------------------------------------------

    def autoscaling_config(self) -> dict[str, Any]:
        """The fake-provider config: the YAML's worker types at this machine's scale."""
        store = self.object_store_mb * 1024 * 1024
        types: dict[str, Any] = {FAKE_HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
        total = 0
        for t in self.types:
            hi = self.max_workers.get(t.name, t.max_workers)
            lo = min(self.min_workers.get(t.name, t.min_workers), hi)
            res: dict[str, Any] = {"CPU": self.cpus_per_node, "object_store_memory": store}
            if t.gpus:
                res["GPU"] = 1
            types[t.name] = {"resources": res, "node_config": {}, "min_workers": lo, "max_workers": hi}
            total += hi
        return {
            "cluster_name": f"local-{self.source.get('cluster_name', 'cluster')}",
            "max_workers": total,
            "upscaling_speed": float(self.source.get("upscaling_speed", 1.0)),
            "idle_timeout_minutes": self.idle_timeout_s / 60,
            "docker": {},
            "provider": {"type": "external", "module": "lifelog_ray.local_cluster.LocalNodeProvider",
                         "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": f"{self.ip}:{self.gcs_port}"},
            "auth": {"ssh_user": "ubuntu"},
            "available_node_types": types,
            "head_node_type": FAKE_HEAD_TYPE,
            **{k: [] for k in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
            "file_mounts": {},
            "file_mounts_sync_continuously": False,
        }

    # --- lifecycle -----------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS address (`ray.init(address=...)`, `RAY_ADDRESS` for a driver)."""
        return f"{self.ip}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and the Jobs API (`ray job submit --address ...`)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def process_env(self) -> dict[str, str]:
        """The environment for a process that talks to this cluster (a driver, `ray job submit`)."""
        assert self.root is not None, "start() the cluster first"
        return {**os.environ, "RAY_TMPDIR": str(self.root), "RAY_AUTH_MODE": "token", "RAY_ADDRESS": self.address}

    def start(self, timeout_s: float = 180.0) -> LocalCluster:
        # A short folder: Ray's unix socket paths live under it and must stay under ~100 characters.
        self.root = Path(tempfile.mkdtemp(prefix="llr-", dir="/tmp"))
        atexit.register(self.stop)  # a test run that dies still stops its cluster
        self.ip = node_ip()
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        config = self.root / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(self.autoscaling_config(), sort_keys=False))
        env = {**self.process_env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(self.heartbeat_timeout_s),
               # a killed node is declared dead after ~3 s rather than ~30 s
               "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
               **self.env}
        env.pop("RAY_ADDRESS")
        ray_bin = str(Path(sys.executable).parent / "ray")
        ensure_token(ray_bin, env)
        cmd = [ray_bin, "start", "--head", "--num-cpus=0", "--num-gpus=0", f"--port={self.gcs_port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
               f"--autoscaling-config={config}", "--disable-usage-stats"]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise LifelogError(f"local cluster: `ray start --head` did not finish in {timeout_s:g}s") from None
        if done.returncode != 0:
            self.stop()
            raise LifelogError(f"local cluster: `ray start --head` failed: {done.stderr[-2000:]}")
        floor = 1 + sum(min(self.min_workers.get(t.name, t.min_workers), self.max_workers.get(t.name, t.max_workers))
                        for t in self.types)
        try:
            self.wait_for(lambda: len(self.nodes()) >= floor, timeout_s, "the head and the min_workers nodes")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process of this cluster (the head's, the nodes the autoscaler started, their workers)."""
        if self.root is None:
            return
        stop_ray_under(self.root, f"{self.ip}:{self.gcs_port}")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- looking at it -------------------------------------------------------------------------------

    def api(self, path: str) -> dict:
        """GET a dashboard endpoint (the state API, cluster status) with the cluster's token: no Ray client in
        this process, whose own Ray (a test's) may run with other settings."""
        import urllib.request

        token = os.environ.get("RAY_AUTH_TOKEN") or (Path.home() / ".ray" / "auth_token").read_text().strip()
        req = urllib.request.Request(self.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def nodes(self, alive: bool = True) -> list[dict]:
        """The cluster's nodes (only the alive ones by default): node_id, node_type, resources, head, alive."""
        types = self.node_types()
        rows = self.api("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
        out = []
        for n in rows:
            live = n["state"] == "ALIVE"
            if alive and not live:
                continue
            out.append({"node_id": n["node_id"], "alive": live, "head": bool(n["is_head_node"]),
                        "resources": n.get("resources_total") or {},
                        "node_type": FAKE_HEAD_TYPE if n["is_head_node"] else types.get(n["node_id"], "?")})
        return out

    def node_types(self) -> dict[str, str]:
        """node id -> node type, as the autoscaler's provider names them (fake node ids are their IPs)."""
        status = self.api("/api/cluster_status")["data"].get("clusterStatus") or {}
        report = status.get("autoscalerReport") or status.get("autoscaler_report") or {}
        return dict(report.get("nodeTypeMapping") or report.get("node_type_mapping") or {})

    def workers_of(self, node_type: str) -> list[dict]:
        return [n for n in self.nodes() if n["node_type"] == node_type]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.5) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except Exception as e:  # noqa: BLE001 - the GCS may not answer yet while starting
                last = e
            time.sleep(every_s)
        raise TimeoutError(f"local cluster: waited {timeout_s:g}s for {what}" + (f" (last error: {last})" if last else ""))

    def node_processes(self, node_id: str) -> set[int]:
        """The processes of one worker node: its raylet and log monitor (found by the node id the provider
        gave it) and everything below them (agents, workers)."""
        table = _processes()
        roots = {pid for pid, (_, cmd) in table.items()
                 if ("raylet/raylet" in cmd or "log_monitor.py" in cmd) and _env_has(pid, node_id)}
        return descendants(roots, table)

    def kill_node(self, node_id: str) -> int:
        """Kill one worker node's processes at once (SIGKILL), as when a machine is lost; returns how many."""
        pids = self.node_processes(node_id)
        if not pids:
            raise LifelogError(f"local cluster: no processes for node {node_id}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)


def ensure_token(ray_bin: str, env: dict[str, str]) -> None:
    """The shared secret of token auth: ~/.ray/auth_token, made as cluster.yaml says (`ray get-auth-token
    --generate`) when neither it nor RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH exists. An existing token is kept."""
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists():
        return
    subprocess.run([ray_bin, "get-auth-token", "--generate"], env=env, capture_output=True, check=True, timeout=60)


def _env_has(pid: int, node_id: str) -> bool:
    """Whether a process was started for the fake node ``node_id`` (the provider sets it in the environment)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in f.read()
    except OSError:
        return False


__all__ = ["LocalCluster", "NodeTypeSpec", "node_types_of", "free_port", "kill_processes", "descendants", "kill_one_below",
           "stop_ray_under"]
