"""Feature extraction: manifest -> decode tasks -> VGG actor pool (one pass, all taps) -> Parquet shards.

Layout under STUDY/features/<model>/:
  <layer>/<YYYY-MM>/<unit>.parquet   rows: image_id, label, split, day, features (FixedSizeList<f32>); one file
                                     per completed unit and layer, so a plain reader of the folder sees whole
                                     units only
  _staging/<run>/<layer>/...         the writers' parts of units still in flight (outside the layer folders)
  _units/<unit>.json                 written last: marks a unit (<= unit_size images of one day) done, lists
                                     its published file and its rejects
  _extract.json                      what the features are (model, weights, size, precision, layers)
A run holds the lease STUDY/_leases/extract-<model>.json. On start it deletes what a dead run left: its
staging and any published file no marker lists; then it skips done units and extracts only new images.
A unit is published by a Ray task on the node whose writer wrote its last part (staged parts -> one file per
layer, then the marker): the driver plans units, counts the writers' rows and starts those tasks; it never
reads or writes feature bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from . import placement, progress, storage
from .backbones import BackboneSpec, FeatureExtractor, actor_env, resolve_weights, tap_widths
from .config import ExtractConfig, StudyConfig, write_resolved
from .errors import LifelogError
from .images import decoded_images, read_images
from .lease import Lease, check_token, holding, stage_lease
from .placement import ActorPlan
from .rejects import normalize_rejects, read_rejects, replace_stage_rejects

log = logging.getLogger(__name__)


def _hash(ids: list[str], n: int = 10) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:n]


def month_of(day: str) -> str:
    return day[:7] if len(day) >= 7 and day[4] == "-" else "unknown"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


class ShardWriter:
    """Writer stage: one staged Parquet part per (unit, layer) in the batch; returns a small summary per unit.

    Parts go to this run's staging folder, outside the layer folders: a unit is published (one file per layer,
    by `publish_unit` on this writer's node) once all of its rows are written, so readers of a layer never see
    part of a unit.
    """

    def __init__(self, staging: Path, layers: list[str], dtype: str = "float32") -> None:
        self.staging = staging  # a Path, or a UPath (S3/GCS) that carries its filesystem options
        self.layers = layers
        self.dtype = np.dtype(dtype)  # extract.store_dtype
        self.node = _node_id()  # where this unit's publishing task is sent (the parts are local to it)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        before = storage.retry_counts()
        units = np.asarray(batch["unit"])
        ok = np.asarray(batch["error"]) == ""
        out: dict[str, list] = {"unit": [], "part": [], "n_ok": [], "rejects": [], "node": []}
        for unit in np.unique(units):
            sel = units == unit
            good = sel & ok
            ids = [str(x) for x in batch["image_id"][good]]
            part = f"{unit}_p{_hash(ids, 8)}" if ids else ""
            if ids:
                for layer in self.layers:
                    feats = np.ascontiguousarray(batch[f"feat__{layer}"][good], dtype=self.dtype)
                    table = pa.table(
                        {
                            "image_id": pa.array(ids, pa.string()),
                            "label": pa.array([str(x) for x in batch["label"][good]], pa.string()),
                            "split": pa.array([str(x) for x in batch["split"][good]], pa.string()),
                            "day": pa.array([str(x) for x in batch["day"][good]], pa.string()),
                            "features": pa.FixedSizeListArray.from_arrays(feats.reshape(-1), feats.shape[1]),
                        }
                    )
                    storage.write_table_atomic(table, self.staging / layer / f"{part}.parquet")
            bad = sel & ~ok
            rej = [
                {"image_id": str(i), "path": str(p), "reason": str(r), "detail": str(d)}
                for i, p, r, d in zip(
                    batch["image_id"][bad], batch["path"][bad], batch["error"][bad], batch["error_detail"][bad]
                )
            ]
            out["unit"].append(str(unit))
            out["part"].append(part)
            out["n_ok"].append(len(ids))
            out["rejects"].append(json.dumps(rej))
            out["node"].append(self.node)
        # this batch's object-store retries: its reads' (carried from the decode tasks) and these writes'
        carried = {f"retried_{k}": [int(np.asarray(batch[f"retried_{k}"]).sum())] + [0] * (len(out["unit"]) - 1)
                   for k in storage.RETRY_LAYERS if f"retried_{k}" in batch}
        return {**{k: np.asarray(v) for k, v in out.items()},
                **storage.retry_columns(len(out["unit"]), before, carried)}


@dataclass
class ExtractSummary:
    model: str
    output: Path
    processed: int
    rejected: int
    skipped: int
    seconds: float
    first_output_s: float = 0.0  # time to the first written unit part: actor start-up and model build
    first_output_rows: int = 0
    placement: str = ""  # where the model actors ran: `2 model actors on 2 GPU nodes, decode gpu`
    pool_s: float = 0.0  # time to the nodes for the pool's first actors (an autoscaling cluster's wait)
    pool: int = 0  # model actors the pool started with
    retried: dict[str, int] = field(default_factory=dict)  # object-store retries of the run, per layer

    @property
    def images_per_s(self) -> float:
        return (self.processed + self.rejected) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"extract {self.model}: {self.processed} images processed, {self.rejected} rejected, "
            f"{self.skipped} already done, {self.images_per_s:.1f} images/s -> {self.output}"
            + (f" ({self.placement})" if self.placement else "")
            + (f"; {storage.describe_retries(self.retried)}" if sum(self.retried.values()) else "")
        )


class UnitLedger:
    """The completion markers of one model's features: what is done, and what is not."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.units_dir = model_dir / "_units"

    def markers(self) -> list[dict]:
        storage.forget(self.units_dir)  # markers are written by Ray tasks and by other runs, not this process
        if not self.units_dir.exists():
            return []
        files = list(storage.files(self.units_dir, (".json",)))
        return [json.loads(b) for b in storage.read_many(files)]

    def done_ids(self) -> set[str]:
        return {i for m in self.markers() for i in m["image_ids"]}

    @property
    def staging(self) -> Path:
        return self.model_dir / "_staging"

    def remove_orphans(self, layers: list[str]) -> int:
        """Delete what a dead run left behind: its staging, and published files that no marker lists (a run
        that died between publishing a unit and writing its marker). Only the lease holder calls this."""
        storage.forget(self.model_dir)  # written by other processes: writers, publishing tasks, the dead run
        storage.rmtree(self.staging)
        listed = {p for m in self.markers() for p in m["parts"]}
        removed = 0
        for layer in layers:
            for f in storage.files(self.model_dir / layer, (".parquet",)):
                if f.stem not in listed:
                    storage.unlink(f)
                    removed += 1
        return removed

    def publish(self, unit: str, day: str, parts: list[str], layers: list[str], staging: Path) -> list[str]:
        """A completed unit's staged parts become one file per layer, <layer>/<YYYY-MM>/<unit>.parquet, each
        appearing whole (a rename or one PUT); returns its image ids. Safe to run again after a crash part-way:
        a layer whose file exists is done (it appeared whole) and only its leftover parts are deleted."""
        parts = list(dict.fromkeys(p for p in parts if p))
        if not parts:  # every image of the unit was rejected
            return []
        ids: list[str] = []
        for layer in layers:
            staged = [staging / layer / f"{p}.parquet" for p in parts]
            target = self.model_dir / layer / month_of(day) / f"{unit}.parquet"
            if not target.exists():
                if len(staged) == 1:
                    storage.move(staged[0], target)
                else:
                    table = pa.concat_tables([storage.read_table(f) for f in staged])
                    storage.write_table_atomic(table.sort_by("image_id"), target)
            for f in staged:
                storage.unlink(f)
            if not ids:
                ids = storage.read_table(target, ["image_id"]).column("image_id").to_pylist()
        return ids

    def complete(self, unit: str, day: str, image_ids: list[str], parts: list[str], rejects: list[dict]) -> None:
        marker = {"unit": unit, "day": day, "image_ids": image_ids, "parts": sorted(parts),
                  "rejects": rejects, "finished": time.time()}
        storage.write_text_atomic(json.dumps(marker), self.units_dir / f"{unit}.json")

    def rejects(self) -> pd.DataFrame:
        rows = [dict(r) for m in self.markers() for r in m["rejects"]]
        return normalize_rejects(pd.DataFrame(rows))


def publish_unit(model_dir: Path, unit: str, day: str, parts: list[str], layers: list[str], staging: Path,
                 rejects: list[dict], lease_file: Path | None = None, token: str = "") -> dict[str, int]:
    """Publish one complete unit (its files, then its marker) and return the object-store retries it took.
    Runs as a Ray task on the node of the unit's writer; before the marker, the one write that makes the unit
    visible to a rerun, it checks that the run still holds its lease."""
    before = storage.retry_counts()
    ledger = UnitLedger(model_dir)
    ok = ledger.publish(unit, day, parts, layers, staging)
    if lease_file is not None:
        check_token(lease_file, token, f"extract {model_dir.name}")
    ids = sorted([*ok, *(str(r["image_id"]) for r in rejects)])
    ledger.complete(unit, day, ids, [unit] if ok else [], rejects)
    return storage.retried_since(before)


WRITER_CPUS = 0.25  # a ShardWriter's ask (it encodes Parquet), and a publishing task's where no publisher is left
PUBLISH_THREADS = 4  # units a node's publisher moves at once: file I/O, which releases the GIL


class UnitPublisher:
    """A writer node's publisher for one run (a Ray actor asking no CPU, a few threads): it runs `publish_unit`
    for the units whose last part that node wrote. One long-lived process per node, where a task per unit
    would often wait for a fresh worker process (Ray ends idle workers beyond a node's CPU count)."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._reported = storage.retry_counts()

    def publish(self, *args: Any) -> dict[str, int]:
        publish_unit(*args)
        with self._lock:  # threads overlap: each call reports the process's retries not reported before
            now = storage.retry_counts()
            delta = {k: now[k] - self._reported.get(k, 0) for k in storage.RETRY_LAYERS}
            self._reported = now
        return delta


def plan_units(pending: pd.DataFrame, unit_size: int) -> pd.DataFrame:
    """Group pending images into units: <= unit_size images of one day, named by day and content."""
    pending = pending.sort_values(["day", "image_id"]).reset_index(drop=True)
    units = np.empty(len(pending), dtype=object)
    for _day, idx in pending.groupby("day", sort=True).groups.items():
        idx = np.asarray(idx)
        for start in range(0, len(idx), unit_size):
            chunk = idx[start : start + unit_size]
            ids = pending.loc[chunk, "image_id"].tolist()
            units[chunk] = f"{pending.loc[chunk[0], 'day']}_{_hash(ids)}"
    pending["unit"] = units
    return pending


def _check_signature(model_dir: Path, spec: BackboneSpec, backend: str, store_dtype: str = "float32") -> dict:
    """Refuse features made another way; returns the study's signature (written here on the first run).
    A study from before backends and GPU decode was extracted on TensorFlow with CPU decode, and stored float32."""
    sig_path = model_dir / "_extract.json"
    sig = {"model": spec.model, "weights": spec.weights, "image_size": spec.image_size, "seed": spec.seed,
           "precision": spec.precision, "backend": backend, "store_dtype": store_dtype}
    if sig_path.exists():
        old = json.loads(sig_path.read_text("utf-8"))
        if "backend" not in old:
            old.setdefault("decode", "cpu")
        recorded = {**old, "backend": old.get("backend", "tensorflow"), "store_dtype": old.get("store_dtype", "float32")}
        mine = {k: recorded.get(k) for k in sig}
        if mine != sig or not set(spec.layers) <= set(recorded.get("layers", [])):
            raise LifelogError(
                f"{model_dir} holds features made with {mine} layers={recorded.get('layers', [])}; this run asks for "
                f"{sig} layers={list(spec.layers)}. Use --overwrite to start over, or another study directory"
            )
        return recorded
    model_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(json.dumps({**sig, "layers": list(spec.layers)}, indent=1), sig_path)
    return {**sig, "layers": list(spec.layers)}


def _gpu_decode_usable(timeout_s: float = 120.0) -> tuple[bool, str]:
    """Ask a GPU node, not the driver (a CPU-only head is the normal case), whether it can decode on its GPU.
    The probe is itself a GPU task: on an autoscaling cluster it waits for a GPU node still starting."""
    import ray

    from .gpu_decode import probe

    try:
        return ray.get(ray.remote(num_gpus=1, num_cpus=0)(probe).remote(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        return False, f"no GPU node answered within {timeout_s:g}s"


def check_decode(requested: str, recorded: str | None, device: str) -> None:
    """A one-line error, before any Ray work or waiting, when GPU decode is asked for (or recorded by the
    study) but the model actors will run on CPUs (``device``, from the placement plan)."""
    if device == "gpu" or not (requested == "gpu" or (requested == "auto" and recorded == "gpu")):
        return
    raise LifelogError("extract.decode gpu: the model actors run on CPUs (the Ray cluster has no GPU and its autoscaler "
                       "cannot add one, or extract.device is cpu), and decoding happens on their GPUs; use --decode "
                       "cpu, or run on a cluster with GPU nodes")


def resolve_decode(requested: str, recorded: str | None, device: str, wait_s: float = 120.0) -> tuple[str, str]:
    """(cpu | gpu, why) for this run: ``requested`` (cpu | gpu | auto), the study's ``recorded`` decode (None for
    a new study) and where the model actors run (``device``). A one-line error when it cannot be had."""
    if requested == "auto" and recorded == "cpu":
        return "cpu", "the study was decoded on CPUs"  # its features would differ slightly otherwise
    if requested == "cpu":
        return "cpu", "extract.decode cpu"
    check_decode(requested, recorded, device)
    if device != "gpu":
        return "cpu", "the model actors run on CPUs"
    ok, why = _gpu_decode_usable(wait_s)
    if ok:
        return "gpu", f"a GPU node decodes with {why}"
    if requested == "gpu" or recorded == "gpu":
        raise LifelogError(f"extract.decode gpu: the GPU nodes cannot decode JPEGs ({why}); install the gpu or "
                           f"gpu-jax extra there (nvImageCodec), or use --decode cpu")
    log.info("decode auto: the GPU decoder is not usable (%s); decoding on CPUs", why)
    return "cpu", f"the GPU nodes cannot decode JPEGs: {why}"


def settle_decode(model_dir: Path, signature: dict, requested: str, device: str, wait_s: float = 120.0) -> str:
    """The run's decode path, recorded in _extract.json on first use (with why); a run that would mix is refused."""
    recorded = signature.get("decode")
    decode, why = resolve_decode(requested, recorded, device, wait_s)
    if recorded is not None and decode != recorded:
        raise LifelogError(f"{model_dir} holds features decoded on the {recorded.upper()}; this run would decode on "
                           f"the {decode.upper()}. Use --decode {recorded}, --overwrite, or another study directory")
    if recorded is None:
        storage.write_text_atomic(json.dumps({**signature, "decode": decode, "decode_why": why}, indent=1),
                                  model_dir / "_extract.json")
    return decode


def spec_for(cfg: StudyConfig, model: str) -> BackboneSpec:
    e = cfg.extract
    return BackboneSpec(model, tuple(e.layers), e.weights, e.image_size, e.seed, e.precision)


def model_stage(rows: pd.DataFrame, spec: BackboneSpec, weights: list[np.ndarray], e: ExtractConfig, decode: str,
                plan: ActorPlan, initial: int | None, options: dict | None):
    """Images -> tap columns: CPU decode tasks then the model actors, or (decode gpu) read tasks then
    actors that decode on their GPU. The one chain of extract and predict; ``plan`` sizes and places the
    actors (placement.plan_actors), ``initial`` of them start at once."""
    import ray

    if decode == "gpu":
        ds = read_images(rows, e.max_image_pixels, e.batch_size, options)
    else:
        ds = decoded_images(rows, e.image_size, e.max_image_pixels, e.batch_size, e.jpeg_draft, options)
    if plan.shape.autoscaling:
        # The pool starts with its first actors all built: otherwise the first one ready takes every batch
        # while the others still load the model, and a pool "of 2 GPU nodes" runs on one.
        ds.context.wait_for_min_actors_s = int(max(1, e.gpu_wait_s))
    remote = {"runtime_env": {"env_vars": actor_env(e.backend)}} if e.backend != "tensorflow" else {}
    # Ray Data gives pool actors max_restarts=-1 and max_task_retries=-1: a dead actor is replaced
    # and its batch redone.
    return ds.map_batches(
        FeatureExtractor, fn_constructor_kwargs={
            "spec": spec, "weights": ray.put(weights), "backend": e.backend, "decode": decode,
            "max_pixels": e.max_image_pixels, "jpeg_draft": e.jpeg_draft, "pad_to": e.batch_size},
        batch_size=e.batch_size, compute=plan.strategy(initial),
        num_gpus=plan.num_gpus, num_cpus=plan.num_cpus, batch_format="numpy", **remote,
    )


def feature_dataset(cfg: StudyConfig, spec: BackboneSpec, rows: pd.DataFrame, staging: Path,
                    weights: list[np.ndarray], decode: str, plan: ActorPlan, initial: int | None = None):
    """The Ray chain: decode -> VGG actor pool -> shard writers; one output row per written part."""
    import ray

    e = cfg.extract
    ds = model_stage(rows, spec, weights, e, decode, plan, initial, cfg.storage.options)
    # The writer is idempotent (a part's name is the hash of its image ids).
    return ds.map_batches(
        ShardWriter, fn_constructor_kwargs={"staging": staging, "layers": list(spec.layers), "dtype": e.store_dtype},
        batch_size=e.unit_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors),
        num_cpus=WRITER_CPUS, batch_format="numpy",
    )


class UnitTracker:
    """The driver's side of a run: counts each unit's rows as its writers report them and, once every one of a
    unit's images is in a part or a reject, starts the task that publishes it (`publish_unit`, on the node
    of the writer of its last part). Per unit, never per image; no feature byte passes through here."""

    def __init__(self, ledger: UnitLedger, pending: pd.DataFrame, model: str, layers: list[str],
                 staging: Path, lease: Lease | None = None, max_in_flight: int = 4) -> None:
        self.ledger, self.model, self.layers, self.staging, self.lease = ledger, model, layers, staging, lease
        # Publishing tasks ask no CPU (a node busy decoding must not hold a finished unit back), so the driver
        # bounds how many run at once: past this, it waits for one before reading the next batch.
        self.max_in_flight = max(1, max_in_flight)
        per_unit = pending.groupby("unit", sort=False).agg(n=("image_id", "size"), day=("day", "first"))
        self.expected = per_unit["n"].to_dict()
        self.day = per_unit["day"].astype(str).to_dict()
        self.seen: dict[str, int] = {}
        self.parts: dict[str, list[str]] = {}
        self.rejects: dict[str, list[dict]] = {}
        self.n_ok = self.n_bad = 0
        self.retried = dict.fromkeys(storage.RETRY_LAYERS, 0)
        self.in_flight: list = []  # publishing calls not yet collected
        self.sent: dict = {}  # each of those calls -> its node's publisher key and the unit's arguments
        self.publishers: dict[str, Any] = {}  # a writer node -> its UnitPublisher (this run's)
        self._task = None
        self.published = 0

    def record(self, batch: pd.DataFrame) -> None:
        got = {k: int(batch[f"retried_{k}"].sum()) for k in storage.RETRY_LAYERS if f"retried_{k}" in batch}
        if sum(got.values()):
            for k, v in got.items():
                self.retried[k] += v
            log.info("storage: %s reading and writing unit(s) %s", storage.describe_retries(got),
                     ", ".join(sorted(set(batch["unit"]))))
        nodes = batch["node"] if "node" in batch else [""] * len(batch)
        for unit, part, n_ok, rejects, node in zip(batch["unit"], batch["part"], batch["n_ok"], batch["rejects"],
                                                   nodes):
            rej = json.loads(rejects)
            self.seen[unit] = self.seen.get(unit, 0) + int(n_ok) + len(rej)
            self.parts.setdefault(unit, []).append(part)
            self.rejects.setdefault(unit, []).extend(rej)
            self.n_ok += int(n_ok)
            self.n_bad += len(rej)
            if self.seen[unit] == self.expected[unit]:
                self._publish(unit, str(node))
        self.collect(wait=False)

    def _publish(self, unit: str, node: str) -> None:
        if self.lease is not None:
            self.lease.check()  # judged dead and taken over: publish nothing more
        rejects = [{**r, "model": self.model} for r in self.rejects.pop(unit)]
        args = (self.ledger.model_dir, unit, self.day[unit], self.parts.pop(unit), self.layers, self.staging, rejects,
                self.lease.path if self.lease is not None else None, self.lease.token if self.lease is not None else "")
        if not node:  # a writer that did not say where it ran
            self._by_task(args)
        else:
            ref = self._publisher(node).publish.remote(*args)
            self.in_flight.append(ref)
            self.sent[ref] = (node, args)
        if len(self.in_flight) >= self.max_in_flight:
            self.collect(wait=True, at_least=len(self.in_flight) - self.max_in_flight + 1)

    def _publisher(self, node: str) -> Any:
        """The node's publisher, started on first use: on that node and no other (a publisher asks no CPU, so
        one free to go anywhere could land on a head kept free of work), no CPU asked (it moves files, and a
        node busy decoding must not hold a finished unit back from readers). Where the node is gone, its calls
        fail and `collect` publishes those units by task."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node not in self.publishers:
            self.publishers[node] = ray.remote(UnitPublisher).options(
                num_cpus=0, max_concurrency=PUBLISH_THREADS,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
        return self.publishers[node]

    def start(self) -> None:
        """Start a publisher on each node up now where a writer can run (one with CPU): its process starts
        while the model loads, not when the run's first unit is done. A node that comes later gets its own
        on first use."""
        import ray

        for n in ray.nodes():
            if n["Alive"] and n["Resources"].get("CPU", 0) > 0:
                self._publisher(n["NodeID"])

    def _by_task(self, args: tuple) -> None:
        """A unit whose publisher was lost with its node: published again (it is idempotent) by a task that
        Ray retries, on any node where a writer could run (it asks a writer's CPU, so never a head without)."""
        import ray

        if self._task is None:
            self._task = ray.remote(publish_unit).options(num_cpus=WRITER_CPUS, max_retries=3, name="publish_unit")
        ref = self._task.remote(*args)
        self.in_flight.append(ref)
        self.sent[ref] = (None, args)

    def collect(self, wait: bool = True, at_least: int | None = None) -> None:
        """Count the publishing calls that finished: with ``wait``, ``at_least`` of them (default all) once they
        have; a failed one fails the run, except one whose publisher died (its node lost), which is sent again."""
        import ray

        while self.in_flight:
            want = len(self.in_flight) if at_least is None or not wait else min(at_least, len(self.in_flight))
            done, self.in_flight = ray.wait(self.in_flight, num_returns=want, timeout=None if wait else 0)
            if wait and want < len(done) + len(self.in_flight):  # and any others already finished
                more, self.in_flight = ray.wait(self.in_flight, num_returns=len(self.in_flight), timeout=0)
                done += more
            resent = 0
            for ref in done:
                node, args = self.sent.pop(ref)
                try:
                    retried = ray.get(ref)
                except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError) as e:
                    if node is None:
                        raise
                    log.warning("extract %s: the publisher on node %s is gone (%s); unit %s is published again",
                                self.model, node[:12], type(e).__name__, args[1])
                    self.publishers.pop(node, None)
                    self._by_task(args)
                    resent += 1
                    continue
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    if isinstance(cause, LifelogError):  # the lease was taken: its own message
                        raise LifelogError(str(cause)) from None
                    raise LifelogError(f"extract {self.model}: publishing a unit failed ({type(cause).__name__}: "
                                       f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}); "
                                       f"rerun the same command to resume") from e
                self.published += 1
                for k, v in retried.items():
                    self.retried[k] += v
            if not wait or not resent:
                return
            at_least = resent if at_least is not None else None  # wait for what was sent again, as for the rest

    def close(self) -> None:
        """End this run's publishers (after `collect`: nothing of theirs is in flight)."""
        import ray

        for actor in self.publishers.values():
            ray.kill(actor)
        self.publishers.clear()

    def incomplete(self) -> list[str]:
        return [u for u, n in self.expected.items() if self.seen.get(u, 0) != n]


def extract_model(cfg: StudyConfig, model: str, weights: list[np.ndarray] | None = None) -> ExtractSummary:
    """Extract one backbone's taps for every manifest image not done yet: pending rows -> dataset -> ledger."""
    with stage_lease(cfg, "extract", model) as lease:
        return _extract_model(cfg, model, weights, lease)


def _extract_model(cfg: StudyConfig, model: str, weights: list[np.ndarray] | None, lease: Lease) -> ExtractSummary:
    from .runtime import ensure_ray

    e = cfg.extract
    spec = spec_for(cfg, model)
    model_dir = cfg.study_dir / "features" / model
    if e.overwrite:
        storage.rmtree(model_dir)
    signature = _check_signature(model_dir, spec, e.backend, e.store_dtype)
    ledger = UnitLedger(model_dir)
    removed = ledger.remove_orphans(list(spec.layers))
    if removed:
        log.info("removed %d published file(s) of units never marked done", removed)
    manifest = storage.read_parquet(cfg.study_dir / "manifest.parquet",
                                    columns=["image_id", "path", "label", "split", "day"])
    pending = manifest[~manifest["image_id"].isin(ledger.done_ids())]
    summary = ExtractSummary(model, model_dir, 0, 0, len(manifest) - len(pending), 0.0)
    if pending.empty:
        return summary
    t0 = time.perf_counter()  # the run's time includes resolving weights and starting Ray, as it always has
    if weights is None:
        weights = resolve_weights(spec)  # before any Ray work: a missing weights file fails here
    ensure_ray(cfg.ray)
    plan = placement.plan_actors(e.device, e.num_actors, e.cpus_per_actor, placement.discover())
    log.info("extract %s: %s", model, plan.describe())
    check_decode(e.decode, signature.get("decode"), plan.device)  # before waiting for any node
    pending = plan_units(pending, e.unit_size)
    staging = ledger.staging / uuid.uuid4().hex[:12]  # this run's: a dead run's staging is never reused
    tracker = UnitTracker(ledger, pending, model, list(spec.layers), staging, lease,
                          max_in_flight=2 * max(2, plan.max_actors))  # about one per writer, and one waiting
    rows = pending[["image_id", "path", "label", "split", "day", "unit"]].astype(str)
    driver_before = storage.retry_counts()
    watch = placement.ActorWatch("FeatureExtractor")
    with placement.provision(plan, e.gpu_wait_s) as got:
        summary.pool_s, summary.pool = time.perf_counter() - t0, max(plan.min_actors, min(got.ready, plan.max_actors))
        decode = settle_decode(model_dir, signature, e.decode, plan.device, e.gpu_wait_s)  # before any image is read
        chain = feature_dataset(cfg, spec, rows, staging, weights, decode, plan, got.ready)
        try:
            tracker.start()
            for batch in chain.iter_batches(batch_size=None, batch_format="pandas"):
                if not summary.first_output_s:
                    summary.first_output_s = time.perf_counter() - t0
                    summary.first_output_rows = (int(batch["n_ok"].sum())
                                                 + sum(len(json.loads(r)) for r in batch["rejects"]))
                tracker.record(batch)
                progress.report(f"extract {model}", tracker.n_ok + tracker.n_bad, len(pending), "images")
            tracker.collect()  # every unit's publishing, before the pool's resources are given back
        finally:
            tracker.close()
    summary.processed, summary.rejected, summary.seconds = tracker.n_ok, tracker.n_bad, time.perf_counter() - t0
    if tracker.incomplete():
        raise LifelogError(f"extract {model}: {len(tracker.incomplete())} unit(s) incomplete; "
                           f"rerun the same command to resume")
    storage.forget(model_dir)  # the writers' and publishing tasks' files, as they are now
    storage.rmtree(ledger.staging)  # parts of retried batches that no unit used
    summary.placement = where_phrase(plan, decode, watch)
    mine = storage.retried_since(driver_before)  # the driver's own requests: the ledger's listing, the lease
    summary.retried = {k: tracker.retried[k] + mine[k] for k in storage.RETRY_LAYERS}
    if sum(summary.retried.values()):
        log.info("storage: %s in this run (workers' reads and writes, and the driver's)",
                 storage.describe_retries(summary.retried))
    return summary


def where_phrase(plan: ActorPlan, decode: str | None, watch: placement.ActorWatch) -> str:
    """`2 model actors on 2 GPU nodes, decode gpu`: from Ray's state API, else (a local Ray without a
    dashboard) from the plan."""
    where = watch.where()
    if where is None or not where.actors:
        where = placement.Where(plan.max_actors, len(plan.shape.nodes), int(plan.shape.now("GPU") > 0))
    return where.phrase(plan.device, decode)


def consolidate_rejects(study: Path, models: list[str]) -> pd.DataFrame:
    """Study rejects.parquet gets every extract reject (one row per model and image)."""
    frames = []
    for m in models:
        r = UnitLedger(study / "features" / m).rejects()
        if len(r):
            r["detail"] = m + ": " + r["detail"].fillna("")
            frames.append(r)
    rej = pd.concat(frames, ignore_index=True) if frames else normalize_rejects(pd.DataFrame())
    replace_stage_rejects(study, "extract", rej)
    return rej


def run_extract(cfg: StudyConfig) -> list[ExtractSummary]:
    study = cfg.study_dir
    if not (study / "manifest.parquet").exists():
        raise LifelogError(f"{study}: no manifest.parquet; run `lifelog-ray manifest --study {study} ...` first")
    # Every model's lease, then its weights: a second run or a bad weights spec fails before any Ray work.
    with holding([stage_lease(cfg, "extract", m) for m in cfg.extract.models]):
        weights = {m: resolve_weights(spec_for(cfg, m)) for m in cfg.extract.models}
        summaries = [extract_model(cfg, m, weights[m]) for m in cfg.extract.models]
        # Every model with a ledger, not only this run's: extracting vgg16 must not drop vgg19's rejects.
        features = study / "features"
        ledgers = sorted(p.name for p in features.iterdir() if (p / "_units").exists()) if features.exists() else []
        consolidate_rejects(study, sorted(set(cfg.extract.models) | set(ledgers)))
    for m in cfg.extract.models:
        write_resolved(cfg, study / "features" / m)
    return summaries


def read_features(study: str | os.PathLike, model: str, layer: str, columns: list[str] | None = None) -> pa.Table:
    """Read one layer's shards with plain pyarrow (no Ray needed)."""
    import pyarrow.dataset as pads

    fs, d = storage.arrow_filesystem(storage.to_path(study) / "features" / model / layer)
    return pads.dataset(d, format="parquet", filesystem=fs).to_table(columns=columns)


def accounting(study: str | os.PathLike, model: str, layers: list[str]) -> dict[str, dict[str, int]]:
    """Per layer: manifest rows, feature rows, extract rejects (manifest = features + rejects when complete)."""
    study = storage.to_path(study)
    n_manifest = len(storage.read_parquet(study / "manifest.parquet", columns=["image_id"]))
    rej = read_rejects(study)
    n_rej = int(((rej["stage"] == "extract") & rej["detail"].str.startswith(model + ":")).sum())
    out = {}
    for layer in layers:
        ids = read_features(study, model, layer, ["image_id"]).column("image_id").to_pylist()
        out[layer] = {"manifest": n_manifest, "features": len(ids), "unique": len(set(ids)), "rejects": n_rej}
    return out


__all__ = ["run_extract", "extract_model", "read_features", "accounting", "tap_widths"]
