"""Where a stage runs, decided in one place: GPU or CPU, how many model actors, what to ask the autoscaler for.

The decision comes from the config and from what the cluster *can become*, not only from the nodes that
are up when a job starts. On an autoscaling cluster (cluster.yaml: a head with no CPU, GPU and CPU
workers from zero) the job starts on the head alone. The worker node types come from the autoscaler's
own configuration:
1. the cluster config in the GCS, which KubeRay and autoscaler v2 publish;
2. else the YAML of the autoscaler that serves this cluster, read on the head. A v1 monitor
   (`ray up cluster.yaml`, `ray start --head --autoscaling-config=...`) publishes nothing, so the
   reader finds that monitor by its GCS address and opens its `--autoscaling-config` file.
With neither, the cluster is fixed (a laptop, a plain `ray start` cluster) and what is up is all there is.

`provision` asks the autoscaler for the planned actors (and a CPU for their data tasks) up front, waits
(bounded) for the first of them, and withdraws the ask when the stage ends; `reserve` does the same for a
Ray Train run's workers. `AutoscalerLog` copies the autoscaler's events into the stage log meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import LifelogError

log = logging.getLogger(__name__)

MONITORS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")


@dataclass(frozen=True)
class NodeType:
    """A worker node type of the autoscaler: the resources of one node and how many it may start."""

    name: str
    resources: dict[str, float]
    min_workers: int
    max_workers: int


@dataclass(frozen=True)
class ClusterShape:
    """The nodes up now and, on an autoscaling cluster, the worker types the autoscaler can add."""

    nodes: tuple[dict[str, float], ...]  # total resources of each alive node (head included)
    node_types: tuple[NodeType, ...] = ()
    max_workers: int | None = None  # the autoscaler's cap on worker nodes
    source: str = ""  # where the node types were read

    @property
    def autoscaling(self) -> bool:
        return any(t.max_workers > 0 for t in self.node_types)

    @property
    def kind(self) -> str:
        return "autoscaling" if self.autoscaling else ("single-node" if len(self.nodes) <= 1 else "fixed")

    def now(self, resource: str) -> float:
        return sum(n.get(resource, 0.0) for n in self.nodes)

    def capacity(self, bundle: dict[str, float]) -> int:
        """How many ``bundle``s the cluster can hold at most, each on one node: the nodes up now, or the head
        plus every worker type at its max (within the autoscaler's cap) when it autoscales."""
        if not self.autoscaling:
            return sum(fits(n, bundle) for n in self.nodes)
        head = sum(fits(n, bundle) for n in self.nodes if n.get("node:__internal_head__"))
        per_type = sorted(((fits(t.resources, bundle), t.max_workers) for t in self.node_types), reverse=True)
        room, total = self.max_workers if self.max_workers is not None else math.inf, head
        for each, count in per_type:  # the cap bounds the nodes, so the roomiest types first
            take = int(min(count, room))
            total += each * take
            room -= take
        return total

    def capacity_now(self, bundle: dict[str, float]) -> int:
        return sum(fits(n, bundle) for n in self.nodes)

    def most(self, resource: str) -> float:
        """The most of ``resource`` the cluster can have."""
        return float(self.capacity({resource: 1.0})) if self.autoscaling else self.now(resource)

    def describe(self) -> str:
        up = f"{len(self.nodes)} node(s) up ({self.now('CPU'):g} CPU, {self.now('GPU'):g} GPU)"
        if not self.autoscaling:
            return f"{self.kind} cluster: {up}"
        types = ", ".join(f"{t.name} x{t.min_workers}-{t.max_workers} {_res(t.resources)}" for t in self.node_types)
        return f"autoscaling cluster: {up}; can add {types} (from {self.source})"


def fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many ``bundle``s one node of ``node``'s resources holds."""
    counts = [node.get(k, 0.0) / v for k, v in bundle.items() if v > 0]
    return int(min(counts) + 1e-9) if counts else 0


def _res(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU")) + "}"


# --- reading the cluster ---------------------------------------------------------------------------------

def node_types_from_config(config: dict) -> tuple[tuple[NodeType, ...], int | None]:
    """The worker types of an autoscaler YAML (cluster launcher format), and its `max_workers` cap."""
    head = config.get("head_node_type")
    out = []
    for name, t in (config.get("available_node_types") or {}).items():
        if name == head:
            continue
        res = {k: float(v) for k, v in (t.get("resources") or {}).items() if isinstance(v, (int, float))}
        if "CPU" not in res and "GPU" not in res:
            log.warning("cluster: node type %s declares no CPU/GPU resources in the autoscaler config; lifelog-ray "
                        "cannot plan for it (declare them, e.g. resources: {CPU: 8, GPU: 1})", name)
            continue
        out.append(NodeType(name, res, int(t.get("min_workers", 0)), int(t.get("max_workers", 0))))
    cap = config.get("max_workers")
    return tuple(out), (int(cap) if cap is not None else None)


def read_autoscaler_config(gcs_address: str) -> tuple[dict | None, str]:
    """The YAML of the autoscaler (monitor process) serving the cluster at ``gcs_address``, read from this
    machine's processes; (None, why) when none runs here or it has no config (a cluster without autoscaling)."""
    import yaml

    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if not any(m in a for a in args for m in MONITORS) or _flag(args, "--gcs-address") != gcs_address:
            continue
        path = _flag(args, "--autoscaling-config")
        if not path:
            return None, "the autoscaler has no config (a cluster without autoscaling)"
        path = os.path.expanduser(path)
        try:
            with open(path, encoding="utf-8") as f:
                return yaml.safe_load(f) or {}, f"autoscaler config {path} on the head"
        except (OSError, yaml.YAMLError) as e:
            return None, f"cannot read the autoscaler config {path}: {e}"
    return None, "no autoscaler of this cluster runs on this machine"


def _flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def _gcs_cluster_config() -> tuple[tuple[NodeType, ...], str] | None:
    """Node groups from the GCS's cluster config (KubeRay, autoscaler v2); None where nobody published one."""
    try:
        from ray._private.state import state

        cc = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it: fall back to the YAML
        return None
    if cc is None or not cc.node_group_configs:
        return None
    types = tuple(NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.min_count),
                           int(g.max_count) if g.max_count >= 0 else 10**6)
                  for g in cc.node_group_configs if g.resources)
    return types, "the GCS cluster config"


def discover() -> ClusterShape:
    """The shape of the Ray cluster this process is connected to (Ray must be initialised)."""
    import ray

    nodes = tuple({k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"])
    from_gcs = _gcs_cluster_config()
    if from_gcs is not None:
        return ClusterShape(nodes, from_gcs[0], None, from_gcs[1])
    gcs = ray.get_runtime_context().gcs_address
    config, why = read_autoscaler_config(gcs)
    if config is None and why.startswith("no autoscaler"):
        config, why = _read_on_head(gcs) or (None, why)  # the driver is not on the head machine
    if config is None:
        log.info("cluster: %s; planning for the nodes that are up", why)
        return ClusterShape(nodes)
    types, cap = node_types_from_config(config)
    return ClusterShape(nodes, types, cap, why)


def _read_on_head(gcs: str) -> tuple[dict | None, str] | None:
    """read_autoscaler_config as a zero-CPU task pinned to the head node, for a driver elsewhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("node:__internal_head__")]
    if not head:
        return None
    task = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head[0], soft=False),
                      max_retries=0)(read_autoscaler_config)
    try:
        return ray.get(task.remote(gcs), timeout=60)
    except Exception as e:  # noqa: BLE001 - no answer: plan for what is up
        log.info("cluster: could not read the autoscaler config on the head (%s)", e)
        return None


# --- the plan ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActorPlan:
    """The model actors of a stage: their device, the pool's bounds, and one actor's resources."""

    device: str  # gpu | cpu
    min_actors: int
    max_actors: int
    bundle: dict[str, float]
    shape: ClusterShape
    why: str = ""

    @property
    def num_gpus(self) -> float:
        return self.bundle.get("GPU", 0.0)

    @property
    def num_cpus(self) -> float:
        return self.bundle.get("CPU", 0.0)

    def strategy(self, initial: int | None = None):
        """The Ray Data actor pool: fixed when min == max, else autoscaling from ``initial`` actors."""
        import ray.data

        if self.min_actors == self.max_actors:
            return ray.data.ActorPoolStrategy(size=self.max_actors)
        start = max(self.min_actors, min(self.max_actors, initial or self.min_actors))
        return ray.data.ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors, initial_size=start)

    def describe(self) -> str:
        n = str(self.max_actors) if self.min_actors == self.max_actors else f"{self.min_actors}-{self.max_actors}"
        return f"{n} {self.device.upper()} model actor(s) of {_res(self.bundle)} on the {self.shape.describe()}"


def plan_actors(device: str, num_actors: int | tuple[int, int] | None, cpus_per_actor: float,
                shape: ClusterShape, what: str = "extract") -> ActorPlan:
    """``device`` auto | gpu | cpu and ``num_actors`` (N, (min, max) or None: auto) -> the actor plan.

    auto: the GPU when the cluster has or can get one. Pool size by default: one actor per GPU the cluster
    can hold, else one per 2 CPUs (the other half decodes). A fixed cluster gets a fixed pool of that size;
    an autoscaling one a pool from 1 up to it, as nodes arrive.
    """
    gpu_bundle = {"GPU": 1.0, "CPU": cpus_per_actor}
    cpu_bundle = {"CPU": cpus_per_actor}
    gpu_room = shape.capacity(gpu_bundle)
    if device == "gpu" and gpu_room < 1:
        raise LifelogError(f"{what}.device gpu: the {shape.describe()} has no node with a GPU and {cpus_per_actor:g} "
                           f"CPU, now or after autoscaling; use --device cpu, or add GPU nodes")
    use_gpu = device == "gpu" or (device == "auto" and gpu_room >= 1)
    bundle = gpu_bundle if use_gpu else cpu_bundle
    room = gpu_room if use_gpu else shape.capacity(cpu_bundle)
    if room < 1:
        raise LifelogError(f"{what}: no node of the {shape.describe()} can hold a model actor of {_res(bundle)}; "
                           f"lower {what}.cpus_per_actor")
    if num_actors is None:
        hi = room if use_gpu else max(1, min(room, int(shape.most("CPU") // 2)))
        lo = 1 if shape.autoscaling else hi
    else:
        lo, hi = (num_actors, num_actors) if isinstance(num_actors, int) else num_actors
        if hi > room:
            raise LifelogError(f"{what}.num_actors {hi}: the {shape.describe()} can hold at most {room} model actor(s) "
                               f"of {_res(bundle)}; lower {what}.num_actors")
    why = "extract.device " + device + (f" (the cluster can hold {gpu_room} GPU actor(s))" if device == "auto" else "")
    return ActorPlan("gpu" if use_gpu else "cpu", lo, hi, bundle, shape, why)


def check_capacity(shape: ClusterShape, bundle: dict[str, float], count: int, what: str, spare_cpus: float = 0.0) -> None:
    """A one-line error, before any work, when ``count`` x ``bundle`` (plus ``spare_cpus`` elsewhere, e.g. for
    decoding) can never fit: judged on what the cluster can become, not on the nodes up now."""
    room = shape.capacity(bundle)
    if room < count:
        raise LifelogError(f"{what}: {count} worker(s) of {_res(bundle)} do not fit the {shape.describe()} "
                           f"(room for {room})")
    left = shape.most("CPU") - count * bundle.get("CPU", 0.0)
    if spare_cpus and left < spare_cpus:
        raise LifelogError(f"{what}: {count} worker(s) x {bundle.get('CPU', 0):g} CPU leave no CPU for decoding images "
                           f"on the {shape.describe()}; lower {what}.cpus_per_worker or {what}.workers")


# --- asking the autoscaler, and waiting ------------------------------------------------------------------

class Reservation:
    """One stage's standing ask to the autoscaler for ``bundles`` (its workers, and CPUs for its data pipeline).

    Ray keeps one resource request per cluster, and Ray Data's own requests share it through its autoscaling
    coordinator, which merges every requester's bundles and forwards the sum. A direct `request_resources`
    would overwrite Ray Data's and be overwritten by it, so the ask goes through that coordinator, renewed
    by a thread while the stage runs (it expires otherwise) and cancelled when it ends. Where the coordinator
    is missing (another Ray), `ray.autoscaler.sdk.request_resources` is used. Without an autoscaler: nothing.
    """

    RENEW_S = 15.0

    def __init__(self, bundles: list[dict[str, float]], what: str, shape: ClusterShape) -> None:
        self.bundles = [dict(b) for b in bundles]
        self.what, self.shape = what, shape
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log: AutoscalerLog | None = None

    def __enter__(self) -> Reservation:
        if not self.shape.autoscaling or not self.bundles:
            return self
        self._log = AutoscalerLog().__enter__()
        log.info("%s: asked the autoscaler for %s", self.what, describe_bundles(self.bundles))
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name=f"reserve-{self.what}", daemon=True)
        self._thread.start()
        ready.wait(30)
        return self

    def _run(self, ready: threading.Event) -> None:
        import uuid

        try:
            from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
                DefaultAutoscalingCoordinator,
            )

            coordinator = DefaultAutoscalingCoordinator(f"lifelog-ray:{self.what}:{uuid.uuid4().hex[:8]}")
        except Exception:  # noqa: BLE001 - a Ray without Ray Data's coordinator: the request API itself
            coordinator = None
        try:
            while True:
                if coordinator is not None:
                    coordinator.request_resources(self.bundles, expire_after_s=4 * self.RENEW_S)
                else:
                    from ray.autoscaler.sdk import request_resources

                    request_resources(bundles=self.bundles)
                ready.set()
                if self._stop.wait(self.RENEW_S):
                    break
        except Exception as e:  # noqa: BLE001 - the ask is help, not a need: Ray's demand still scales up
            log.info("%s: could not keep the request to the autoscaler (%s)", self.what, e)
        finally:
            ready.set()
            try:
                if coordinator is not None:
                    coordinator.cancel_request()
                else:
                    from ray.autoscaler.sdk import request_resources

                    request_resources(bundles=[])
            except Exception as e:  # noqa: BLE001
                log.info("%s: could not withdraw the request to the autoscaler (%s)", self.what, e)

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=30)
        if self._log is not None:
            self._log.__exit__()
        log.info("%s: withdrew the request to the autoscaler", self.what)


def describe_bundles(bundles: list[dict[str, float]]) -> str:
    counts: dict[str, int] = {}
    for b in bundles:
        counts[_res(b)] = counts.get(_res(b), 0) + 1
    return " + ".join(f"{n} x {k}" for k, n in counts.items())


DECODE_CPU = {"CPU": 1.0}  # one CPU's worth of data tasks (decode, read) beside a stage's workers


@dataclass
class Provisioned:
    """What provision() found: how many planned actors fit on the nodes up when the wait ended."""

    ready: int
    waited_s: float


@contextlib.contextmanager
def provision(plan: ActorPlan, wait_s: float, settle_s: float = 30.0) -> Iterator[Provisioned]:
    """On an autoscaling cluster: ask for ``plan.max_actors`` actor bundles and a CPU for the data tasks up
    front, wait until the nodes for ``plan.min_actors`` are up (at most ``wait_s``; a GPU plan fails after
    that), then up to ``settle_s`` more for the rest; the ask ends with the block. A fixed cluster: nothing
    to ask for."""
    if not plan.shape.autoscaling:
        yield Provisioned(plan.shape.capacity_now(plan.bundle), 0.0)
        return
    with Reservation([plan.bundle] * plan.max_actors + [DECODE_CPU], "model actors", plan.shape):
        yield wait_for_bundles(plan, wait_s, settle_s)


@contextlib.contextmanager
def reserve(bundles: list[dict[str, float]], what: str, shape: ClusterShape | None = None) -> Iterator[None]:
    """Ask the autoscaler for a Ray Train run's workers and a CPU for its data pipeline while the block runs:
    Ray Train's placement group asks for the workers, but the CPUs its datasets need beside them are asked
    for by no one (Ray Data runs inside what the workers leave, and on a cluster whose nodes are all taken
    by workers it waits forever)."""
    import ray

    shape = shape or (discover() if ray.is_initialized() else ClusterShape(()))
    with Reservation(list(bundles) + [DECODE_CPU], what, shape):
        yield


def wait_for_bundles(plan: ActorPlan, wait_s: float, settle_s: float) -> Provisioned:
    import ray

    t0 = time.monotonic()
    deadline, settled_by = t0 + wait_s, None
    while True:
        nodes = tuple({k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n["Alive"])
        ready = ClusterShape(nodes).capacity_now(plan.bundle)
        now = time.monotonic()
        if ready >= plan.min_actors and settled_by is None:
            settled_by = now + settle_s
            log.info("nodes for %d of %d model actor(s) up after %.0fs", ready, plan.max_actors, now - t0)
        if ready >= plan.max_actors or (settled_by is not None and now >= settled_by):
            return Provisioned(min(ready, plan.max_actors), now - t0)
        if now >= deadline:
            if ready >= plan.min_actors or plan.device == "cpu":
                return Provisioned(ready, now - t0)  # CPU actors: Ray Data waits for their nodes itself
            raise LifelogError(f"no GPU node came up within {wait_s:g}s (extract.gpu_wait_s) for {plan.describe()}; "
                               f"see `ray status` for the autoscaler's failures, raise extract.gpu_wait_s, or use "
                               f"--device cpu")
        time.sleep(1.0)


def _state_address() -> str | None:
    """The connected cluster's own dashboard (where Ray's state API is served), or None where it has none.

    Given a GCS address, Ray's state API asks the GCS for the dashboard and, when there is none (a local Ray
    started without one), goes to http://127.0.0.1:8265 anyway, with this cluster's auth token in the
    request: whatever listens there on this machine would get it. So the URL is the one the cluster itself
    recorded, and with none the state API is not asked at all."""
    try:
        from ray._private.worker import _global_node

        url = _global_node.webui_url if _global_node is not None else None
    except Exception:  # noqa: BLE001 - not connected
        return None
    return f"http://{url}" if url else None


class AutoscalerLog:
    """While a stage runs, the autoscaler's events (nodes added, removed, failures) go to the stage log,
    read through Ray's state API (the dashboard); silent where there is none."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self.seen: set[tuple[str, str]] = set()
        self.since = time.time() - 5
        self.events: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="autoscaler-log", daemon=True)

    def __enter__(self) -> AutoscalerLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        address = _state_address()
        if address is None:  # no dashboard: nothing to read, and nobody else is asked
            return
        try:
            from ray.util.state import list_cluster_events

            # oldest first, then cut at the limit: only the autoscaler's, and the dashboard's whole cache of them
            events = list_cluster_events(address, filters=[("source_type", "=", "AUTOSCALER")],
                                         detail=True, limit=10000, raise_on_missing_output=False, _explain=False)
        except Exception:  # noqa: BLE001 - no dashboard (a local Ray), or it is busy: nothing to copy
            return
        for e in events:
            e = e if isinstance(e, dict) else e.__dict__
            if e.get("source_type") != "AUTOSCALER":
                continue
            key = (str(e.get("time")), str(e.get("message")))
            if key in self.seen or _epoch(e.get("time")) < self.since:
                continue
            self.seen.add(key)
            self.events.append(str(e.get("message")))
            log.info("autoscaler: %s", e.get("message"))


def _epoch(t: Any) -> float:
    from datetime import datetime

    try:
        return datetime.strptime(str(t), "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return time.time()


# --- where the work ran --------------------------------------------------------------------------------

@dataclass
class Where:
    """Where a stage's model actors ran, from Ray's state API."""

    actors: int = 0
    nodes: int = 0
    gpu_nodes: int = 0

    def phrase(self, device: str, decode: str | None = None) -> str:
        """`2 model actors on 2 GPU nodes, decode gpu`."""
        if not self.actors:
            return ""
        kind = "GPU " if device == "gpu" and self.gpu_nodes == self.nodes else ("CPU " if device == "cpu" else "")
        text = f"{_count(self.actors, 'model actor')} on {_count(self.nodes, kind + 'node')}"
        return text + (f", decode {decode}" if decode else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


class ActorWatch:
    """Where a stage's model actors (of ``class_name``) ran: the ones this job starts after the watch is made,
    and their nodes, from Ray's state API. ``where()`` is None where there is no state API (a local Ray
    without a dashboard)."""

    def __init__(self, class_name: str) -> None:
        self.class_name = class_name
        self.before = {a.actor_id for a in self._actors() or []}

    def _actors(self) -> list | None:
        import ray

        address = _state_address()
        if address is None:  # no dashboard: where actors ran is not reported
            return None
        try:
            from ray.util.state import list_actors

            job = ray.get_runtime_context().get_job_id()
            return [a for a in list_actors(address, filters=[("job_id", "=", job)], detail=True,
                                           limit=10000, raise_on_missing_output=False, timeout=10)
                    if self.class_name in (a.class_name or "")]
        except Exception:  # noqa: BLE001 - no dashboard, or it did not answer
            return None

    def where(self) -> Where | None:
        actors = self._actors()
        if actors is None:
            return None
        try:
            from ray.util.state import list_nodes

            nodes = {n.node_id: n for n in list_nodes(_state_address(), detail=True, limit=10000,
                                                      raise_on_missing_output=False, timeout=10)}
        except Exception:  # noqa: BLE001
            return None
        mine = [a for a in actors if a.actor_id not in self.before]
        used = {a.node_id for a in mine if a.node_id}
        gpu = sum(1 for nid in used if (getattr(nodes.get(nid), "resources_total", None) or {}).get("GPU", 0) > 0)
        return Where(len(mine), len(used), gpu)


__all__ = ["ClusterShape", "NodeType", "ActorPlan", "discover", "plan_actors", "check_capacity", "provision",
           "reserve", "Reservation",
           "AutoscalerLog", "ActorWatch", "Where", "read_autoscaler_config", "node_types_from_config", "fits"]
