"""Lifelogs and studies on object storage: s3:// paths against a local S3 endpoint (moto's server). The whole study
on S3 (every stage, predict, a resume from the bucket's markers) is the cloud recipe's, in test_cluster.py."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from helpers import study_config
from upath import UPath

from lifelog_ray import storage
from lifelog_ray.config import StudyConfig
from lifelog_ray.ingest import build_manifest


def _on_s3(cfg: StudyConfig, options: dict, **paths: str) -> StudyConfig:
    d = cfg.model_dump()
    for key, value in paths.items():
        section, name = key.split("__")
        d[section][name] = value
    d["storage"]["options"] = options
    d["predict"]["images"] = None  # predict runs below, on images in the bucket
    return StudyConfig.model_validate(d)


def test_storage_helpers_on_s3_and_local(s3, tmp_path):
    fs, options = s3
    base = storage.to_path("s3://lifelog/helpers", options)
    assert storage.is_remote(base) and isinstance(base, UPath)
    assert type(storage.to_path(str(tmp_path))) is type(Path())  # local stays a plain pathlib.Path
    assert storage.to_path(f"file://{tmp_path}") == tmp_path
    storage.write_bytes_atomic(b"one", base / "a" / "1.txt")
    storage.write_table_atomic(pa.table({"x": [1, 2, 3]}), base / "b" / "t.parquet")
    assert [storage.relative(f, base) for f in storage.files(base)] == ["a/1.txt", "b/t.parquet"]
    assert storage.read_parquet(base / "b" / "t.parquet")["x"].tolist() == [1, 2, 3]
    assert storage.read_bytes("s3://lifelog/helpers/a/1.txt", options) == b"one"
    storage.write_bytes_atomic(b"two", base / "a" / "2.txt")
    (tmp_path / "3.txt").write_bytes(b"three")
    assert storage.read_many([base / "a" / "2.txt", tmp_path / "3.txt", base / "a" / "1.txt"]) == [
        b"two", b"three", b"one"]  # in order, local and remote mixed
    with storage.local_copy(base / "a") as local:
        assert (local / "1.txt").read_bytes() == b"one"
    storage.rmtree(base)
    assert not fs.exists("lifelog/helpers/a/1.txt")
    with pytest.raises(storage.StorageError, match="nosuchfs://"):
        storage.to_path("nosuchfs://bucket/x")
    if importlib.util.find_spec("gcsfs") is None:  # the `cloud` extra is not installed: say which package
        with pytest.raises(storage.StorageError, match=r"lifelog-ray\[cloud\].*gcsfs"):
            storage.to_path("gs://bucket/study")


def test_ingest_from_s3_matches_local_and_rejects_paths_outside_the_root(s3, sample_lifelog, tmp_path):
    fs, options = s3
    fs.put(f"{sample_lifelog}/", "lifelog/ingest/raw/", recursive=True)
    labels = pd.read_csv(sample_lifelog / "labels.csv", dtype=str)
    extra = pd.DataFrame({"image_path": ["../other/20160815_090000_000.jpg", "2016-08-15/nope.jpg",
                                         "s3://lifelog/elsewhere/x.jpg"], "label": ["Eating"] * 3})
    with fs.open("lifelog/ingest/raw/labels.csv", "w") as f:
        pd.concat([labels, extra], ignore_index=True).to_csv(f, index=False)
    fs.pipe("lifelog/ingest/other/20160815_090000_000.jpg", b"not read")

    local = build_manifest(study_config(sample_lifelog, tmp_path / "local"))
    cfg = _on_s3(study_config(sample_lifelog, tmp_path / "s"), options, data__root="s3://lifelog/ingest/raw",
                 data__labels="s3://lifelog/ingest/raw/labels.csv")
    remote = build_manifest(cfg)

    assert remote.input_rows == local.input_rows + 3
    assert len(remote.manifest) + len(remote.rejects) == remote.input_rows
    cols = ["image_id", "label", "split", "day", "rel_path"]
    pd.testing.assert_frame_equal(remote.manifest[cols], local.manifest[cols])  # same images, same splits
    assert remote.manifest["path"].str.startswith("s3://lifelog/ingest/raw/").all()
    rej = remote.rejects.set_index("path")["reason"]
    new = rej[rej.index.isin(extra["image_path"])].to_dict()
    assert new == {"../other/20160815_090000_000.jpg": "path_outside_root", "2016-08-15/nope.jpg": "missing_file",
                   "s3://lifelog/elsewhere/x.jpg": "path_outside_root"}


def test_cli_reads_a_lifelog_on_s3_with_storage_options_from_set(s3, sample_lifelog, tmp_path, capsys):
    from lifelog_ray.cli import main

    fs, options = s3
    fs.put(f"{sample_lifelog}/", "lifelog/cli/raw/", recursive=True)
    sets = [f"storage.options.s3.{k}={v}" for k, v in options["s3"].items()]
    argv = ["manifest", "--root", "s3://lifelog/cli/raw", "--labels", "s3://lifelog/cli/raw/labels.csv",
            "--study", "s3://lifelog/cli/study", "--top-k", "5"]
    assert main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0
    assert re.search(r"input rows: \d+ = manifest \d+ \+ rejects", capsys.readouterr().out)
    assert fs.exists("lifelog/cli/study/manifest.parquet")
    (log,) = fs.glob("lifelog/cli/study/logs/manifest-*.log")  # the stage's log, uploaded at its end
    assert "INFO lifelog_ray.ingest" in fs.cat(log).decode()
    assert main([*argv, "--set", "storage.options.s3.endpoint_url=http://127.0.0.1:9"]) == 2  # nothing listens
    assert "error: cannot use the storage location" in capsys.readouterr().err


def test_a_checkpoint_from_before_named_weights_is_refused_in_a_bucket(s3):
    from lifelog_ray import storage as st
    from lifelog_ray.errors import LifelogError
    from lifelog_ray.finetune import refuse_old_checkpoints

    fs, options = s3
    run = "lifelog/old-run/study/finetune/_ray/vgg19-m1-abc"
    fs.pipe(f"{run}/checkpoint_1/state.json", json.dumps({"epoch": 1}).encode())  # no checkpoint_format
    fs.pipe(f"{run}/checkpoint_manager_snapshot.json",
            json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}).encode())
    with pytest.raises(LifelogError, match="older lifelog-ray"):
        refuse_old_checkpoints(st.to_path(f"s3://{run}", options))


def test_a_flaky_store_is_retried_by_botocore_and_s3fs_and_every_retry_is_counted(s3):
    """Through a proxy that fails a share of requests (503 SlowDown, dropped before or after moto saw them):
    reads and writes still come back whole, a missing key is still missing, and the retries are counted per
    layer, as the stage logs report them."""
    from flaky_s3 import FlakyS3

    from lifelog_ray.images import read_error

    fs, options = s3
    host = options["s3"]["endpoint_url"].split("//", 1)[1]
    with FlakyS3(host, rate=0.3, seed=1) as proxy:
        flaky = {"s3": {**options["s3"], "endpoint_url": proxy.endpoint}}
        before = storage.retry_counts()
        base = storage.to_path("s3://lifelog/flaky-unit", flaky)
        blobs = {f"f{i}.bin": bytes([i]) * (1000 + i) for i in range(30)}
        for name, data in blobs.items():
            storage.write_bytes_atomic(data, base / name)
        paths = [f"s3://lifelog/flaky-unit/{n}" for n in blobs] + ["s3://lifelog/flaky-unit/missing.bin"]
        got = storage.read_each(paths, flaky)
        # and a read sized by a HEAD (open, then read), as leases and markers are read
        assert storage.to_path(paths[0], flaky).read_bytes() == blobs["f0.bin"]
        retried = storage.retried_since(before)
        faults = sum(proxy.counts[f] for f in ("slowdown", "drop_before", "drop_after"))
    assert got[:-1] == list(blobs.values())  # one concurrent batch of GETs, every file whole
    assert isinstance(got[-1], FileNotFoundError) and read_error(paths[-1], got[-1])[0] == "missing_file"
    # every 503 is an answer botocore (or, once its attempts are spent, s3fs) retries; a dropped connection may
    # also be retried below them (aiohttp), unseen, so the drops bound nothing
    assert faults >= 10 and retried["botocore"] >= 1, (proxy.counts, retried)
    assert sum(retried.values()) >= proxy.counts["slowdown"], (proxy.counts, retried)
    assert storage.describe_retries(retried).startswith(f"{sum(retried.values())} object-store request(s) retried")
    # a store that keeps failing is not a bad image: the task fails (and the run resumes), no reject
    with pytest.raises(storage.StorageError, match="failed after its retries.*rerun"):
        read_error(paths[0], OSError("SlowDown"))
    assert read_error("/local/x.jpg", OSError("EIO"))[0] == "unreadable"
