"""Fine-tuning checkpoints keyed by variable identity (layer name + weight name), never by position.

tf-keras' own ``.weights.h5`` format names a layer by its class and a counter (``conv2d_7``) in the
order an attribute walk meets it, so two same-shaped kernels can trade places without an error.
Here every array is stored under ``model/<layer>/<weight>`` or ``optimizer/<variable>``; a restore
checks the key sets match exactly and every shape agrees before it assigns anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LifelogError

FORMAT = 2  # state.json's "checkpoint_format"; checkpoints without it hold tf-keras .weights.h5 files
STATE = "state.json"
LATEST = "latest.npz"
BEST = "best.npz"


class CheckpointError(LifelogError):
    """A checkpoint that cannot be restored into this model: wrong layout, keys or shapes."""


def _short(var: Any) -> str:
    return var.name.split(":")[0].rsplit("/", 1)[-1]


def _layers(layer: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for sub in layer.layers:
        if hasattr(sub, "layers") and sub.layers:  # a nested model: its layers under its own name
            out += _layers(sub, f"{prefix}{sub.name}/")
        else:
            out.append((prefix + sub.name, sub))
    return out


def model_variables(model: Any, trainable: bool | None = None) -> dict[str, Any]:
    """``layer/weight`` -> variable, for all weights (None), or only the (non-)trainable ones."""
    out: dict[str, Any] = {}
    for name, layer in _layers(model):
        ws = layer.weights if trainable is None else (layer.trainable_weights if trainable
                                                      else layer.non_trainable_weights)
        for v in ws:
            key = f"{name}/{_short(v)}"
            if key in out:
                raise CheckpointError(f"two weights of {model.name} share the name {key}")
            out[key] = v
    return out


def optimizer_variables(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state by variable name (``iteration``, ``m/fc1/kernel``, ...); it must be built."""
    out: dict[str, Any] = {}
    for v in optimizer.variables:
        key = v.name.split(":")[0]
        if key in out:
            raise CheckpointError(f"two optimizer variables share the name {key}")
        out[key] = v
    return out


def named_arrays(model: Any, optimizer: Any = None, trainable: bool | None = True) -> dict[str, np.ndarray]:
    arrays = {f"model/{k}": np.asarray(v.numpy()) for k, v in model_variables(model, trainable).items()}
    if optimizer is not None:
        arrays.update({f"optimizer/{k}": np.asarray(v.numpy()) for k, v in optimizer_variables(optimizer).items()})
    return arrays


def save(path: Path, model: Any, optimizer: Any = None) -> None:
    """The trainable weights (and the optimizer's state): the frozen ones come from the initial weights."""
    np.savez(path, **named_arrays(model, optimizer))


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def assign(arrays: dict[str, np.ndarray], targets: dict[str, Any], what: str) -> int:
    """Assign each array to the variable of the same name; refuse, before assigning anything, when a
    key is missing or extra or a shape differs. Returns the number of variables assigned."""
    missing, extra = sorted(set(targets) - set(arrays)), sorted(set(arrays) - set(targets))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not match {what}: missing {missing[:5]}, "
                              f"unexpected {extra[:5]} ({len(missing)} missing, {len(extra)} unexpected)")
    wrong = [f"{k}: {tuple(arrays[k].shape)} vs {tuple(v.shape)}" for k, v in targets.items()
             if tuple(arrays[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"checkpoint shapes do not match {what}: {wrong[:5]}")
    for k, v in targets.items():
        v.assign(arrays[k])
    return len(targets)


def restore(arrays: dict[str, np.ndarray], model: Any, optimizer: Any = None) -> int:
    """Assign ``arrays`` by name into the model's trainable weights (and the built optimizer's state)."""
    targets = {f"model/{k}": v for k, v in model_variables(model, trainable=True).items()}
    if optimizer is not None:
        targets.update({f"optimizer/{k}": v for k, v in optimizer_variables(optimizer).items()})
    return assign(arrays, targets, model.name)


def copy_weights(src: Any, dst: Any) -> int:
    """Every weight of ``src`` into the same-named weight of ``dst`` (e.g. tf-keras -> Keras 3)."""
    arrays = {k: np.asarray(v.numpy()) for k, v in model_variables(src).items()}
    return assign(arrays, model_variables(dst), dst.name)


def verify(model: Any, initial: dict[str, np.ndarray], restored: dict[str, np.ndarray]) -> dict[str, int]:
    """After a restore: every frozen weight equals the initial one and every trainable weight the
    checkpoint's, exactly. Raises on the first difference; returns how many of each were checked."""
    frozen = model_variables(model, trainable=False)
    for k, v in frozen.items():
        if k not in initial:
            raise CheckpointError(f"frozen weight {k} has no initial value to check against")
        if not np.array_equal(v.numpy(), initial[k]):
            raise CheckpointError(f"frozen weight {k} differs from its initial value after the restore")
    trainable = model_variables(model, trainable=True)
    for k, v in trainable.items():
        if not np.array_equal(v.numpy(), restored[f"model/{k}"]):
            raise CheckpointError(f"trainable weight {k} differs from the checkpoint after the restore")
    return {"frozen": len(frozen), "trainable": len(trainable)}


def check_format(state: dict, where: str) -> None:
    """Refuse a checkpoint written before named checkpoints: its positional weights cannot be trusted."""
    if state.get("checkpoint_format") != FORMAT:
        raise CheckpointError(
            f"{where} holds a fine-tuning checkpoint from an older lifelog-ray (format "
            f"{state.get('checkpoint_format', 1)}, which restored weights by position); it cannot be resumed "
            f"safely. Delete {where} to start this run over")


def read_state(d: str | Path) -> dict:
    """``d``: a local folder, or a storage path (a UPath for s3:// and gs://, kept as it is)."""
    folder = Path(d) if isinstance(d, str) else d  # a UPath is not a pathlib.Path: keep it
    return json.loads((folder / STATE).read_text())
