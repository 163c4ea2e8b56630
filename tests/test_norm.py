"""The closed-form-gradient BatchNorm against flax's: values, gradients, running statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iap_jax.kernels.norm import BatchNorm
from iap_jax.models.resnet import fold_batch_norms


def _pair(train: bool, dtype=jnp.float32):
    kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    return BatchNorm(**kw), nn.BatchNorm(**kw)


def _inputs(shape=(4, 5, 6, 3)):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), shape)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), shape)
    return x, cotangent


def _with_params(variables):
    # Non-trivial scale and bias, so their gradients and use are both checked.
    params = {"scale": jnp.array([0.5, 2.0, -1.0]), "bias": jnp.array([0.1, -0.2, 0.3])}
    return {**variables, "params": params}


def test_training_values_gradients_and_running_statistics_match_flax():
    x, cotangent = _inputs()
    ours, theirs = _pair(train=True)
    variables = _with_params(theirs.init(jax.random.PRNGKey(2), x))
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(2), x)) == jax.tree.structure(variables)

    def run(module):
        def fn(params, x):
            y, updates = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(y * cotangent), (y, updates)

        (_, (y, updates)), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(
            variables["params"], x)
        return y, updates, grads

    got, want = run(ours), run(theirs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # The running averages moved towards the batch's mean (about 3) and variance (about 4).
    stats = got[1]["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * jnp.mean(x, (0, 1, 2)), rtol=1e-5)
    assert np.all(np.asarray(stats["var"]) > 0.9)


def test_evaluation_uses_running_statistics_like_flax():
    x, _ = _inputs()
    ours, theirs = _pair(train=False)
    variables = _with_params(theirs.init(jax.random.PRNGKey(2), x))
    variables["batch_stats"] = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 0.5, 2.0])}
    np.testing.assert_allclose(ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-6, atol=1e-6)


def test_bfloat16_compute_keeps_float32_statistics():
    x, cotangent = _inputs()
    ours, theirs = _pair(train=True, dtype=jnp.bfloat16)
    variables = ours.init(jax.random.PRNGKey(2), x)
    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert updates["batch_stats"]["mean"].dtype == jnp.float32
    want, _ = theirs.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y.astype(jnp.float32), want.astype(jnp.float32), rtol=2e-2, atol=2e-2)


def test_constant_channel_gives_finite_gradients():
    x = jnp.ones((2, 3, 3, 2)).at[..., 1].set(jax.random.normal(jax.random.PRNGKey(3), (2, 3, 3)))
    module, _ = _pair(train=True)
    variables = module.init(jax.random.PRNGKey(4), x)
    grads = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mutable=["batch_stats"])[0] ** 2))(x)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_rejects_non_image_input():
    module, _ = _pair(train=True)
    with pytest.raises(ValueError, match="NHWC"):
        module.init(jax.random.PRNGKey(0), jnp.ones((4, 3)))


def test_folding_into_the_convolution_gives_the_map_of_evaluation():
    x, _ = _inputs()
    ours, _ = _pair(train=False)
    norm = _with_params(ours.init(jax.random.PRNGKey(2), x))
    norm["batch_stats"] = {"mean": jnp.array([1.0, 2.0, 3.0]), "var": jnp.array([4.0, 0.5, 2.0])}
    conv = nn.Conv(3, (3, 3), use_bias=False)
    kernel = conv.init(jax.random.PRNGKey(3), x)["params"]["kernel"]
    variables = {"params": {"stem_conv": {"kernel": kernel}, "stem_norm": norm["params"],
                            "head": {"kernel": jnp.ones((3, 2))}},
                 "batch_stats": {"stem_norm": norm["batch_stats"]}}
    folded = fold_batch_norms(variables)
    assert jax.tree.map(jnp.shape, folded) == {"params": {
        "stem_conv": {"kernel": (3, 3, 3, 3), "bias": (3,)}, "head": {"kernel": (3, 2)}}}
    want = ours.apply(norm, conv.apply({"params": {"kernel": kernel}}, x))
    got = nn.Conv(3, (3, 3)).apply({"params": folded["params"]["stem_conv"]}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
