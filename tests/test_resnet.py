"""The multi-task ResNet: output shapes, dtypes, conv backends, BatchNorm modes, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from iap_jax.kernels import onednn
from iap_jax.models import factory
from iap_jax.models.factory import make_model
from iap_jax.models.resnet import ResNet, fold_batch_norms

HEADS = {"manufacturer": 3, "flip_angle": 5, "te": 1}


def _images(batch=4, size=32, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, size, size, 1))


def _init(model, x):
    return jax.jit(lambda a: model.init(jax.random.PRNGKey(0), a, train=False))(x)


def test_tiny_outputs_one_float32_group_per_head():
    model = make_model("tiny", HEADS)
    x = _images()
    variables = _init(model, x)
    outputs = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
    assert {k: v.shape for k, v in outputs.items()} == {k: (4, n) for k, n in HEADS.items()}
    assert all(v.dtype == jnp.float32 for v in outputs.values())


def test_the_features_for_out_of_distribution_scores_are_sown_only_when_asked():
    model = make_model("tiny", HEADS, width=4)
    x = _images()
    variables = _init(model, x)
    _, state = jax.jit(lambda v, a: model.apply(v, a, train=False, mutable=["intermediates"]))(
        variables, x)
    features = {k: v[0] for k, v in state["intermediates"].items()}
    # The stem and each stage: channel means then standard deviations; then the pooled ones.
    assert {k: v.shape for k, v in features.items()} == {
        "stage0": (4, 8), "stage1": (4, 8), "stage2": (4, 16), "features": (4, 8)}
    # The pooled features are the last stage's means; standard deviations are not negative.
    np.testing.assert_allclose(features["features"], features["stage2"][:, :8], rtol=1e-5, atol=1e-6)
    assert all(bool(jnp.all(v[:, v.shape[1] // 2:] >= 0)) for k, v in features.items() if k != "features")
    assert float(jnp.max(features["stage2"][:, 8:])) > 0
    # Without the collection asked for: the outputs alone.
    assert set(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)) == set(HEADS)


@pytest.mark.parametrize("name,num_params", [("resnet18", 11_170_000), ("resnet50", 23_500_000)])
def test_full_size_shapes_and_parameter_counts(name, num_params):
    model = make_model(name, HEADS)
    x = jax.ShapeDtypeStruct((2, 224, 224, 1), jnp.float32)
    variables = jax.eval_shape(lambda a: model.init(jax.random.PRNGKey(0), a, train=False), x)
    outputs = jax.eval_shape(lambda v, a: model.apply(v, a, train=False), variables, x)
    assert {k: v.shape for k, v in outputs.items()} == {k: (2, n) for k, n in HEADS.items()}
    count = sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
    # torchvision's ResNet-18/50 on one input channel, minus its 1000-way classifier.
    assert abs(count - num_params) / num_params < 0.01


def test_bf16_compute_keeps_float32_params_and_outputs():
    model = make_model("tiny", HEADS, dtype=jnp.bfloat16)
    x = _images()
    variables = _init(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    outputs, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert all(v.dtype == jnp.float32 and bool(jnp.isfinite(v).all()) for v in outputs.values())


def _loss(model, variables, x, params):
    outputs, updates = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
    )
    return sum(jnp.sum(jnp.sin(v)) for v in outputs.values()), updates


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["cpu_fast", pytest.param("onednn", marks=pytest.mark.skipif(
    not onednn.available(), reason=f"oneDNN: {onednn.unavailable_reason()}"))])
def test_xla_and_cpu_convolutions_agree_on_outputs_and_gradients(impl):
    x = _images(size=40)
    xla_model = make_model("tiny", HEADS, conv_impl="xla")
    fast_model = make_model("tiny", HEADS, conv_impl=impl)
    variables = _init(xla_model, x)
    assert jax.tree.structure(_init(fast_model, x)) == jax.tree.structure(variables)

    results = []
    for model in (xla_model, fast_model):
        grad_fn = jax.jit(jax.value_and_grad(lambda p, m=model: _loss(m, variables, x, p), has_aux=True))
        results.append(grad_fn(variables["params"]))
    (xla_loss, xla_stats), xla_grads = results[0]
    (fast_loss, fast_stats), fast_grads = results[1]
    np.testing.assert_allclose(fast_loss, xla_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves((fast_grads, fast_stats)), jax.tree.leaves((xla_grads, xla_stats))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _trained_statistics(model, variables, x, steps=3):
    """Running BatchNorm averages away from their initial values (so that folding shows)."""
    for i in range(steps):
        _, updates = model.apply(variables, x * (i + 2.0), train=True, mutable=["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    return variables


def _small(block="basic", dtype=jnp.float32, **layers):
    return ResNet(head_sizes=HEADS, stage_sizes=(1, 1), block=block, width=8, dtype=dtype, **layers)


@pytest.mark.onednn
@pytest.mark.slow
@pytest.mark.skipif(not onednn.available(), reason=f"oneDNN: {onednn.unavailable_reason()}")
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_inference_folds_batchnorm_residual_and_relu_into_the_onednn_convolutions(block):
    from iap_jax.kernels.conv import PACKED

    x = _images(batch=3, size=40)
    model = _small(block, **factory.layers("onednn", jnp.float32))
    folded = _small(block, **factory.layers("onednn", jnp.float32, inference=True))
    unfolded = _small(block, **factory.layers("onednn", jnp.float32, inference=True, fold_norms=False))
    assert factory.is_folded(folded) and not factory.is_folded(unfolded)
    variables = _trained_statistics(model, _init(model, x), x)
    assert jax.tree.structure(_init(unfolded, x)) == jax.tree.structure(variables)
    # Folding is a transform of the parameter tree: each convolution gains a bias, the
    # BatchNorms and their statistics go.
    folded_variables = fold_batch_norms(variables)
    assert jax.tree.structure(_init(folded, x)) == jax.tree.structure(folded_variables)
    assert set(folded_variables) == {"params"}
    want = jax.jit(lambda v, a: unfolded.apply(v, a, train=False))(variables, x)
    xla = jax.jit(lambda v, a: _small(block).apply(v, a, train=False))(variables, x)
    forward = jax.jit(lambda v, a: folded.apply(v, a, train=False))
    got = forward(folded_variables, x)
    for name in HEADS:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[name], xla[name], rtol=1e-4, atol=1e-5)
    # Every convolution is one fused call: none runs alone, and no BatchNorm is left.
    hlo = forward.lower(folded_variables, x).as_text()
    convolutions = len(jax.tree.leaves(variables["params"])) - 2 * len(HEADS)
    convolutions //= 3  # kernel, scale, bias per convolution and its norm
    assert hlo.count("iap_onednn_IapConvInference") == convolutions
    assert "iap_onednn_IapConvForward" not in hlo and "rsqrt" not in hlo
    # Prepared once for prediction (folded and packed): the same outputs, and the forward
    # never packs.
    packed = factory.prepare_inference(folded, variables, x.shape)
    assert set(packed) == {"params", PACKED}
    packed_forward = jax.jit(lambda v, a: folded.apply(v, a, train=False))
    got_packed = packed_forward(packed, x)
    for name in HEADS:
        np.testing.assert_allclose(got_packed[name], got[name], rtol=1e-5, atol=1e-6)
    packed_hlo = packed_forward.lower(packed, x).as_text()
    assert packed_hlo.count("iap_onednn_IapConvInference") == convolutions
    assert "IapConvPackWeights" not in packed_hlo
    with pytest.raises(ValueError, match="packed for input"):
        folded.apply(packed, x[:2], train=False)
    with pytest.raises(ValueError, match="inference only"):
        folded.apply(folded_variables, x, train=True)
    # Without folded convolutions there is nothing to fold or pack (nor to trace).
    assert factory.prepare_inference(unfolded, variables, x.shape) is variables
    cpu_fast = _small(block, **factory.layers("cpu_fast", jnp.float32, inference=True))
    assert factory.prepare_inference(cpu_fast, variables, x.shape) is variables
    # Training runs convolution, BatchNorm and ReLU apart (and their gradients).
    train_hlo = jax.jit(lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"])).lower(
        variables, x).as_text()
    assert "IapConvInference" not in train_hlo and "iap_onednn_IapConvForward" in train_hlo


@pytest.mark.onednn
@pytest.mark.slow
@pytest.mark.skipif(not onednn.available() or not onednn.bfloat16_inference_available(),
                    reason="no oneDNN bfloat16 inference convolutions on this CPU")
def test_bfloat16_inference_runs_the_folded_onednn_convolutions_in_bfloat16():
    from iap_jax.kernels.conv import PACKED

    x = _images(batch=3, size=40)
    model = _small(**factory.layers("auto", jnp.float32))
    variables = _trained_statistics(model, _init(model, x), x)
    want = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
    bf16 = _small(dtype=jnp.bfloat16, **factory.layers("auto", jnp.bfloat16, inference=True))
    packed = factory.prepare_inference(bf16, variables, x.shape)
    assert PACKED in packed
    assert {a.dtype for a in jax.tree.leaves(packed[PACKED]) if a.ndim == 1 and a.size > 64} \
        == {jnp.dtype(jnp.bfloat16)}  # the packed kernels (the biases stay float32)
    forward = jax.jit(lambda v, a: bf16.apply(v, a, train=False))
    hlo = forward.lower(packed, x).as_text()
    convolutions = (len(jax.tree.leaves(variables["params"])) - 2 * len(HEADS)) // 3
    assert hlo.count("iap_onednn_IapConvInferenceBf16") == convolutions
    got = forward(packed, x)
    for name in HEADS:  # bfloat16 keeps 8 bits of mantissa: close, not equal
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(np.asarray(got[name], np.float32), want[name], atol=0.05 * scale)
    # Unpacked, the same convolutions read the folded kernel cast to bfloat16.
    unpacked = forward(fold_batch_norms(variables), x)
    for name in HEADS:
        np.testing.assert_allclose(np.asarray(unpacked[name], np.float32),
                                   np.asarray(got[name], np.float32), rtol=2e-2, atol=2e-2)
    # Training in bfloat16 on the CPU keeps its convolutions off oneDNN (whose training
    # convolutions are float32); only the max pooling's forward is oneDNN's.
    bf16_train = _small(dtype=jnp.bfloat16, **factory.layers("auto", jnp.bfloat16))
    train_hlo = jax.jit(lambda v, a: bf16_train.apply(v, a, train=True, mutable=["batch_stats"])).lower(
        variables, x).as_text()
    assert "iap_onednn_IapConv" not in train_hlo and "iap_onednn_IapMaxPoolBf16" in train_hlo


def test_the_model_is_plain_flax_and_the_factory_picks_kernels_once():
    """resnet.py imports no kernel; off the CPU the factory imports none either, and the
    layers it picks come from its arguments, not from JAX's state while tracing."""
    import subprocess
    import sys

    code = ("import sys, jax.numpy as jnp; from iap_jax.models import factory, resnet; "
            "m = factory.make_model('tiny', {'a': 2}, backend='gpu', device_count=1); "
            "assert m.conv is resnet.ResNet.conv and m.folded_conv is None, m; "
            "print(sorted(k for k in sys.modules if k.startswith('iap_jax.kernels')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["[]"], done.stderr[-2000:]
    assert factory.layers("xla", jnp.float32) == {}
    cpu = factory.layers("auto", jnp.float32, backend="cpu", device_count=2)
    assert cpu["conv"].keywords == {"impl": "cpu_fast"} and cpu["pool"].keywords == {"impl": "cpu_fast"}
    assert "folded_conv" not in factory.layers("auto", jnp.float32, inference=True, backend="cpu",
                                               device_count=2)


def test_batchnorm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    model = make_model("tiny", HEADS)
    x = _images(batch=6)
    variables = _init(model, x)
    eval_out = model.apply(variables, x, train=False)
    # Eval mode: each image's output is independent of the rest of the batch.
    single = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(single["te"], eval_out["te"][:1], rtol=1e-5, atol=1e-6)

    train_out, state = model.apply(
        variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    assert not np.allclose(train_out["te"], eval_out["te"])
    # PyTorch momentum: running = 0.9 * running + 0.1 * batch (mean starts at 0, var at 1).
    (stem_conv_out,) = state["intermediates"]["stem_conv"]["__call__"]
    stats = state["batch_stats"]["stem_norm"]
    np.testing.assert_allclose(stats["mean"], 0.1 * stem_conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * stem_conv_out.var(axis=(0, 1, 2)), rtol=1e-4)
    with pytest.raises(Exception):
        model.apply(variables, x, train=True)  # batch_stats must be declared mutable


@pytest.mark.slow
def test_tiny_model_overfits_a_small_batch():
    model = make_model("tiny", {"cls": 4, "reg": 1})
    x = _images(batch=8, size=32, seed=1)
    labels = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
    targets = jnp.linspace(-1.0, 1.0, 8)
    variables = _init(model, x)
    optimizer = optax.adam(1e-2)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))

    def loss_fn(params, batch_stats):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs["cls"], labels).mean()
        mse = jnp.mean((outputs["reg"][:, 0] - targets) ** 2)
        return ce + mse, updates["batch_stats"]

    @jax.jit
    def step(state):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    losses = []
    for _ in range(40):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0]


def test_make_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        make_model("resnet101", HEADS)
    with pytest.raises(ValueError, match="positive"):
        make_model("tiny", {"te": 0})
    with pytest.raises(ValueError, match="conv_impl"):
        make_model("tiny", HEADS, conv_impl="fast")
