import os
import runpy

import jax
import numpy as np
import pytest

import train_data
from iap_jax import train
from iap_jax.checkpoints import Checkpointer, restore_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(dataset_dir, **overrides):
    config = runpy.run_path(os.path.join(REPO, "configs", "synthetic_cpu.py"))["get_config"]("runlocal")
    config.dataset_dir = dataset_dir
    config.num_epochs = 2
    config.progress_bar = False
    config.checkpoint.every_steps = 1000
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with train_data.compilation_cache(str(tmp_path_factory.getbasetemp() / "jax_cache")):
        yield


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return train_data.write_dataset(str(tmp_path_factory.mktemp("data")), num_train=64,
                                    num_validation=16)


def test_killed_run_resumes_to_the_same_result(dataset_dir, tmp_path):
    full = train.train_and_evaluate(tiny_config(dataset_dir), str(tmp_path / "full"))
    halted = train.train_and_evaluate(tiny_config(dataset_dir, halt_after_steps=3),
                                      str(tmp_path / "resumed"))
    assert halted["step"] == 3
    resumed = train.train_and_evaluate(tiny_config(dataset_dir), str(tmp_path / "resumed"))
    assert resumed["step"] == full["step"] == 8
    for a, b in zip(jax.tree.leaves(jax.device_get(full["state"])),
                    jax.tree.leaves(jax.device_get(resumed["state"]))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert resumed["validation"] == full["validation"]

    # What a predictor gets back: the best (by validation) or the latest step's model.
    checkpointer = Checkpointer(str(tmp_path / "resumed"), read_only=True)
    assert checkpointer.latest_step() == 8 and checkpointer.best_step() in (4, 8)
    model = restore_model(str(tmp_path / "resumed"), step="latest")
    np.testing.assert_allclose(model["params"]["stem_conv"]["kernel"],
                               full["state"].params["stem_conv"]["kernel"], rtol=1e-6)
    assert model["label_encoding"].head_sizes()["Manufacturer"] >= 2
    assert model["config"]["model"]["name"] == "tiny"
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        assert any("val/mean_top1" in line for line in f)
