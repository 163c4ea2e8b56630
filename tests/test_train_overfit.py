import jax
import ml_collections
import numpy as np
import pytest

from iap_jax.core.labels import HeadEncoding, LabelEncoding
from iap_jax.core.preprocess import PixelSpec, model_input
from iap_jax.models.resnet import make_model
from iap_jax.training import losses, optim
from iap_jax.training.train import make_init_fn, make_train_step


@pytest.mark.slow
def test_tiny_model_overfits_a_small_batch():
    enc = LabelEncoding((HeadEncoding("Manufacturer", "categorical", classes=("A", "B", "C", "D")),
                         HeadEncoding("FlipAngle", "categorical", classes=("10", "12")),
                         HeadEncoding("EchoTime", "continuous", transform="zscore")))
    model = make_model("tiny", enc.head_sizes(), width=8)
    tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
        name="paper", learning_rate=1e-2, weight_decay=0.0, warmup_steps=0, clip_norm=0.0,
        b1=0.9, b2=0.999)), 100)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 65536, (8, 32, 32)).astype(np.uint16),
             "scale": np.full(8, 0.01, np.float32), "offset": np.zeros(8, np.float32),
             "targets": {"Manufacturer": np.arange(8, dtype=np.int32) % 4,
                         "FlipAngle": rng.integers(0, 2, 8).astype(np.int32),
                         "EchoTime": rng.normal(size=8).astype(np.float32)},
             "masks": {"Manufacturer": np.ones(8, np.float32),
                       "FlipAngle": np.zeros(8, np.float32),  # never labelled
                       "EchoTime": np.ones(8, np.float32)}}
    state = jax.jit(make_init_fn(model, tx, 32))(jax.random.PRNGKey(0))
    spec = PixelSpec(stored_size=32)
    step = jax.jit(make_train_step(model, tx, losses.make_loss_fn(enc), spec, False),
                   donate_argnums=0)
    first_loss = None
    for _ in range(80):
        state, logs = step(state, batch)
        first_loss = first_loss if first_loss is not None else float(logs["loss"])
    assert float(logs["loss"]) < 0.1 * first_loss
    assert float(logs["loss/FlipAngle"]) == 0.0
    outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                          model_input(batch["image"], batch["scale"], batch["offset"], spec),
                          train=True, mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(np.argmax(outputs["Manufacturer"], -1),
                                  batch["targets"]["Manufacturer"])
