"""cluster.yaml validates against Ray's own schema and keeps the secure defaults the README promises."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema_and_is_secure():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["available_node_types"]["head"]["resources"] == {"CPU": 0}  # the head does no work
    image = cfg["docker"]["image"]
    assert image.startswith("rayproject/ray:") and "ray-ml" not in image
    assert ray.__version__ in image  # the image's Ray matches the pinned client
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts  # dashboard/job API only through the SSH tunnel
    assert "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    assert "/home/ray/.ray/auth_token" in cfg["file_mounts"]


def test_shipped_configs_are_valid():
    from lifelog_ray.config import load_config

    for path in sorted((ROOT / "jobs" / "configs").glob("*.yaml")):
        if path.name.startswith("search_space"):
            from lifelog_ray.classify.estimators import load_search_space

            load_search_space(path, ["svm", "random_forest", "naive_bayes", "xgboost", "bayesian_ridge"])
        else:
            load_config(path)
