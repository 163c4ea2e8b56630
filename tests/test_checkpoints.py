import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from train_data import tiny_config

from iap_jax.io.checkpoints import restore_model
from iap_jax.training import train

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAIN_ON_FOUR_DEVICES = textwrap.dedent("""
    import sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from iap_jax.training import train
    from train_data import tiny_config
    dataset_dir, workdir = sys.argv[1:3]
    assert len(jax.devices()) == 4
    config = tiny_config(dataset_dir, num_epochs=2, halt_after_steps=4)  # stopped half way
    config.mesh.data, config.mesh.fsdp = 2, 2
    config.sharding.tactic, config.sharding.fsdp_min_size = "fsdp", 0
    result = train.train_and_evaluate(config, workdir)
    kernel = result["state"].params["stem_conv"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec), kernel.sharding
    np.save(workdir + "/stem_kernel.npy", np.asarray(kernel))
""")


@pytest.mark.usefixtures("compiled_programs_cache")
def test_checkpoint_from_four_device_fsdp_mesh_restores_on_one_device(train_dataset_dir, tmp_path):
    dataset_dir = train_dataset_dir
    workdir = str(tmp_path / "run")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", TRAIN_ON_FOUR_DEVICES, dataset_dir, workdir],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = np.load(os.path.join(workdir, "stem_kernel.npy"))

    model = restore_model(workdir)
    np.testing.assert_array_equal(np.asarray(model["params"]["stem_conv"]["kernel"]), expected)
    assert len(model["params"]["stem_conv"]["kernel"].sharding.device_set) == 1

    # The whole training state resumes on this (1-device) process and trains to the end.
    resumed = train.train_and_evaluate(tiny_config(dataset_dir, num_epochs=2), workdir)
    assert resumed["step"] == 8
