"""Ray Train's TensorFlow backend, importable without TensorFlow.

`ray.train.tensorflow.TensorflowConfig` lives in a package whose `__init__` imports TensorFlow, so the Ray
Train controller that unpickles it spends ~4 s importing TensorFlow before it starts a single worker, in every
fine-tuning run (the workers import it anyway). This is the same backend, defined where importing it costs
nothing: each worker gets the `TF_CONFIG` that `MultiWorkerMirroredStrategy` reads, as Ray's own does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ray.train.backend import Backend, BackendConfig


def _set_tf_config(worker_addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})
    os.environ["TF_USE_LEGACY_KERAS"] = "1"


def _address() -> str:
    from ray._common.network_utils import build_address
    from ray.train._internal.utils import get_address_and_port

    return build_address(*get_address_and_port())


class _Backend(Backend):
    def on_start(self, worker_group, backend_config: TFConfig) -> None:
        import ray

        urls = worker_group.execute(_address)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, worker_addresses=urls, index=i)
                 for i in range(len(worker_group))])


@dataclass
class TFConfig(BackendConfig):
    """Pass as `TensorflowTrainer(..., tensorflow_config=TFConfig())`."""

    @property
    def backend_cls(self):
        return _Backend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TENSORFLOW
