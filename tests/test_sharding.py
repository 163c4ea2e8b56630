import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from iap_jax.core import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_leaf_spec_tactics():
    assert sharding.leaf_spec((3, 3, 8, 16), "replicate", 2) == P()
    assert sharding.leaf_spec((3, 3, 8, 16), "fsdp", 2) == P(None, None, None, "fsdp")
    assert sharding.leaf_spec((3, 3, 8, 6), "fsdp", 4) == P(None, None, "fsdp", None)
    assert sharding.leaf_spec((3, 5), "fsdp", 4) == P()  # nothing divides
    assert sharding.leaf_spec((64,), "fsdp", 2, min_size=1000) == P()
    with pytest.raises(ValueError, match="tactic"):
        sharding.leaf_spec((4,), "zero3", 2)


def test_make_mesh_fills_minus_one_and_rejects_bad_sizes():
    mesh = sharding.make_mesh({"data": -1})
    assert mesh.shape == {"data": len(jax.devices()), "fsdp": 1}
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh({"data": 1, "fsdp": len(jax.devices()) + 1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 1})


MULTI_DEVICE_STEP = textwrap.dedent("""
    import jax, numpy as np
    from iap_jax.core import sharding
    from iap_jax.training import losses, optim
    from iap_jax.core.labels import HeadEncoding, LabelEncoding
    from iap_jax.training.train import make_init_fn, make_train_step
    from iap_jax.models.resnet import make_model
    from iap_jax.core.preprocess import PixelSpec
    import ml_collections
    assert len(jax.devices()) == 4
    enc = LabelEncoding((HeadEncoding("Manufacturer", "categorical", classes=("A", "B", "C")),
                         HeadEncoding("EchoTime", "continuous", transform="zscore")))
    model = make_model("tiny", enc.head_sizes(), width=8)
    tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, weight_decay=1e-4, warmup_steps=0, clip_norm=1.0,
        b1=0.9, b2=0.999)), 10)
    init = make_init_fn(model, tx, 32)
    step_fn = make_train_step(model, tx, losses.make_loss_fn(enc),
                              PixelSpec(stored_size=32, normalisation="percentile"), True)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 65536, (8, 32, 32)).astype(np.uint16),
             "scale": rng.uniform(0.01, 0.1, 8).astype(np.float32),
             "offset": rng.uniform(-10, 10, 8).astype(np.float32),
             "targets": {"Manufacturer": rng.integers(0, 3, 8).astype(np.int32),
                         "EchoTime": rng.normal(size=8).astype(np.float32)},
             "masks": {"Manufacturer": np.ones(8, np.float32),
                       "EchoTime": (np.arange(8) % 2).astype(np.float32)}}

    def run(devices, axes, tactic):
        mesh = sharding.make_mesh(axes, devices=devices)
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        shardings = sharding.tree_shardings(abstract, mesh, tactic)
        state = jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(0))
        step = jax.jit(step_fn, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        for _ in range(2):
            state, logs = step(state, sharding.global_batch(batch, mesh))
        kernel = state.params["stem_conv"]["kernel"]
        return jax.device_get(state), float(logs["loss"]), kernel.sharding

    one, loss_one, _ = run(jax.devices()[:1], {"data": 1}, "replicate")
    for axes, tactic in (({"data": 4}, "replicate"), ({"data": 2, "fsdp": 2}, "fsdp")):
        many, loss_many, kernel_sharding = run(jax.devices(), axes, tactic)
        assert abs(loss_one - loss_many) < 1e-4 * max(1, abs(loss_one)), (axes, loss_one, loss_many)
        diffs = jax.tree.leaves(jax.tree.map(
            lambda a, b: float(np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(a)))), one, many))
        assert max(diffs) < 1e-4, (axes, max(diffs))
        if tactic == "fsdp":
            assert "fsdp" in str(kernel_sharding.spec), kernel_sharding
    print("OK")
""")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_train_step_on_four_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    result = subprocess.run([sys.executable, "-c", MULTI_DEVICE_STEP], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
