import json
import os
import sys

import jax
import numpy as np
import pytest

from iap_jax.io.checkpoints import restore_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import local_multiprocess  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_two_processes_train_and_checkpoint(train_dataset_dir, tmp_path):
    dataset_dir = train_dataset_dir
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    codes = local_multiprocess.launch(2, [
        f"--config={REPO}/configs/synthetic_cpu.py:runlocal", f"--workdir={workdir}",
        f"--config.dataset_dir={dataset_dir}", "--config.progress_bar=False"], env=env, timeout=300)
    assert codes == [0, 0]
    steps = sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit())
    assert steps and steps[-1] == 4  # 64 examples, global batch 16, one epoch
    with open(workdir / "metrics.jsonl") as f:  # written once, by process 0
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "val/mean_top1" in r] == [4]
    assert [r["step"] for r in rows if "train/loss" in r] == [4]

    # The checkpoint both processes wrote is one model, restorable here in one process.
    model = restore_model(str(workdir), step="latest")
    assert model["step"] == 4
    for leaf in jax.tree.leaves(model["params"]):
        assert np.all(np.isfinite(np.asarray(leaf)))
