"""Where the work runs (lifelog_ray/placement.py): the plan comes from what the cluster can become, on a laptop, a
fixed `ray start` cluster and an autoscaling one, with one-line errors for what can never fit. No Ray needed."""

from __future__ import annotations

import pytest
import yaml
from helpers import ROOT

from lifelog_ray.config import ConfigError, load_config
from lifelog_ray.errors import LifelogError
from lifelog_ray.placement import ClusterShape, NodeType, check_capacity, node_types_from_config, plan_actors

HEAD0 = {"CPU": 0.0, "node:__internal_head__": 1.0}  # cluster.yaml's head: it does no work


def laptop(cpus: float = 2, gpus: float = 0) -> ClusterShape:
    return ClusterShape(({"CPU": cpus, "GPU": gpus, "node:__internal_head__": 1.0},))


def cloud(gpu_max: int = 8, cpu_max: int = 8, cap: int | None = 8) -> ClusterShape:
    """cluster.yaml as its autoscaler reads it, with nothing but the head up."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workers"] = gpu_max
    config["available_node_types"]["cpu_worker"]["max_workers"] = cpu_max
    config["max_workers"] = cap
    types, cap_ = node_types_from_config(config)
    return ClusterShape((HEAD0,), types, cap_, "cluster.yaml")


def test_auto_on_a_laptop_and_a_fixed_cluster_uses_what_is_up():
    p = plan_actors("auto", None, 1.0, laptop(cpus=8))
    assert (p.device, p.min_actors, p.max_actors) == ("cpu", 4, 4)  # one actor per 2 CPUs, the rest decode
    p = plan_actors("auto", None, 1.0, laptop(cpus=16, gpus=2))
    assert (p.device, p.min_actors, p.max_actors, p.num_gpus) == ("gpu", 2, 2, 1.0)  # one per GPU
    fixed = ClusterShape(({"CPU": 0.0, "node:__internal_head__": 1.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}))
    p = plan_actors("auto", None, 2.0, fixed)
    assert (p.device, p.min_actors, p.max_actors) == ("gpu", 2, 2) and fixed.kind == "fixed"
    assert plan_actors("cpu", None, 1.0, fixed).device == "cpu"  # device cpu: never a GPU
    assert plan_actors("auto", 3, 1.0, laptop(cpus=8)).max_actors == 3


def test_auto_on_an_autoscaling_cluster_plans_for_what_it_can_become():
    shape = cloud()
    assert shape.autoscaling and shape.now("GPU") == 0 and shape.now("CPU") == 0  # only the head is up
    p = plan_actors("auto", None, 1.0, shape)
    # GPU actors, a pool from 1 to one per GPU node the autoscaler may start
    assert (p.device, p.min_actors, p.max_actors, p.bundle) == ("gpu", 1, 8, {"GPU": 1.0, "CPU": 1.0})
    assert plan_actors("auto", (2, 4), 1.0, shape).strategy().min_size == 2
    # the cluster's max_workers caps the nodes: the roomiest types are counted first
    assert cloud(cap=3).capacity({"GPU": 1.0}) == 3 and cloud(cap=3).capacity({"CPU": 1.0}) == 3 * 16
    assert cloud(gpu_max=0).capacity({"GPU": 1.0}) == 0
    p = plan_actors("auto", None, 1.0, cloud(gpu_max=0))
    assert p.device == "cpu" and (p.min_actors, p.max_actors) == (1, 64)  # 8 x 16 CPUs, one actor per 2


def test_what_can_never_fit_is_a_one_line_error():
    with pytest.raises(LifelogError, match="extract.device gpu: .*no node with a GPU") as e:
        plan_actors("gpu", None, 1.0, laptop())
    assert "\n" not in str(e.value)
    with pytest.raises(LifelogError, match="extract.num_actors 5: .*at most 2"):
        plan_actors("auto", 5, 1.0, laptop(cpus=16, gpus=2))
    with pytest.raises(LifelogError, match="no node .* can hold a model actor of {CPU: 32}"):
        plan_actors("cpu", None, 32.0, cloud())
    # fine-tuning on cluster.yaml from zero: judged on what the autoscaler can add, not on the CPU-less head
    check_capacity(cloud(), {"CPU": 4.0, "GPU": 1.0}, 4, "finetune", spare_cpus=0.5)
    with pytest.raises(LifelogError, match="finetune: 9 worker.*room for 8"):
        check_capacity(cloud(), {"CPU": 4.0, "GPU": 1.0}, 9, "finetune")
    with pytest.raises(LifelogError, match="leave no CPU for decoding"):
        check_capacity(laptop(cpus=2), {"CPU": 2.0}, 1, "finetune", spare_cpus=0.5)


def test_node_types_need_their_resources_declared(caplog):
    config = {"head_node_type": "head", "max_workers": 4,
              "available_node_types": {"head": {"resources": {"CPU": 0}},
                                       "gpu": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 1, "max_workers": 4},
                                       "mystery": {"resources": {}, "max_workers": 2}}}
    types, cap = node_types_from_config(config)
    assert [t.name for t in types] == ["gpu"] and types[0] == NodeType("gpu", {"CPU": 8.0, "GPU": 1.0}, 1, 4)
    assert cap == 4 and "mystery declares no CPU/GPU" in caplog.text
    # cluster.yaml declares them, so its autoscaler and lifelog-ray know each worker's shape
    names = {t.name: t.resources for t in cloud().node_types}
    assert names == {"gpu_worker": {"CPU": 8.0, "GPU": 1.0}, "cpu_worker": {"CPU": 16.0}}


def test_num_actors_and_device_keys():
    assert load_config(None, {"extract.num_actors": "1,4"}).extract.num_actors == (1, 4)
    assert load_config(None, {"extract.num_actors": [3, 3]}).extract.num_actors == 3
    for bad, msg in (("4,1", "1 <= min <= max"), ([0, 2], "1 <= min <= max"), ("two", "N or MIN,MAX")):
        with pytest.raises(ConfigError, match=msg) as e:
            load_config(None, {"extract.num_actors": bad})
        assert str(e.value).count("\n") == 0 and "extract.num_actors" in str(e.value)
    with pytest.raises(ConfigError, match="extract.device"):
        load_config(None, {"extract.device": "tpu"})
