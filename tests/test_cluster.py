"""cluster.yaml's cloud cluster, on this machine: a head with no CPU, GPU and CPU workers that Ray's own
autoscaler starts from zero (lifelog_ray.local_cluster, 1 CPU per node, GPU types with 1 GPU), the images and
the study on S3 (moto), so no node reads another's disk. One cluster for the module, one scenario run as a chain
of steps, each checking what a user of `ray job submit` would check: the cloud recipe from zero workers, then a
bad day on the nodes it left (a GPU node lost mid-extract behind a flaky object store), then the workers
scaling back to zero. (Its own cluster: this is what the module proves.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flaky_s3 import FlakyS3
from helpers import ROOT, assert_whole_units

from lifelog_ray import storage
from lifelog_ray.local_cluster import LocalCluster
from lifelog_ray.predict import NOT_FRAMES

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BIN = Path(sys.executable).parent
BUCKET = "lifelog"
# Our tasks and actors (Ray Data stages, Ray Train workers, Tune trials, the decode probe): none may run on the head.
OURS = ("decode_batch", "read_batch", "FeatureExtractor", "ShardWriter", "PipelineClassifier", "FinetunedClassifier",
        "PredictionWriter", "_keep_decoded", "probe", "RayTrainWorker", "ImplicitFunc", "_refit_remote", "_trial", "publish_unit",
        "UnitPublisher", "_prepare_set")


@pytest.fixture(scope="module", autouse=True)
def no_idle_session_ray():
    """The session's local Ray would sit idle beside this module's cluster on the same 2 cores (its log monitor
    and agents used ~10 % of a core, aged by the tests before): it is shut down here. The bad day starts a fresh one
    once its extract on the cluster is done, for its predict and the chain's single-node run."""
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """The chain's local Ray in this process (the bad day's predict, the single-node run), started on first use and
    shut down with the module."""
    import ray

    from lifelog_ray.config import RayConfig
    from lifelog_ray.runtime import ensure_ray

    def start() -> None:
        if not ray.is_initialized():
            ensure_ray(RayConfig(address="local", num_cpus=2, progress_bars=False, log_to_driver=False))

    yield start
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster():
    # gpu_worker and cpu_worker as in cluster.yaml (min 0), capped at what 2 cores hold. Idle nodes go in 45 s:
    # long enough that the bad day starts on the GPU nodes the recipe's predict left up (a cold start of two
    # GPU nodes costs ~50 s here), short enough that the chain's last step finds them gone or going.
    with LocalCluster(max_workers={"gpu_worker": 2, "cpu_worker": 1}, idle_timeout_s=45, heartbeat_timeout_s=8) as c:
        yield c


def upload(fs, local: Path, prefix: str) -> None:
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.put_file(str(f), f"{BUCKET}/{prefix}/{f.relative_to(local).as_posix()}")


@pytest.fixture(scope="module")
def lifelog(s3, tmp_path_factory):
    """The sample lifelog (3 days, a day per split) and a held-out day, uploaded to the bucket."""
    from lifelog_ray.sample import write_sample

    fs, _ = s3
    local = tmp_path_factory.mktemp("cluster-lifelog")
    write_sample(local / "lifelog", seed=3, days=4, images_per_day=50, image_size=(96, 72))
    days = sorted(p.name for p in (local / "lifelog").iterdir() if p.is_dir())
    new_day = days[-1]  # held out: the predict stage labels it
    labels = pd.read_csv(local / "lifelog" / "labels.csv")
    labels[~labels["image_path"].str.startswith(new_day)].to_csv(local / "lifelog" / "labels.csv", index=False)
    (local / "new").mkdir()
    (local / "lifelog" / new_day).rename(local / "new" / new_day)
    upload(fs, local / "lifelog", "cluster/images")
    upload(fs, local / "new", "cluster/new")
    return local


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    """Where the recipe's config lies: the chain's last step resumes the recipe's study with the same file."""
    return tmp_path_factory.mktemp("recipe")


def cloud_config(tmp: Path, options: dict, study: str, **over) -> Path:
    """A scaled-down copy of jobs/configs/multiyear_gpu.yaml: the same stages and keys, a small model, S3 on moto."""
    cfg = yaml.safe_load((ROOT / "jobs" / "configs" / "multiyear_gpu.yaml").read_text())
    cfg["data"].update(root=f"s3://{BUCKET}/cluster/images", labels=f"s3://{BUCKET}/cluster/images/labels.csv", top_k=5)
    cfg["extract"].update(models=["vgg19"], weights="none", image_size=32, batch_size=8, precision="float32",
                          unit_size=16)
    space = tmp / "space.yaml"  # one grid point each: every distributed XGBoost fit is a Ray Train run (~1 min here)
    space.write_text(yaml.safe_dump({"naive_bayes": {"estimator": "sklearn.naive_bayes.GaussianNB",
                                                     "grid": {"var_smoothing": [1.0e-9]}},
                                     "xgboost": {"estimator": "xgboost.XGBClassifier", "fixed": {"tree_method": "hist"},
                                                 "grid": {"max_depth": [3], "n_estimators": [20]}}}))
    cfg["classify"].update(classifiers=["naive_bayes", "xgboost"], xgboost_distributed="always", xgboost_workers=2,
                           cpus_per_trial=1, search_space=str(space), layers=["fc2"])
    cfg["finetune"].update(weights="none", image_size=32, epochs=1, workers=1, cpus_per_worker=1, batch_size=8)
    cfg["predict"] = {"images": f"s3://{BUCKET}/cluster/new"}
    cfg["output"]["study"] = f"s3://{BUCKET}/{study}"
    cfg["storage"]["options"] = options
    cfg["ray"]["progress_bars"] = False
    for key, value in over.items():
        section, name = key.split(".")
        cfg[section][name] = value
    path = tmp / f"{study.replace('/', '-')}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def state(cluster: LocalCluster, what: str) -> list[dict]:
    return cluster.api(f"/api/v0/{what}?detail=1&limit=10000")["data"]["result"]["result"]


def wait_for_zero_workers(cluster: LocalCluster, timeout_s: float = 180) -> None:
    cluster.wait_for(lambda: [n["node_type"] for n in cluster.nodes()] == ["ray.head.default"], timeout_s,
                     "the idle workers to scale back to min_workers (0)")


def features(study, layer: str, options: dict | None = None) -> pd.DataFrame:
    from lifelog_ray.extract import read_features

    t = read_features(storage.to_path(study, options), "vgg19", layer, ["image_id", "features"]).to_pandas()
    return t.set_index("image_id").sort_index()


def test_the_cloud_recipe_runs_on_an_autoscaling_cluster(cluster, s3, lifelog, long_lifelog, recipe_dir):
    """`ray job submit ... jobs/study.py --config` (multiyear_gpu.yaml scaled down) on a cluster of zero workers:
    every stage runs, the model actors get GPUs on two GPU nodes at once, nothing of ours runs on the head,
    Tune, XGBoost and fine-tuning run on worker nodes the autoscaler added. (The chain's last step checks that
    the features equal a single-node run's bit for bit, that the study resumes from the bucket, and that the
    workers scale back to zero: done here, they would leave the bad day, next, to start its GPU nodes cold.
    `long_lifelog` is the bad day's, made now for the same reason.)"""
    fs, options = s3
    wait_for_zero_workers(cluster)
    config = cloud_config(recipe_dir, options, "cluster/study")
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(ROOT),
                          "--", sys.executable, "jobs/study.py", "--config", str(config)],
                         env=cluster.process_env(), capture_output=True, text=True, timeout=1500, cwd=ROOT)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    fs.invalidate_cache()  # what the cluster wrote, not this process's listings from earlier tests
    # every stage's outputs went to the bucket (this is also the suite's whole study on S3)
    keys, s = set(fs.find(f"{BUCKET}/cluster/study")), f"{BUCKET}/cluster/study/"
    for f in ("manifest.parquet", "rejects.parquet", "categories.csv", "config.yaml", "features/vgg19/_extract.json",
              "classify/table3.md", "classify/_done.json", "finetune/table4.csv", "finetune/vgg19/m2/model.keras",
              "finetune/vgg19/m2/learning_curves.png", "report/index.html"):
        assert s + f in keys, f
    assert any(re.match(re.escape(s) + r"features/vgg19/fc2/\d{4}-\d{2}/.*\.parquet$", k) for k in keys)  # month folders
    assert any(k.startswith(s + "finetune/_ray/") and k.endswith("state.json") for k in keys)  # Ray Train checkpoints
    recorded = fs.cat(s + "config.yaml").decode()  # the moto credentials came as storage.options: never written
    assert "<redacted>" in recorded and "testing" not in recorded, recorded
    html = fs.cat(s + "report/index.html").decode()
    assert "testing" not in html
    assert "id='misclassified'" in html and "data:image/jpeg;base64," in html  # thumbnails read from S3
    for stage in ("manifest", "extract", "classify", "finetune", "predict", "report"):
        assert f"[{stage}] done" in out, out[-4000:]
    assert "Traceback" not in out
    assert "(2 model actors on 2 GPU nodes, decode cpu)" in out, out[-4000:]  # no nvImageCodec on these "GPUs"

    nodes = {n["node_id"]: n for n in cluster.nodes(alive=False)}  # dead ones too: the workers may be gone
    head = next(i for i, n in nodes.items() if n["head"])
    actors, tasks = state(cluster, "actors"), state(cluster, "tasks")
    model = [a for a in actors if "FeatureExtractor" in a["class_name"]]
    assert model and all(a["required_resources"].get("GPU") == 1 for a in model), model
    gpu_nodes = {a["node_id"] for a in model}
    assert len(gpu_nodes) >= 2 and all(nodes[n]["resources"].get("GPU") == 1 for n in gpu_nodes), gpu_nodes
    # at the same time: the pool held GPU actors on two GPU nodes at once (each actor's span runs from its
    # creation to the end of its last task). On 2 shared cores one actor may run every batch while the other
    # waits for input: decoding, not the model, is the bottleneck here.
    node_of = {a["actor_id"]: a["node_id"] for a in model}
    span: dict[str, list[float]] = {}
    for t in tasks:
        if t.get("actor_id") in node_of and t.get("start_time_ms") and t.get("end_time_ms"):
            lo, hi = span.get(t["actor_id"], [t["start_time_ms"], t["end_time_ms"]])
            span[t["actor_id"]] = [min(lo, t["start_time_ms"]), max(hi, t["end_time_ms"])]
    assert any(node_of[a] != node_of[b] and span[a][0] < span[b][1] and span[b][0] < span[a][1]
               for a in span for b in span), (span, node_of)
    on_head = sorted({x.get("class_name") or x.get("name") for x in actors + tasks if x.get("node_id") == head})
    assert not [x for x in on_head if any(o in x for o in OURS)], on_head
    # Ray Tune's trials, distributed XGBoost and the fine-tuning worker ran on worker nodes the autoscaler added
    trained = [a for a in actors if "RayTrainWorker" in a["class_name"]]
    trials = [a for a in actors if "ImplicitFunc" in a["class_name"]]
    names = sorted({a["class_name"] for a in actors})
    assert trained and trials, names
    # each feature set was read and PCA-reduced by a task on a worker node, not in the driver
    prepared = [t for t in tasks if "_prepare_set" in (t.get("name") or "")]
    assert prepared and all(t.get("node_id") != head for t in prepared), prepared
    assert all(a["node_id"] != head for a in trained + trials), [(a["class_name"], a["node_id"]) for a in trained + trials]
    # finetune.gpus_per_worker 1: through its placement group (GPU_group_<id>), on a GPU node
    gpu_trained = [a for a in trained if any(k.startswith("GPU") for k in a["required_resources"])]
    assert gpu_trained and all(nodes[a["node_id"]]["resources"].get("GPU") for a in gpu_trained), trained

    study = f"s3://{BUCKET}/cluster/study"
    from lifelog_ray.extract import accounting

    acc = accounting(storage.to_path(study, options), "vgg19", ["fc2"])["fc2"]
    assert acc["features"] == acc["unique"] and acc["features"] + acc["rejects"] == acc["manifest"], acc
    logs = fs.ls(f"{BUCKET}/cluster/study/logs")
    extract_log = fs.cat_file(next(p for p in logs if "/extract-" in p)).decode()
    assert "autoscaler: Adding" in extract_log and "gpu_worker" in extract_log  # the autoscaler's events
    preds = pd.read_parquet(f"{study}/predictions/new", storage_options=options["s3"], ignore_prefixes=NOT_FRAMES)
    assert len(preds) == 50 and preds["image_id"].is_unique
    parts = [k for k in keys if "/predictions/new/" in k and k.endswith(".parquet")
             and not k.rsplit("/", 1)[1].startswith(tuple(NOT_FRAMES))]
    assert parts and all("/day=" in k for k in parts)  # the frames are the day partitions
    import pyarrow.dataset as pads

    afs, path = storage.arrow_filesystem(storage.to_path(f"{study}/predictions/new", options))
    frames = pads.dataset(path, filesystem=afs, format="parquet", partitioning="hive",
                          ignore_prefixes=NOT_FRAMES).to_table()  # pyarrow, not only pandas: not events.parquet
    assert frames.num_rows == 50 and s + "predictions/new/summary_by_week.parquet" in keys
    events = pd.read_parquet(f"{study}/predictions/new/events.parquet", storage_options=options["s3"])
    assert events["n_frames"].sum() == preds["smoothed_label"].notna().sum()  # every labelled frame in one event

    # next in the chain: the bad day, on the nodes this left up


@pytest.fixture(scope="module")
def long_lifelog(s3, tmp_path_factory):
    """Enough frames that extraction at 128 px outlasts a node's loss and its replacement (~40 s here)."""
    from lifelog_ray.sample import write_sample

    fs, _ = s3
    local = tmp_path_factory.mktemp("cluster-long") / "lifelog"
    write_sample(local, seed=5, days=3, images_per_day=200, image_size=(96, 72))
    upload(fs, local, "cluster/long")
    return local


def markers(fs, study: str) -> int:
    try:
        return len(fs.ls(f"{BUCKET}/{study}/features/vgg19/_units", refresh=True))
    except FileNotFoundError:
        return 0


# Its local Ray starts in this process after earlier tests of the session initialised JAX here (the run of
# 2026-12-07 late evening, 588d7b2, warned once): Ray's process starts (fork, a pre-exec step, exec) meet JAX's
# at-fork warning, meant for a fork that goes on running Python beside JAX's threads. The suite's session Ray
# started before any of that, so it never warned; a process that initialises no JAX before its Ray never does.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_a_bad_day_a_gpu_node_lost_mid_extract_behind_a_flaky_object_store(cluster, s3, long_lifelog, tmp_path, capsys,
                                                                           local_ray):
    """Both at once, as a bad day on a cloud brings them: a share of S3 requests answered 503 SlowDown or dropped
    (before moto sees them, or after it applied them), and a GPU worker node lost mid-extract (its processes
    killed). The run completes with every image exactly once, the autoscaler replaces the node, a retried
    request never turns an image into a reject, predict through the same store labels every new frame once,
    and the stage logs say what was retried and by which layer."""
    fs, options = s3  # the next step of the chain: it starts on whatever nodes the recipe left up
    host = options["s3"]["endpoint_url"].split("//", 1)[1]
    study = "cluster/lost"
    with FlakyS3(host, rate=0.08, seed=7) as proxy:
        flaky = {"s3": {**options["s3"], "endpoint_url": proxy.endpoint}}
        config = cloud_config(tmp_path, flaky, study, **{"data.root": f"s3://{BUCKET}/cluster/long",
                                                         "data.labels": f"s3://{BUCKET}/cluster/long/labels.csv",
                                                         "extract.image_size": 128, "extract.unit_size": 32})
        env = cluster.process_env()
        from lifelog_ray.config import load_config
        from lifelog_ray.ingest import build_manifest

        build_manifest(load_config(config))  # in this process: a listing and a CSV, no Ray
        run = subprocess.Popen([str(BIN / "lifelog-ray"), "extract", "--config", str(config)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            cluster.wait_for(lambda: markers(fs, study) >= 1, 600, "the first unit", every_s=0.3)
            gpu_before = {n["node_id"] for n in cluster.nodes() if n["resources"].get("GPU")}
            busy = {a["node_id"] for a in state(cluster, "actors")
                    if "FeatureExtractor" in a["class_name"] and a["state"] == "ALIVE"}
            victim = sorted(busy & gpu_before)[0]
            done_at_kill = markers(fs, study)
            # every GPU node seen so far, the recipe's idle ones included: a node not among them came after the kill
            gpu_seen = {n["node_id"] for n in cluster.nodes(alive=False) if n["resources"].get("GPU")}
            assert cluster.kill_node(victim) > 0
            out, _ = run.communicate(timeout=1200)
        finally:
            if run.poll() is None:
                run.kill()
        assert run.returncode == 0, out[-5000:]
        gpu_after = {n["node_id"] for n in cluster.nodes(alive=False) if n["resources"].get("GPU")}  # before predict
        # predict through the same store, with the recipe's study (its classify pipelines), to a set of its own:
        # the CLI in this process, on that local Ray (the store's faults are what this step is about; predict on the
        # cluster's GPU nodes is the recipe's, above)
        recipe = cloud_config(tmp_path, flaky, "cluster/study")
        from lifelog_ray import cli

        local_ray()  # a local Ray in this process, started now (after the cluster's extract), kept for the last step

        capsys.readouterr()
        code = cli.main(["predict", "--config", str(recipe), "--name", "flaky", "--ray-address", "local"])
        labelled = capsys.readouterr()
        faults = {k: v for k, v in proxy.counts.items() if ":" not in k}
    assert code == 0, (labelled.out + labelled.err)[-5000:]
    assert sum(faults.get(f, 0) for f in ("slowdown", "drop_before", "drop_after")) >= 20, faults
    fs.invalidate_cache()  # the polling above listed folders mid-run: read what the cluster wrote afresh
    manifest = pd.read_parquet(f"s3://{BUCKET}/{study}/manifest.parquet", storage_options=options["s3"])
    units = markers(fs, study)
    assert done_at_kill < units, "the node was killed after the last unit: nothing was tested"
    from lifelog_ray.extract import accounting
    from lifelog_ray.rejects import read_rejects

    acc = accounting(storage.to_path(f"s3://{BUCKET}/{study}", options), "vgg19", ["fc2", "predictions"])
    for layer, a in acc.items():  # every image exactly once: in the features or in the rejects
        assert a["features"] == a["unique"] and a["features"] + a["rejects"] == a["manifest"] == len(manifest), (
            layer, a)
        assert_whole_units(storage.to_path(f"s3://{BUCKET}/{study}/features/vgg19", options), layer, options,
                           max_unmarked=0)  # the run finished: every published unit is marked
    # the rejects are the sample's broken files, for what they are, and nothing the store's faults caused
    rejects = read_rejects(storage.to_path(f"s3://{BUCKET}/{study}", options))
    rejects = rejects[rejects["stage"] != "ingest"]  # ingest's (unlabelled frames) are not extraction's
    broken = manifest[manifest["rel_path"].str.endswith(("_235900_000.jpg", "_235930_000.jpg", "_235945_000.jpg"))]
    assert sorted(rejects["image_id"]) == sorted(broken["image_id"]), rejects.to_dict("records")
    # the autoscaler replaced the lost node while the extract run still needed it
    assert gpu_after - gpu_seen, (gpu_before, gpu_seen, gpu_after)
    def last_log(folder: str, stage: str) -> str:  # logs are named <stage>-<UTC time>.log
        return fs.cat_file(max(p for p in fs.ls(f"{BUCKET}/{folder}/logs") if f"/{stage}-" in p)).decode()

    logs = {"extract": last_log(study, "extract"), "predict": last_log("cluster/study", "predict")}
    # what the autoscaler said of the lost node, from its own logs on the head (the stage log's copy of its
    # events is checked in the recipe above: "autoscaler: Adding ...")
    said = "".join(p.read_text(errors="replace") for p in cluster.root.rglob("*.log")
                   if p.name in ("monitor.log", "event_AUTOSCALER.log"))
    assert "lost contact with raylet" in said or "Removing 1 nodes of type gpu_worker" in said, said[-3000:]
    preds = pd.read_parquet(f"s3://{BUCKET}/cluster/study/predictions/flaky", storage_options=options["s3"],
                            ignore_prefixes=NOT_FRAMES)
    assert len(preds) == 50 and preds["image_id"].is_unique
    # the retries, per layer, in the extract and predict logs and summary lines
    assert "object-store request(s) retried" in out + labelled.out + labelled.err
    summary = {}
    for stage in ("extract", "predict"):  # the layer that retried: the driver's own line, or the run's summary
        # (which request fails is chance: a run whose retries all fell in its workers has no driver line)
        assert ("retried by botocore" in logs[stage] or "(botocore " in logs[stage]) and "in this run" in logs[stage], \
            logs[stage][-3000:]
        summary[stage] = re.search(r"storage: (\d+) object-store request\(s\) retried \(([^)]*)\) in this run",
                                   logs[stage])
    assert all(summary.values()), summary
    (tmp_path / "retries.json").write_text(json.dumps({"faults": faults, **{k: m.group(0) for k, m in summary.items()}}))


def test_the_recipes_study_equals_a_single_node_run_resumes_from_the_bucket_and_the_workers_go(
        cluster, s3, lifelog, recipe_dir, tmp_path, local_ray):
    """The chain's last step, on the recipe's study in the bucket: its features equal a single-node run's bit for
    bit (the same config on a local Ray in this process, images read from the same bucket), the study resumes from
    its own markers (from this machine, nothing is extracted or fitted again), and every idle worker goes, back
    to min_workers (0). Run last, while the autoscaler lets the bad day's nodes idle out."""
    fs, options = s3
    config = recipe_dir / "cluster-study.yaml"  # the recipe's own file: a copy elsewhere is another config
    study = f"s3://{BUCKET}/cluster/study"
    # the same config on one node (the local Ray the bad day started in this process), images read from the same
    # bucket
    from lifelog_ray.config import load_config
    from lifelog_ray.extract import run_extract
    from lifelog_ray.ingest import build_manifest

    local = load_config(config, {"output.study": str(tmp_path / "single"), "ray.address": "local"})
    local_ray()  # the bad day's (this starts one when the step runs alone)
    build_manifest(local)
    run_extract(local)
    for layer in ("flatten", "fc1", "fc2", "predictions"):
        a, b = features(study, layer, options), features(tmp_path / "single", layer)
        assert list(a.index) == list(b.index)
        assert all(np.array_equal(x, y) for x, y in zip(a["features"], b["features"])), layer
    # the study in the bucket resumes from its own markers: from this machine, nothing is extracted or fitted again
    from lifelog_ray.pipeline import run_study

    again = {r.stage: r.status for r in run_study(load_config(config, {"ray.address": "local"}), ("extract", "classify"))}
    assert again == {"extract": "skipped", "classify": "skipped"}, again
    wait_for_zero_workers(cluster)  # the chain's end: every idle worker goes, back to min_workers (0)
