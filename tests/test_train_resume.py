import json
import re

import jax
import numpy as np
import pytest

from train_data import tiny_config

from iap_jax.io.checkpoints import Checkpointer, restore_model
from iap_jax.training import train

pytestmark = pytest.mark.slow


@pytest.mark.usefixtures("compiled_programs_cache")
def test_killed_run_resumes_to_the_same_result(train_dataset_dir, tmp_path):
    dataset_dir = train_dataset_dir
    full = train.train_and_evaluate(tiny_config(dataset_dir), str(tmp_path / "full"))
    halted = train.train_and_evaluate(tiny_config(dataset_dir, halt_after_steps=3),
                                      str(tmp_path / "resumed"))
    assert halted["step"] == 3
    # As if killed later than its last checkpoint: a row logged past step 3.
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "train/loss": 123.0}) + "\n")
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

    # The rows the halted run logged past its checkpoint were dropped, not repeated.
    with open(tmp_path / "resumed" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    keys = [(row["step"], tuple(sorted(row))) for row in rows]
    assert len(keys) == len(set(keys))
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        assert sorted(keys) == sorted((r["step"], tuple(sorted(r))) for r in map(json.loads, f))

    # Resuming with a config that would change the run is refused, naming the fields.
    with pytest.raises(ValueError, match="batch_size"):
        train.train_and_evaluate(tiny_config(dataset_dir, batch_size=32), str(tmp_path / "resumed"))
    # ... so is any change of the optimiser, the schedule's length or the input settings.
    for key, value, field in (("optim.learning_rate", 0.5, "optim.learning_rate: 0.003 -> 0.5"),
                              ("num_epochs", 3, "num_epochs: 2 -> 3"),
                              ("input.normalisation", "max", "input.normalisation"),
                              ("input.logical_shards", 8, "input.logical_shards: 16 -> 8")):
        config = tiny_config(dataset_dir)
        config.update_from_flattened_dict({key: value})
        with pytest.raises(ValueError, match=re.escape(field)):
            train.train_and_evaluate(config, str(tmp_path / "resumed"))
    # Settings that change no batch may change: the finished run reports again.
    config = tiny_config(dataset_dir)
    config.update_from_flattened_dict({"input.workers": 1, "input.cache": False})
    assert train.train_and_evaluate(config, str(tmp_path / "resumed"))["step"] == 8


@pytest.mark.usefixtures("compiled_programs_cache")
def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(train_dataset_dir, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    # What a run killed after logging step 5 but before committing a checkpoint leaves.
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 5, "train/loss": 9.0}) + "\n")
    train.train_and_evaluate(tiny_config(train_dataset_dir, num_epochs=1), str(workdir))
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    keys = [(row["step"], tuple(sorted(row))) for row in rows]
    assert len(keys) == len(set(keys)) and all(r.get("train/loss") != 9.0 for r in rows)
