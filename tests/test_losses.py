import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iap_jax.core.labels import HeadEncoding, LabelEncoding
from iap_jax.training import losses

ENC = LabelEncoding((HeadEncoding("Manufacturer", "categorical", classes=("A", "B", "C")),
                     HeadEncoding("FlipAngle", "categorical", classes=("10", "12")),
                     HeadEncoding("EchoTime", "continuous", transform="log", mean=1.0, std=0.5)))


def _inputs():
    rng = np.random.default_rng(0)
    outputs = {"Manufacturer": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
               "FlipAngle": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
               "EchoTime": jnp.asarray(rng.normal(size=(4, 1)), jnp.float32)}
    targets = {"Manufacturer": jnp.array([0, 2, 1, 99]),  # 99: garbage under a zero mask
               "FlipAngle": jnp.array([0, 1, 0, 1]),
               "EchoTime": jnp.array([0.5, jnp.nan, -1.0, 2.0])}
    masks = {"Manufacturer": jnp.array([1.0, 1.0, 1.0, 0.0]),
             "FlipAngle": jnp.zeros(4),  # the whole head is missing
             "EchoTime": jnp.array([1.0, 0.0, 1.0, 1.0])}
    return outputs, targets, masks


def test_masked_loss_values_match_manual():
    outputs, targets, masks = _inputs()
    total, per_head = losses.make_loss_fn(ENC, weights={"EchoTime": 2.0})(outputs, targets, masks)
    logp = jax.nn.log_softmax(np.asarray(outputs["Manufacturer"]))
    expected_ce = -np.mean([logp[0, 0], logp[1, 2], logp[2, 1]])
    pred = np.asarray(outputs["EchoTime"])[:, 0]
    expected_mse = np.mean(np.square(pred[[0, 2, 3]] - np.array([0.5, -1.0, 2.0])))
    assert per_head["Manufacturer"] == pytest.approx(expected_ce, rel=1e-5)
    assert per_head["FlipAngle"] == 0.0
    assert per_head["EchoTime"] == pytest.approx(expected_mse, rel=1e-5)
    assert total == pytest.approx(expected_ce + 2 * expected_mse, rel=1e-5)


def test_missing_labels_give_zero_gradient_and_no_nan():
    outputs, targets, masks = _inputs()
    loss_fn = losses.make_loss_fn(ENC, huber_delta=1.0)
    grads = jax.grad(lambda o: loss_fn(o, targets, masks)[0])(outputs)
    for name, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), name
    np.testing.assert_array_equal(grads["FlipAngle"], 0.0)
    np.testing.assert_array_equal(grads["Manufacturer"][3], 0.0)
    np.testing.assert_array_equal(grads["EchoTime"][1], 0.0)
    assert np.abs(np.asarray(grads["Manufacturer"][:3])).sum() > 0


def test_paper_mode_needs_raw_targets_and_ignores_weights():
    with pytest.raises(ValueError, match="raw"):
        losses.make_loss_fn(ENC, mode="paper")
    raw = LabelEncoding(ENC.heads[:2] + (HeadEncoding("EchoTime", "continuous", transform="raw"),))
    outputs, targets, masks = _inputs()
    total, per_head = losses.make_loss_fn(raw, mode="paper", weights={"EchoTime": 5.0},
                                          huber_delta=1.0)(outputs, targets, masks)
    assert total == pytest.approx(sum(float(v) for v in per_head.values()), rel=1e-6)
    with pytest.raises(ValueError, match="unknown loss mode"):
        losses.make_loss_fn(ENC, mode="l1")
