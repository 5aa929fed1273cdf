"""Many hands on one study: a lease per stage, readers that see only complete units, a kill soak."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from helpers import ROOT, assert_whole_units, extract_config, make_study

from lifelog_ray import cli, storage
from lifelog_ray.config import StudyConfig
from lifelog_ray.extract import accounting, run_extract
from lifelog_ray.ingest import build_manifest
from lifelog_ray.lease import Lease, LeaseHeld, lease_path
from lifelog_ray.local_cluster import kill_tree

LAYERS2 = ["fc2", "predictions"]


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def holder(pid: int, host: str | None = None, beat_age_s: float = 0.0, job: str = "raysubmit_colleague") -> dict:
    now = datetime.now(timezone.utc)
    return {"host": host or socket.gethostname(), "pid": pid, "ray_job_id": job,
            "started_at": _iso(now - timedelta(seconds=beat_age_s + 60)),
            "heartbeat_at": _iso(now - timedelta(seconds=beat_age_s)), "token": "someone-else"}


def plant(path: Path, record: dict) -> None:
    storage.write_text_atomic(json.dumps(record), path)


@pytest.fixture
def live_pid():
    """A live process that is not this one: another run's driver on this host."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _marked_ids(model_dir: Path) -> list[str]:
    out = []
    for m in (json.loads(b) for b in storage.read_many(list(storage.files(model_dir / "_units", (".json",))))):
        rejected = {r["image_id"] for r in m["rejects"]}
        out += [i for i in m["image_ids"] if i not in rejected]
    return sorted(out)


def _check_exactly_once(study, layers=LAYERS2) -> None:
    for layer, a in accounting(study, "vgg19", layers).items():
        assert a["features"] == a["unique"], f"{layer}: an image written twice"
        assert a["manifest"] == a["features"] + a["rejects"], f"{layer}: an image lost"


# --- the lease itself (no Ray) ----------------------------------------------------------------------------

def test_a_lease_records_its_holder_beats_and_is_released(tmp_path):
    with Lease(tmp_path, "extract", "vgg19", timeout_s=0.6) as lease:
        path = tmp_path / "_leases" / "extract-vgg19.json"
        first = json.loads(path.read_text())
        assert {"host", "pid", "ray_job_id", "started_at", "heartbeat_at"} <= set(first)
        assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
        assert first["started_at"].endswith("Z") and datetime.fromisoformat(first["started_at"].replace("Z", "+00:00"))
        time.sleep(1.5)  # the heartbeat rewrites heartbeat_at every timeout/6 (here 0.5 s)
        later = json.loads(path.read_text())
        assert later["heartbeat_at"] > first["heartbeat_at"] and later["started_at"] == first["started_at"]
        with Lease(tmp_path, "extract", "vgg19") as again:  # re-entrant: `run` holding, the stage taking
            assert again is lease
        assert path.exists()
        with Lease(tmp_path, "extract", "vgg16"):  # another backbone's extract is not blocked
            assert (tmp_path / "_leases" / "extract-vgg16.json").exists()
    assert not path.exists()


def test_a_live_holder_refuses_a_dead_one_is_taken_over(tmp_path, live_pid, dead_pid):
    path = lease_path(tmp_path, "classify")
    plant(path, holder(live_pid))
    with pytest.raises(LeaseHeld, match=f"classify is already running on this study: host .* pid {live_pid}, "
                                        f"Ray job raysubmit_colleague.*--wait"):
        Lease(tmp_path, "classify").acquire()
    plant(path, holder(live_pid, host="node-7", beat_age_s=30))  # elsewhere, heartbeat within the timeout
    with pytest.raises(LeaseHeld, match="host node-7"):
        Lease(tmp_path, "classify", timeout_s=120).acquire()
    for record, why in [(holder(dead_pid), f"process {dead_pid} is gone"),
                        (holder(live_pid, host="node-7", beat_age_s=300), "no heartbeat for 30")]:
        plant(path, record)
        with Lease(tmp_path, "classify", timeout_s=120) as lease:
            assert why in lease.took_over
            assert json.loads(path.read_text())["pid"] == os.getpid()
        assert not path.exists()


def test_wait_queues_behind_a_live_holder(tmp_path):
    code = ("import sys, time; from pathlib import Path; from lifelog_ray.lease import Lease\n"
            "l = Lease(Path(sys.argv[1]), 'finetune').acquire(); print('held', flush=True); time.sleep(3); l.release()")
    other = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"
    with pytest.raises(LeaseHeld):
        Lease(tmp_path, "finetune").acquire()
    t0 = time.time()
    with Lease(tmp_path, "finetune", wait=True):
        assert time.time() - t0 > 1  # it waited for the other run's release
    other.wait(timeout=30)


def test_a_second_extract_is_refused_before_any_ray_work(tmp_path, capsys, live_pid):
    root, _ = make_study(tmp_path, n_per_class=4)
    cfg = extract_config(tmp_path, root)
    build_manifest(cfg)
    study = tmp_path / "study"
    plant(lease_path(study, "extract", "vgg19"), holder(live_pid))
    args = ["extract", "--study", str(study), "--weights", "none", "--image-size", "32"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pid {live_pid}" in err[0] and "--wait" in err[0], err
    assert not (study / "features").exists()  # refused before the signature, the ledger or Ray
    assert cli.main(["run", "--study", str(study), "--stages", "extract"]) == 2
    assert "extract vgg19 is already running" in capsys.readouterr().err
    assert not (study / "features").exists()
    with Lease(study, "extract", "vgg16"):  # a vgg16 extract of the same study may run beside it
        pass


# --- staging, publication, take-over, with Ray --------------------------------------------------------------

def _plant_dead_runs_leftovers(model_dir: Path, dead: dict, study: Path) -> None:
    """What a SIGKILLed run leaves: its lease, staged parts of an unfinished unit, an unmarked published file."""
    fake = pa.table({"image_id": ["ghost1", "ghost2"], "label": ["car", "car"], "split": ["train"] * 2,
                     "day": ["2016-08-15"] * 2, "features": pa.FixedSizeListArray.from_arrays(
                         pa.array([0.0] * 2000, pa.float32()), 1000)})
    plant(lease_path(study, "extract", "vgg19"), dead)
    storage.write_table_atomic(fake, model_dir / "_staging" / "deadrun" / "predictions" / "u_p1.parquet")
    storage.write_table_atomic(fake, model_dir / "predictions" / "2016-08" / "2016-08-15_unmarked.parquet")


def test_a_dead_holders_lease_is_taken_over_and_its_leftovers_cleaned(tmp_path, ray_local, dead_pid):
    root, _ = make_study(tmp_path, n_per_class=6)
    (root / "2016-08-15" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    rows = pd.read_csv(tmp_path / "labels.csv")
    rows.loc[len(rows)] = ["2016-08-15/broken.jpg", "car"]
    rows.to_csv(tmp_path / "labels.csv", index=False)
    cfg = extract_config(tmp_path, root, layers="fc2,predictions")
    build_manifest(cfg)
    study = tmp_path / "study"
    model_dir = study / "features" / "vgg19"
    (model_dir / "predictions").mkdir(parents=True)
    (model_dir / "_extract.json").write_text(json.dumps({"model": "vgg19", "weights": "none", "image_size": 32,
                                                         "seed": 0, "precision": "float32",
                                                         "layers": ["fc2", "predictions"]}))
    _plant_dead_runs_leftovers(model_dir, holder(dead_pid), study)
    assert len(pd.read_parquet(model_dir / "predictions")) == 2  # the staged part is outside the reader's view
    (s,) = run_extract(cfg)
    assert (s.processed, s.rejected) == (18, 1)
    _check_exactly_once(study)
    assert not (model_dir / "_staging").exists() and not lease_path(study, "extract", "vgg19").exists()
    # one file per unit and layer, named by the unit, each listed by its marker
    assert sorted(f.stem for f in (model_dir / "fc2").rglob("*.parquet")) == sorted(
        u for u in (json.loads(f.read_text())["unit"] for f in (model_dir / "_units").glob("*.json")))
    assert sorted(pd.read_parquet(model_dir / "fc2")["image_id"]) == _marked_ids(model_dir)


def _on_s3(cfg: StudyConfig, options: dict, study: str) -> StudyConfig:
    d = cfg.model_dump()
    d["output"]["study"] = study
    d["storage"]["options"] = options
    return StudyConfig.model_validate(d)


def test_leases_staging_and_takeover_on_s3(tmp_path, s3, ray_local):
    fs, options = s3
    study = storage.to_path("s3://lifelog/concurrency", options)
    # exclusive create is a conditional PUT (If-None-Match: *): the second one fails
    first = Lease(study, "audit").acquire()
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        Lease._held.clear()  # look at it as another process would
        try:
            Lease(study, "audit").acquire()
        finally:
            Lease._held[str(first.path)] = first
    first.release()
    assert not fs.exists("lifelog/concurrency/_leases/audit.json")

    root, _ = make_study(tmp_path, n_per_class=4)
    cfg = _on_s3(extract_config(tmp_path, root, layers="fc2,predictions"), options, "s3://lifelog/concurrency")
    build_manifest(cfg)
    model_dir = study / "features" / "vgg19"
    storage.write_text_atomic(json.dumps({"model": "vgg19", "weights": "none", "image_size": 32, "seed": 0,
                                          "precision": "float32", "layers": ["fc2", "predictions"]}),
                              model_dir / "_extract.json")
    _plant_dead_runs_leftovers(model_dir, holder(1, host="spot-node-3", beat_age_s=30), study)
    with pytest.raises(LeaseHeld, match="host spot-node-3 pid 1, Ray job raysubmit_colleague"):
        run_extract(cfg)  # a live holder elsewhere: refused
    plant(lease_path(study, "extract", "vgg19"), holder(1, host="spot-node-3", beat_age_s=3600))
    (s,) = run_extract(cfg)  # a silent holder: taken over, its leftovers cleaned
    assert s.processed == 12
    _check_exactly_once(study)
    assert not fs.exists("lifelog/concurrency/features/vgg19/_staging")
    assert not fs.exists("lifelog/concurrency/_leases/extract-vgg19.json")
    seen = pd.read_parquet("s3://lifelog/concurrency/features/vgg19/fc2", storage_options=options["s3"])
    assert sorted(seen["image_id"]) == _marked_ids(model_dir)


# --- a real SIGKILL, then plain readers, then the rerun -----------------------------------------------------

@pytest.mark.integration
@pytest.mark.slow  # the killed run is a CLI process starting its own Ray; the rerun runs in this process
def test_after_a_sigkill_on_s3_readers_see_only_complete_units_and_a_rerun_completes_once(tmp_path, s3,
                                                                                          sample_lifelog, ray_local,
                                                                                          capsys):
    """A driver SIGKILLed mid-extraction with its Ray (a machine going away), the study on S3: plain readers of the
    bucket see whole units only, and the same command resumes, doing less work than a fresh run, and completes
    with every image exactly once. (On local disk the chaos soak below kills drivers and checks the same.)"""
    fs, options = s3
    uri = "s3://lifelog/killed"
    endpoint = options["s3"]["endpoint_url"]
    sets = ["--set", f"storage.options.s3.endpoint_url={endpoint}", "--set", "storage.options.s3.key=testing",
            "--set", "storage.options.s3.secret=testing"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    base = ["--study", uri, "--ray-address", "local", *sets]
    subprocess.run([sys.executable, "-m", "lifelog_ray", "manifest", "--root", str(sample_lifelog), "--labels",
                    str(sample_lifelog / "labels.csv"), "--top-k", "5", *base], check=True, env=env,
                   capture_output=True, timeout=120)
    cfg_file = tmp_path / "units.yaml"
    cfg_file.write_text("extract:\n  unit_size: 6\n  batch_size: 4\nray:\n  progress_bars: false\n")
    extract = [sys.executable, "-m", "lifelog_ray", "extract", "--weights", "none", "--image-size", "64",
               "--layers", "fc2,predictions", "--config", str(cfg_file), *base]
    proc = subprocess.Popen(extract, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    units = "lifelog/killed/features/vgg19/_units"
    deadline = time.time() + 300
    while time.time() < deadline and len(fs.ls(units, refresh=True) if fs.exists(units) else []) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    kill_tree(proc.pid)  # the driver and its local Ray, every process at once (Ray's workers have groups of their own)
    proc.wait()
    model_dir = storage.to_path(uri, options) / "features" / "vgg19"
    fs.invalidate_cache()
    assert len(_marked_ids(model_dir)) >= 2
    for layer in LAYERS2:  # pd.read_parquet of the bucket's layer folder: nothing of an unfinished unit
        assert_whole_units(model_dir, layer, options)
    capsys.readouterr()
    assert cli.main(extract[3:]) == 0  # the same command, in this process (on the session's Ray)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("extract vgg19:")][0]
    assert int(line.split(" rejected, ")[1].split(" already done")[0]) >= 2  # the units done before the kill: skipped
    fs.invalidate_cache()  # the rerun deleted what the killed run left: forget this process's listing
    _check_exactly_once(storage.to_path(uri, options))
    assert not fs.exists("lifelog/killed/features/vgg19/_staging")


@pytest.mark.integration
@pytest.mark.slow
def test_chaos_soak_three_kills_exactly_once(tmp_path):
    """The short version of benchmarks/chaos.py: three kills (driver or model actor) and raced second runs."""
    out = tmp_path / "chaos.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "chaos.py"), "--kills", "3", "--days", "3",
                          "--images-per-day", "24", "--second-run-share", "0.5", "--seed", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    stats = json.loads(out.read_text())
    assert stats["exactly_once"] and stats["kills_survived"] == 3 and not stats["problems"]


def test_a_lease_whose_create_was_applied_but_unanswered_is_this_runs_own(tmp_path, monkeypatch):
    """On a flaky store the answer to a conditional PUT can be lost after the store applied it: the retried PUT
    then meets the lease and is refused (412). The run must see its own token there, not another holder."""
    import lifelog_ray.lease as lease_mod
    from lifelog_ray.lease import Lease

    real = lease_mod._create
    calls = []

    def applied_but_refused(path, data):
        calls.append(path)
        if len(calls) == 1:
            real(path, data)  # the store wrote it ...
            return False  # ... and the client heard "exists"
        return real(path, data)

    monkeypatch.setattr(lease_mod, "_create", applied_but_refused)
    with Lease(tmp_path, "extract", "vgg19") as held:
        assert json.loads(held.path.read_text())["token"] == held.token
    assert not held.path.exists()


def test_a_unit_is_published_whole_once_and_only_under_the_runs_lease(tmp_path, monkeypatch):
    """`publish_unit`, what publishes a finished unit on its writer's node (in that node's publisher actor, or a
    task where the node is gone), as a plain function: two staged parts become one file per layer, then the
    marker; a crash part-way and a second call (a retry) publish the unit once; a run whose lease another run took writes no marker (a rerun deletes its files)."""
    from lifelog_ray.errors import LifelogError
    from lifelog_ray.extract import publish_unit

    model_dir = tmp_path / "features" / "vgg19"
    staging = model_dir / "_staging" / "run1"
    layers = ["fc2", "predictions"]

    def stage(part: str, ids: list[str]) -> None:
        for layer in layers:
            storage.write_table_atomic(pa.table({"image_id": ids, "features": pa.FixedSizeListArray.from_arrays(
                pa.array([1.0] * len(ids) * 2, pa.float32()), 2)}), staging / layer / f"{part}.parquet")

    stage("u1_pa", ["b", "a"])
    stage("u1_pb", ["c"])
    reject = {"image_id": "x", "path": "d/x.jpg", "reason": "decode_error", "detail": "", "model": "vgg19"}
    lease = Lease(tmp_path, "extract", "vgg19").acquire()
    real = storage.unlink

    def node_lost_part_way(p):  # fc2 published whole and its parts gone; predictions written, then the crash
        if "predictions" in str(p):
            raise OSError("node lost")
        real(p)

    args = (model_dir, "u1", "2016-08-15", ["u1_pa", "u1_pb"], layers, staging, [reject])
    monkeypatch.setattr(storage, "unlink", node_lost_part_way)
    with pytest.raises(OSError):
        publish_unit(*args, lease.path, lease.token)
    assert not (model_dir / "_units").exists()  # not marked: a rerun would delete what it published
    monkeypatch.undo()
    publish_unit(*args, lease.path, lease.token)  # Ray's retry of the task
    marker = json.loads((model_dir / "_units" / "u1.json").read_text())
    assert marker["image_ids"] == ["a", "b", "c", "x"] and marker["parts"] == ["u1"] and marker["rejects"] == [reject]
    for layer in layers:
        assert [f.name for f in (model_dir / layer).rglob("*.parquet")] == ["u1.parquet"]
        assert pd.read_parquet(model_dir / layer)["image_id"].tolist() == ["a", "b", "c"]
    assert not list(staging.rglob("*.parquet"))
    # judged dead: another run holds the lease now; this run's late task writes no marker
    stage("u2_pa", ["d"])
    old = lease.token
    lease.release()
    with Lease(tmp_path, "extract", "vgg19"):
        with pytest.raises(LifelogError, match="another run took this run's lease"):
            publish_unit(model_dir, "u2", "2016-08-16", ["u2_pa"], layers, staging, [], lease.path, old)
    assert not (model_dir / "_units" / "u2.json").exists()


def test_units_whose_publisher_is_lost_with_its_node_are_published_again(tmp_path, ray_local, caplog):
    """The driver hands each finished unit to its writer node's publisher (a Ray actor, held to that node). A
    publisher that dies with its node (here: killed while it holds units), or one that cannot start because its
    node is gone, loses no unit: each one it held is published again by a task, once, and every unit ends whole
    and marked."""
    import ray

    from lifelog_ray.extract import UnitLedger, UnitTracker

    model_dir = tmp_path / "features" / "vgg19"
    staging = model_dir / "_staging" / "run1"
    units = [f"2016-08-{15 + u:02d}_u{u}" for u in range(6)]
    rows = []
    for u, unit in enumerate(units):
        for k in range(2):  # two staged parts a unit, as writers stage them
            ids = [f"img{u}_{k}_{i}" for i in range(3)]
            for layer in LAYERS2:
                storage.write_table_atomic(pa.table({"image_id": ids, "features": pa.FixedSizeListArray.from_arrays(
                    pa.array([float(u)] * 6, pa.float32()), 2)}), staging / layer / f"{unit}_p{k}.parquet")
            rows.append({"unit": unit, "part": f"{unit}_p{k}", "n_ok": 3, "rejects": "[]", "day": unit[:10],
                         "ids": ids})
    rows = pd.DataFrame(rows)
    pending = pd.DataFrame([{"image_id": i, "unit": r.unit, "day": r.day} for r in rows.itertuples() for i in r.ids])
    node = ray.get_runtime_context().get_node_id()
    tracker = UnitTracker(UnitLedger(model_dir), pending, "vgg19", LAYERS2, staging, max_in_flight=len(units))
    tracker.start()
    (publisher,) = tracker.publishers.values()
    ray.kill(publisher)  # its node lost: every unit sent to it from now on fails with ActorDiedError
    gone = "ab" * 28  # and a writer's node that left the cluster before its publisher could start there
    rows["node"] = [gone if unit == units[-1] else node for unit in rows["unit"]]
    with caplog.at_level("WARNING", logger="lifelog_ray.extract"):
        for _, part in rows.groupby("part", sort=False):
            tracker.record(part[["unit", "part", "n_ok", "rejects", "node"]])
        tracker.collect()
    tracker.close()
    assert tracker.published == len(units) and not tracker.incomplete()
    assert "is gone" in caplog.text and f"unit {units[-1]} is published again" in caplog.text, caplog.text
    assert "ActorUnschedulableError" in caplog.text and "ActorDiedError" in caplog.text, caplog.text
    assert sorted(p.stem for p in (model_dir / "_units").glob("*.json")) == units
    for layer in LAYERS2:
        got = pd.read_parquet(model_dir / layer)
        assert sorted(got["image_id"]) == sorted(pending["image_id"]) and got["image_id"].is_unique
    assert not list(staging.rglob("*.parquet"))


def test_a_lease_replaced_after_its_folder_was_listed_is_read_whole(s3):
    """A heartbeat replaces the lease object while a publisher checks the run's token (the bad day's run hit it:
    `FileExpired` on the lease, and the extract failed). The check must read the object as it is now, in one
    GET, not through a size and ETag that a listing cached before the heartbeat."""
    import s3fs

    from lifelog_ray.lease import _read, check_token

    _, options = s3
    key = "lifelog/lease-race/_leases/extract-vgg19.json"
    path = storage.to_path(f"s3://{key}", options)
    path.fs.pipe(key, b'{"token": "a"}')
    path.fs.ls(key.rsplit("/", 1)[0])  # this process's listing caches the object's size and ETag
    heartbeat = s3fs.S3FileSystem(**options["s3"], skip_instance_cache=True)  # another process's beat
    heartbeat.pipe(key, b'{"token": "a", "beat": 2}')
    assert _read(path) == {"token": "a", "beat": 2}
    check_token(path, "a", "extract")
