"""Faults during long runs: a killed model actor, a failed write, a huge image. Nothing lost, nothing twice.
(A killed driver: test_concurrency.py, on S3 and in the chaos soak.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from helpers import LAYERS, extract_config, make_study

from lifelog_ray import storage
from lifelog_ray.extract import accounting, read_features, run_extract
from lifelog_ray.ingest import build_manifest
from lifelog_ray.local_cluster import kill_one_below


def _check_exactly_once(study: Path, layers=LAYERS) -> None:
    for layer, a in accounting(study, "vgg19", list(layers)).items():
        assert a["features"] == a["unique"], f"{layer}: an image written twice"
        assert a["manifest"] == a["features"] + a["rejects"], f"{layer}: an image lost"


@pytest.mark.slow  # over ~20 s on 2 cores (tests/README.md: the rule, and the workers' order)
def test_model_actor_killed_mid_extraction(tmp_path, ray_local):
    import ray

    root, _ = make_study(tmp_path, n_per_class=30)
    # 96 px: slow enough that most of the 90 images are still ahead when the first unit is done.
    c = extract_config(tmp_path, root, unit_size=8, batch_size=4, image_size=96)
    build_manifest(c)
    units = tmp_path / "study" / "features" / "vgg19" / "_units"
    killed: list[int] = []

    def killer():  # a model actor of the session's Ray, started in this process (another worker's is not ours)
        deadline = time.time() + 180
        while time.time() < deadline:
            if units.exists() and any(units.glob("*.json")):  # the actor has done real work: kill it now
                pid = kill_one_below(os.getpid(), "FeatureExtractor")
                if pid:
                    killed.append(pid)
                    return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    (summary,) = run_extract(c)
    t.join()
    assert killed, "no model actor was alive after the first unit"
    assert len(list(units.glob("*.json"))) == 12  # 90 images in units of 8 per day
    assert summary.processed == 90
    _check_exactly_once(tmp_path / "study")
    assert ray.is_initialized()


def test_interrupted_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    table = pa.table({"image_id": ["a", "b"], "features": pa.FixedSizeListArray.from_arrays(
        pa.array([1.0, 2.0, 3.0, 4.0], pa.float32()), 2)})
    target = tmp_path / "fc1" / "2016-08" / "unit_p1.parquet"
    real = pq.write_table

    def dies_midway(t, where, **kw):
        Path(where).write_bytes(b"PAR1 half a file")  # bytes on disk, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", dies_midway)
    with pytest.raises(OSError):
        storage.write_table_atomic(table, target)
    assert not target.exists() and list(target.parent.iterdir()) == []
    monkeypatch.setattr(pq, "write_table", real)
    storage.write_table_atomic(table, target)
    assert pd.read_parquet(tmp_path / "fc1").shape == (2, 2)


def test_huge_but_legal_image_is_processed(tmp_path, ray_local):
    from PIL import Image

    root, rows = make_study(tmp_path, n_per_class=3)
    big = root / "2016-08-15" / "20160815_235959_000.jpg"
    Image.new("RGB", (6000, 4000), (90, 140, 200)).save(big, quality=80)  # 24 MP, under PIL's limit
    rows.append(("2016-08-15/20160815_235959_000.jpg", "walking"))
    pd.DataFrame(rows, columns=["image_path", "label"]).to_csv(tmp_path / "labels.csv", index=False)
    c = extract_config(tmp_path, root, layers="predictions")
    build_manifest(c)
    (s,) = run_extract(c)
    assert s.rejected == 0 and s.processed == 10
    ids = read_features(tmp_path / "study", "vgg19", "predictions", ["image_id"]).column("image_id").to_pylist()
    assert "20160815_235959_000" in ids


def test_a_harness_kills_only_below_the_process_it_names():
    """The tests' and benchmarks' actor kill (`kill_one_below`): a process of the same title that is not below the
    named root, such as another pytest worker's Ray, is left alone."""
    import subprocess
    import sys

    from lifelog_ray.local_cluster import kill_one_below

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)", "FakeExtractorTitle"]
    other = subprocess.Popen(sleeper)  # the same title, beside the root rather than below it
    root = subprocess.Popen(["bash", "-c", " ".join(sleeper[:2] + [repr(sleeper[2]), sleeper[3]]) + " & wait $!"])
    try:
        deadline = time.time() + 30
        while (pid := kill_one_below(root.pid, "FakeExtractorTitle")) is None and time.time() < deadline:
            time.sleep(0.05)  # until bash has started its child
        assert pid is not None and pid not in (root.pid, other.pid)
        assert root.wait(timeout=30) == 128 + 9  # its child was SIGKILLed (bash: `wait $!` gives 137)
        assert other.poll() is None  # the one beside it runs on
        assert kill_one_below(root.pid, "FakeExtractorTitle") is None  # nothing of that title is left below it
    finally:
        other.kill()
        root.kill()
