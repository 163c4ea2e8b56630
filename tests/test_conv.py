"""The CPU convolutions (pure-JAX custom gradients and oneDNN custom calls) and the max pool
against XLA's reference ops: values and gradients."""
import os
import platform
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from iap_jax.kernels import conv, onednn
from iap_jax.kernels.conv import Conv, FoldedConv, conv2d_cpu, conv2d_onednn, max_pool
from iap_jax.models.factory import resolve_conv_impl

pytestmark = [pytest.mark.onednn, pytest.mark.slow]

TOL = dict(rtol=2e-5, atol=2e-5)
needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN: {onednn.unavailable_reason()}")
CONVS = [pytest.param(conv2d_cpu, id="cpu_fast"),
         pytest.param(conv2d_onednn, id="onednn", marks=needs_onednn)]


def _reference_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool_3x3_stride2(x, impl):
    """The ResNet stem's pooling (PyTorch's MaxPool2d(3, stride=2, padding=1))."""
    return max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), impl=impl)


def _value_and_pullback(fn, cotangent, *args):
    """fn(*args) and its vjp applied to cotangent, compiled as one program (fast to test)."""

    def run(cotangent, *args):
        value, pullback = jax.vjp(fn, *args)
        return value, pullback(cotangent)

    return jax.jit(run)(cotangent, *args)


# (input NHWC, kernel HWIO, strides, padding): ResNet's shapes in miniature plus odd cases.
CASES = [
    ((2, 9, 9, 3), (3, 3, 3, 4), (1, 1), ((1, 1), (1, 1))),  # 3x3 stride 1: XLA throughout
    ((2, 12, 12, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1))),  # 3x3 stride 1, more outputs
    ((2, 10, 10, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),  # 3x3 stride 2, even input
    ((2, 11, 11, 3), (3, 3, 3, 5), (2, 2), ((1, 1), (1, 1))),  # 3x3 stride 2, odd input
    ((2, 19, 19, 1), (7, 7, 1, 4), (2, 2), ((3, 3), (3, 3))),  # the 7x7 stem on one channel
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),  # 1x1 projection, stride 2
    ((2, 9, 9, 4), (1, 1, 4, 6), (2, 2), ((0, 0), (0, 0))),  # 1x1 stride 2, odd input
    ((2, 8, 8, 4), (1, 1, 4, 6), (1, 1), "VALID"),  # 1x1, pure matmul
    ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),  # tiny spatial map
    ((2, 4, 4, 6), (3, 3, 6, 5), (2, 2), ((1, 1), (1, 1))),  # strided, output smaller than the kernel
    ((1, 7, 6, 3), (3, 2, 3, 2), (2, 1), "SAME"),  # asymmetric SAME padding, mixed strides
    ((2, 9, 9, 2), (3, 3, 2, 3), (1, 1), ((0, 2), (2, 0))),  # uneven explicit padding
    ((1, 20, 20, 2), (3, 3, 2, 3), (2, 2), ((1, 1), (1, 1))),  # stride 2, large map: folded dx
]


@pytest.mark.parametrize("ours", CONVS)
@pytest.mark.parametrize("x_shape,k_shape,strides,padding", CASES)
def test_conv_matches_xla_values_and_gradients(x_shape, k_shape, strides, padding, ours):
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape)
    out_shape = jax.eval_shape(lambda a, b: _reference_conv(a, b, strides, padding), x, kernel).shape
    cotangent = jax.random.normal(kg, out_shape)

    want, want_grads = _value_and_pullback(lambda a, b: _reference_conv(a, b, strides, padding), cotangent, x, kernel)
    got, got_grads = _value_and_pullback(lambda a, b: ours(a, b, strides, padding), cotangent, x, kernel)
    np.testing.assert_allclose(got, want, **TOL)
    for got_grad, want_grad in zip(got_grads, want_grads):
        np.testing.assert_allclose(got_grad, want_grad, **TOL)


@needs_onednn
def test_strided_1x1_weight_gradient_at_a_shape_onednn_itself_gets_wrong():
    """oneDNN 3.2's own strided 1x1 weight gradient corrupts the heap (the process aborts)
    at this shape; ours takes every other pixel and an unstrided gradient instead."""
    kx, kg = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, (4, 56, 56, 8))
    dy = jax.random.normal(kg, (4, 28, 28, 16))
    got = onednn.weight_grad(x, dy, (1, 1, 8, 16), (2, 2), ((0, 0), (0, 0)))
    want = jax.grad(lambda k: jnp.sum(_reference_conv(x, k, (2, 2), ((0, 0), (0, 0))) * dy))(
        jnp.zeros((1, 1, 8, 16)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)  # sums of 3136 products


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
@pytest.mark.parametrize(
    "plan",
    [
        conv.ConvPlan("xla", "xla", "xla"),
        conv.ConvPlan("matmul", "matmul", "fold"),
        conv.ConvPlan("xla", "matmul", "fold"),
        conv.ConvPlan("matmul", "xla", "xla"),
    ],
)
def test_every_conv_plan_matches_xla(monkeypatch, plan, strides):
    monkeypatch.setattr(conv, "conv_plan", lambda *shapes: plan)
    x = jax.random.normal(jax.random.PRNGKey(9), (2, 9, 9, 3))
    kernel = jax.random.normal(jax.random.PRNGKey(10), (3, 3, 3, 4))
    padding = ((1, 1), (1, 1))
    out_shape = jax.eval_shape(lambda a, b: _reference_conv(a, b, strides, padding), x, kernel).shape
    cotangent = jax.random.normal(jax.random.PRNGKey(11), out_shape)
    want = _value_and_pullback(lambda a, b: _reference_conv(a, b, strides, padding), cotangent, x, kernel)
    got = _value_and_pullback(lambda a, b: conv2d_cpu(a, b, strides, padding), cotangent, x, kernel)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, **TOL)


@pytest.mark.parametrize(
    "in_shape,kernel_shape,strides,want",
    [
        ((32, 56, 56, 64), (3, 3, 64, 64), (1, 1), conv.ConvPlan("xla", "xla", "xla")),
        ((32, 56, 56, 64), (3, 3, 64, 128), (2, 2), conv.ConvPlan("xla", "xla", "fold")),
        ((32, 224, 224, 1), (7, 7, 1, 64), (2, 2), conv.ConvPlan("xla", "xla", "fold")),
        ((32, 56, 56, 64), (1, 1, 64, 128), (2, 2), conv.ConvPlan("matmul", "matmul", "fold")),
        ((32, 2, 2, 512), (3, 3, 512, 512), (1, 1), conv.ConvPlan("matmul", "matmul", "fold")),
        ((32, 4, 4, 256), (3, 3, 256, 512), (2, 2), conv.ConvPlan("matmul", "matmul", "fold")),
    ],
)
def test_conv_plan_avoids_slow_xla_cases(in_shape, kernel_shape, strides, want):
    # XLA's strided input gradient and any convolution whose output map is smaller than
    # its kernel are the slow cases on the CPU; everything else stays on XLA.
    padding = conv.explicit_padding(in_shape[1:3], kernel_shape[:2], strides, "SAME")
    assert conv.conv_plan(in_shape, kernel_shape, strides, padding) == want


@pytest.mark.parametrize("ours", CONVS)
def test_conv_gradients_under_jit_match_xla(ours):
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 10, 10, 4))
    kernel = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 8))

    def loss(conv, a, b):
        return jnp.sum(jnp.tanh(conv(a, b, (2, 2), ((1, 1), (1, 1)))))

    want = jax.jit(jax.grad(lambda a, b: loss(_reference_conv, a, b), argnums=(0, 1)))(x, kernel)
    got = jax.jit(jax.grad(lambda a, b: loss(ours, a, b), argnums=(0, 1)))(x, kernel)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, **TOL)


def test_conv_module_shares_parameters_with_flax_conv():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 9, 9, 3))
    flax_conv = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    params = flax_conv.init(jax.random.PRNGKey(4), x)
    want = flax_conv.apply(params, x)
    for impl in ("xla", "cpu_fast") + (("onednn",) if onednn.available() else ()):
        ours = Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), impl=impl)
        ours_params = ours.init(jax.random.PRNGKey(4), x)
        assert jax.tree.map(jnp.shape, ours_params) == jax.tree.map(jnp.shape, params)
        np.testing.assert_allclose(ours.apply(params, x), want, **TOL)


def test_conv_module_bf16_compute_keeps_f32_params():
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 3))
    conv = Conv(4, (3, 3), dtype=jnp.bfloat16, impl="cpu_fast")
    params = conv.init(jax.random.PRNGKey(6), x)
    assert params["params"]["kernel"].dtype == jnp.float32
    y = conv.apply(params, x)
    assert y.dtype == jnp.bfloat16
    reference = Conv(4, (3, 3), impl="xla").apply(params, x)
    np.testing.assert_allclose(y.astype(jnp.float32), reference, rtol=5e-2, atol=5e-2)
    grads = jax.grad(lambda p: conv.apply(p, x).astype(jnp.float32).sum())(params)
    assert grads["params"]["kernel"].dtype == jnp.float32


def test_conv_takes_only_a_resolved_impl():
    # "auto" is resolved by the model factory, never by a layer while tracing.
    for impl in ("auto", "cudnn"):
        with pytest.raises(ValueError, match="impl must be one of"):
            Conv(3, (3, 3), impl=impl).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))
    with pytest.raises(ValueError, match="impl must be one of"):
        max_pool_3x3_stride2(jnp.zeros((1, 4, 4, 2)), "auto")


@needs_onednn
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_folded_conv_is_conv_bias_residual_relu_in_one_onednn_call(relu, with_residual):
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 3))
    module = FoldedConv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    variables = module.init(jax.random.PRNGKey(2), x)
    variables = {"params": {**variables["params"], "bias": jnp.arange(5.0) - 2.0}}
    assert jax.tree.map(jnp.shape, variables) == {"params": {"kernel": (3, 3, 3, 5), "bias": (5,)}}
    residual = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 5)) if with_residual else None
    forward = jax.jit(lambda v, a, r: module.apply(v, a, residual=r, relu=relu))
    want = _reference_conv(x, variables["params"]["kernel"], (2, 2), ((1, 1), (1, 1))) \
        + variables["params"]["bias"] + (0 if residual is None else residual)
    np.testing.assert_allclose(forward(variables, x, residual), jnp.maximum(want, 0) if relu else want,
                               **TOL)
    assert forward.lower(variables, x, residual).as_text().count("iap_onednn_IapConvInference") == 1


def test_conv_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="channels"):
        conv2d_cpu(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 4)))


def test_resolve_conv_impl():
    assert resolve_conv_impl("xla") == "xla"
    assert resolve_conv_impl("cpu_fast", jnp.bfloat16) == "cpu_fast"
    if jax.default_backend() == "cpu":
        single = jax.device_count() == 1
        assert resolve_conv_impl("auto") == ("onednn" if single and onednn.available() else "cpu_fast")
        assert resolve_conv_impl("auto", jnp.bfloat16) == "cpu_fast"
    else:
        assert resolve_conv_impl("auto") == "xla"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("cudnn")
    with pytest.raises(ValueError, match="float32"):
        resolve_conv_impl("onednn", jnp.bfloat16)
    # From the caller's backend and device count, where given, not JAX's.
    assert resolve_conv_impl("auto", backend="gpu", device_count=1) == "xla"
    assert resolve_conv_impl("auto", backend="cpu", device_count=2) == "cpu_fast"
    with pytest.raises(ValueError, match="single device"):
        resolve_conv_impl("onednn", backend="cpu", device_count=2)


def test_without_onednn_auto_falls_back_and_explicit_onednn_says_why(monkeypatch):
    monkeypatch.setattr(onednn, "_load", lambda: onednn.NOT_INSTALLED)
    if jax.default_backend() == "cpu":
        assert resolve_conv_impl("auto") == "cpu_fast"
    with pytest.raises(onednn.OnednnUnavailable, match="not installed"):
        resolve_conv_impl("onednn")
    with pytest.raises(onednn.OnednnUnavailable, match="not installed"):
        conv2d_onednn(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)))
    if jax.default_backend() == "cpu":  # and the training log says why
        from iap_jax.models.factory import describe_convolutions
        assert describe_convolutions("auto", "float32") == (
            f"cpu_fast (oneDNN unavailable: {onednn.NOT_INSTALLED})")


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="the [cpu] extra builds the oneDNN convolutions on Linux x86-64")
def test_the_cpu_extra_installs_a_library_that_loads():
    """The dev environment holds the [cpu] extra: its library is installed, built (not
    compiled here), and loads; a missing one would only skip the oneDNN tests."""
    path = onednn.library_path()
    assert path is not None and os.path.isfile(path), onednn.unavailable_reason()
    assert onednn.available(), onednn.unavailable_reason()


def test_a_missing_library_says_how_to_install_it():
    script = ("import sys; sys.modules['iap_jax_native'] = None  # as if not installed\n"
              "from iap_jax.kernels import onednn\n"
              "print(onednn.library_path(), onednn.available(), onednn.unavailable_reason())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == f"None False {onednn.NOT_INSTALLED}" and "iap-jax[cpu]" in out


@pytest.mark.parametrize("impl", ["cpu_fast", "onednn"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 9, 7, 2), (2, 12, 12, 64)])
def test_max_pool_matches_flax_values_and_gradients(shape, impl):
    if impl == "onednn" and not onednn.available():
        pytest.skip(f"oneDNN: {onednn.unavailable_reason()}")
    x = jax.random.normal(jax.random.PRNGKey(7), shape)
    out_shape = jax.eval_shape(lambda a: max_pool_3x3_stride2(a, "xla"), x).shape
    cotangent = jax.random.normal(jax.random.PRNGKey(8), out_shape)
    want, want_grads = _value_and_pullback(lambda a: max_pool_3x3_stride2(a, "xla"), cotangent, x)
    pool = jax.jit(lambda a: max_pool_3x3_stride2(a, impl))
    got, got_grads = _value_and_pullback(pool, cotangent, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_grads[0], want_grads[0], **TOL)
    assert ("iap_onednn_IapMaxPool" in pool.lower(x).as_text()) == (impl == "onednn")
    if impl == "onednn" and onednn.bfloat16_inference_available():
        half = x.astype(jnp.bfloat16)
        got = jax.jit(lambda a: max_pool_3x3_stride2(a, "onednn"))(half)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, max_pool_3x3_stride2(half, "xla"))


def test_max_pool_gradient_with_ties_goes_to_one_position_per_window():
    # After a ReLU many windows hold equal values; each window's gradient must still be
    # routed to exactly one input, as in PyTorch, never duplicated.
    x = jnp.zeros((1, 6, 6, 1))
    cotangent = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    _, (dx,) = _value_and_pullback(lambda a: max_pool_3x3_stride2(a, "cpu_fast"), cotangent, x)
    np.testing.assert_allclose(dx.sum(), cotangent.sum())
    # Output column j covers input columns 2j-1..2j+1 and takes the first (leftmost) one.
    np.testing.assert_array_equal(dx[0, 0, :, 0], [1.0, 2.0, 0.0, 3.0, 0.0, 0.0])


@needs_onednn
@pytest.mark.parametrize("x_shape,k_shape,strides,padding", [c for c in CASES if not isinstance(c[3], str)])
def test_fused_inference_convolution_matches_conv_bias_residual_relu(x_shape, k_shape, strides, padding):
    kx, kk, kb, kr = jax.random.split(jax.random.PRNGKey(1), 4)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape)
    bias = jax.random.normal(kb, k_shape[3:])
    plain = _reference_conv(x, kernel, strides, padding) + bias
    residual = jax.random.normal(kr, plain.shape)
    out_hw = plain.shape[1:3]
    for relu in (False, True):
        for extra in (None, residual):
            got = jax.jit(lambda a, k, b, r: onednn.inference(a, k, b, strides, padding, out_hw, relu, r))(
                x, kernel, bias, extra)
            want = plain if extra is None else plain + extra
            np.testing.assert_allclose(got, jnp.maximum(want, 0) if relu else want, **TOL)


@needs_onednn
def test_fused_inference_leaves_a_residual_that_is_still_needed_intact():
    # The residual's buffer becomes the output; XLA must copy it first when it is used later.
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.PRNGKey(3), (3, 3, 4, 4))
    residual = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 6, 4))
    pads = ((1, 1), (1, 1))
    y, later = jax.jit(lambda a, k, r: (onednn.inference(a, k, jnp.zeros(4), (1, 1), pads, (6, 6), False, r),
                                        r * 2.0))(x, kernel, residual)
    np.testing.assert_allclose(later, residual * 2.0)
    np.testing.assert_allclose(y, _reference_conv(x, kernel, (1, 1), pads) + residual, **TOL)
    with pytest.raises(ValueError, match="residual"):
        onednn.inference(x, kernel, jnp.zeros(4), (1, 1), pads, (6, 6), False, residual[:1])


@needs_onednn
@pytest.mark.parametrize("x_shape,k_shape,strides,padding", [CASES[2], CASES[4], CASES[5]])
def test_packed_weights_give_the_same_fused_convolution(x_shape, k_shape, strides, padding):
    kx, kk, kb, kr = jax.random.split(jax.random.PRNGKey(5), 4)
    x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, k_shape)
    bias = jax.random.normal(kb, k_shape[3:])
    want = jnp.maximum(_reference_conv(x, kernel, strides, padding) + bias, 0)
    residual = jax.random.normal(kr, want.shape)
    out_hw = want.shape[1:3]
    for extra in (None, residual):
        packed = jax.jit(lambda k: onednn.pack_weights(k, x.shape, strides, padding, out_hw, True,
                                                       extra is not None))(kernel)
        assert packed.ndim == 1 and packed.size >= kernel.size
        got = jax.jit(lambda a, p, b, r: onednn.inference(a, p, b, strides, padding, out_hw, True, r,
                                                          kernel_shape=k_shape))(x, packed, bias, extra)
        expected = jnp.maximum(_reference_conv(x, kernel, strides, padding) + bias
                               + (0 if extra is None else extra), 0)
        np.testing.assert_allclose(got, expected, **TOL)
    with pytest.raises(ValueError, match="packed weights of shape"):
        onednn.inference(x, packed[1:], bias, strides, padding, out_hw, True, residual, kernel_shape=k_shape)


@pytest.mark.skipif(not onednn.available(), reason=f"oneDNN: {onednn.unavailable_reason()}")
def test_bfloat16_inference_falls_back_where_the_cpu_has_no_native_kernel():
    """On a CPU without AVX-512 (simulated: oneDNN limited to AVX2) oneDNN's bfloat16
    convolution is only its reference kernel, far too slow: bfloat16 prediction then runs
    the pure-JAX convolutions, and float32 keeps oneDNN."""
    import subprocess
    import sys

    code = ("import jax.numpy as jnp; from iap_jax.kernels import onednn; "
            "from iap_jax.models.factory import resolve_inference_conv_impl as r; "
            "print(onednn.bfloat16_inference_available(), r('auto', jnp.bfloat16), r('auto', jnp.float32))")
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.split() == ["False", "cpu_fast", "onednn"], done.stderr[-2000:]
