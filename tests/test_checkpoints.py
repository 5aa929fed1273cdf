"""Fine-tuning checkpoints restore by layer and weight name: frozen weights stay initial, trainable ones and
the optimizer's state come back exactly, and anything that does not fit is refused before it is assigned."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lifelog_ray import checkpoints
from lifelog_ray.backbones import BackboneSpec, legacy_keras_module
from lifelog_ray.errors import LifelogError
from lifelog_ray.finetune import build_method_model, refuse_old_checkpoints, replica_steps

SIZE = 32
METHODS = ["m1", "m2", "m3"]


def _initial_weights(keras) -> list[np.ndarray]:
    """The backbone's weights as the driver hands them to every worker (seeded, all layers trainable)."""
    keras.utils.set_random_seed(7)
    app = keras.applications.VGG19(include_top=True, weights=None, input_shape=(SIZE, SIZE, 3))
    return app.get_weights()


def _compiled(keras, method: str, weights, seed: int):
    keras.utils.set_random_seed(seed)
    spec = BackboneSpec("vgg19", ("fc2",), "none", SIZE)
    model = build_method_model(keras, spec, method, 4, weights, m2_trainable_layers=8, m3_units=16)
    opt = keras.optimizers.SGD(learning_rate=0.05, momentum=0.9)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    opt.build(model.trainable_variables)
    return model, opt


@pytest.fixture(scope="module")
def keras():
    return legacy_keras_module()  # what the Ray Train workers train with


@pytest.fixture(scope="module")
def initial(keras):
    return _initial_weights(keras)


@pytest.mark.parametrize("method", METHODS)
def test_restore_is_exact_by_name(keras, initial, method, tmp_path):
    trained, opt = _compiled(keras, method, initial, seed=1)
    frozen_before = {k: v.numpy().copy() for k, v in checkpoints.model_variables(trained, trainable=False).items()}
    x = np.random.default_rng(0).normal(0, 50, (16, SIZE, SIZE, 3)).astype("float32")
    trained.fit(x, np.arange(16) % 4, epochs=2, batch_size=8, verbose=0)
    checkpoints.save(tmp_path / "latest.npz", trained, opt)

    fresh, fresh_opt = _compiled(keras, method, initial, seed=2)  # another seed: new layers start elsewhere
    arrays = checkpoints.load(tmp_path / "latest.npz")
    n = checkpoints.restore(arrays, fresh, fresh_opt)
    assert n == len(arrays)
    checked = checkpoints.verify(fresh, frozen_before, arrays)
    assert checked["frozen"] > 0 and checked["trainable"] > 0
    # Every frozen weight is the initial one, every trainable one is the trained one, bit for bit.
    for k, v in checkpoints.model_variables(fresh, trainable=False).items():
        assert np.array_equal(v.numpy(), frozen_before[k]), k
    ref = checkpoints.model_variables(trained, trainable=True)
    for k, v in checkpoints.model_variables(fresh, trainable=True).items():
        assert np.array_equal(v.numpy(), ref[k].numpy()), k
    ref_opt = checkpoints.optimizer_variables(opt)
    for k, v in checkpoints.optimizer_variables(fresh_opt).items():
        assert np.array_equal(v.numpy(), ref_opt[k].numpy()), k
    assert int(checkpoints.optimizer_variables(fresh_opt)["iteration"].numpy()) == 4


def test_same_shaped_kernels_go_to_their_own_layers(keras, initial):
    """VGG's block5 kernels share a shape, where a positional restore would swap them silently."""
    model, opt = _compiled(keras, "m2", initial, seed=1)
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(size=v.shape).astype(v.dtype.as_numpy_dtype)
              for k, v in {**{f"model/{k}": v for k, v in checkpoints.model_variables(model, True).items()},
                           **{f"optimizer/{k}": v for k, v in checkpoints.optimizer_variables(opt).items()}}.items()}
    a, b = "model/block5_conv2/kernel", "model/block5_conv3/kernel"
    assert arrays[a].shape == arrays[b].shape == (3, 3, 512, 512)
    reordered = dict(reversed(list(arrays.items())))  # the file's order must not matter
    checkpoints.restore(reordered, model, opt)
    got = checkpoints.model_variables(model, trainable=True)
    assert np.array_equal(got["block5_conv2/kernel"].numpy(), arrays[a])
    assert np.array_equal(got["block5_conv3/kernel"].numpy(), arrays[b])


@pytest.mark.parametrize("damage", ["missing", "extra", "shape"])
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_assignment(keras, initial, damage):
    model, opt = _compiled(keras, "m1", initial, seed=1)
    arrays = checkpoints.named_arrays(model, opt)
    arrays = {k: np.zeros_like(v) for k, v in arrays.items()}
    if damage == "missing":
        arrays.pop("model/predictions_lifelog/bias")
    elif damage == "extra":
        arrays["model/fc9/kernel"] = np.zeros((2, 2), "float32")
    else:
        arrays["model/predictions_lifelog/kernel"] = np.zeros((4, 4096), "float32")  # transposed
    before = model.get_layer("predictions_lifelog").get_weights()[0].copy()
    with pytest.raises(checkpoints.CheckpointError, match="does not match|shapes do not match"):
        checkpoints.restore(arrays, model, opt)
    assert np.array_equal(model.get_layer("predictions_lifelog").get_weights()[0], before)


def test_verify_catches_a_frozen_weight_that_moved(keras, initial):
    model, _ = _compiled(keras, "m1", initial, seed=1)
    frozen = {k: v.numpy().copy() for k, v in checkpoints.model_variables(model, trainable=False).items()}
    arrays = checkpoints.named_arrays(model)
    model.get_layer("block1_conv1").weights[0].assign_add(np.ones((3, 3, 3, 64), "float32"))
    with pytest.raises(checkpoints.CheckpointError, match="block1_conv1/kernel differs from its initial"):
        checkpoints.verify(model, frozen, arrays)


def test_a_checkpoint_from_before_named_weights_is_refused(tmp_path):
    run = tmp_path / "vgg19-m2-abc"
    old = run / "checkpoint_2026-01-01_00-00-00.000000"
    old.mkdir(parents=True)
    (old / "latest.weights.h5").write_bytes(b"positional")
    (old / "state.json").write_text(json.dumps({"epoch": 1, "history": []}))  # no checkpoint_format
    (run / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": old.name}}))
    with pytest.raises(LifelogError, match=r"older lifelog-ray .*Delete .*vgg19-m2-abc"):
        refuse_old_checkpoints(run)
    (old / "state.json").write_text(json.dumps({"checkpoint_format": checkpoints.FORMAT, "epoch": 1}))
    refuse_old_checkpoints(run)  # a current checkpoint resumes
    refuse_old_checkpoints(tmp_path / "never-started")  # and a new run starts


@pytest.mark.parametrize("n,workers,batch,steps", [(34, 2, 16, 3), (35, 2, 16, 3), (32, 1, 16, 2), (5, 4, 4, 2)])
def test_replica_steps_bound_every_worker(n, workers, batch, steps):
    assert replica_steps(n, workers, batch) == steps
    per_worker = -(-n // workers)
    assert replica_steps(n, workers, batch) * max(1, batch // workers) >= per_worker


def test_a_resumed_run_reads_only_the_state_file_of_a_checkpoint_in_a_bucket(s3, tmp_path):
    """Which job a checkpoint is of comes from its state file alone, read where the checkpoint lies (S3 here):
    the weights beside it are not downloaded for that (the restore fetches them, once)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from ray.train import Checkpoint

    from lifelog_ray.finetune import checkpoint_state

    fs, _ = s3
    state = {"checkpoint_format": checkpoints.FORMAT, "job": "vgg19-m3-abc", "epoch": 1}
    fs.pipe("lifelog/ckpt-state/checkpoint_1/" + checkpoints.STATE, json.dumps(state).encode())
    fs.pipe("lifelog/ckpt-state/checkpoint_1/" + checkpoints.LATEST, b"not read")
    counted = []
    cat = fs.open

    def opened(path, *a, **kw):  # what this read opens in the bucket
        counted.append(path)
        return cat(path, *a, **kw)

    fs.open = opened
    try:
        ckpt = Checkpoint("lifelog/ckpt-state/checkpoint_1", PyFileSystem(FSSpecHandler(fs)))
        assert checkpoint_state(ckpt) == state
    finally:
        del fs.open
    assert counted and all(p.endswith(checkpoints.STATE) for p in counted), counted
