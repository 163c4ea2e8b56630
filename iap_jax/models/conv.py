"""A 2-D convolution that trains fast on XLA's CPU backend, and a Flax module for it.

XLA's CPU convolution runs its forward pass, its weight gradient and its stride-1 input
gradient near the machine's matrix-product speed on ordinary feature maps, but it is
pathologically slow when the output map is smaller than the kernel (ResNet's last stage
at 64 px: a 2x2 map, 80x slower) and on any strided input gradient (an input-dilated
convolution), and a 1x1 kernel is plainly a matrix product. `conv2d_cpu` is a
`jax.custom_vjp` that picks, per shape (`conv_plan`), among

  forward          XLA convolution | patches(x) @ W
  weight gradient  XLA's transpose | patches(x)^T @ dy
  input gradient   XLA's transpose | fold(dy @ W^T)   (fold = sum of strided pads: col2im)

Patches are only built for 1x1 kernels and tiny maps, one layer at a time.

Faster still, where the machine has oneDNN, is "onednn" (`iap_jax/models/onednn.py`): all
three products are oneDNN's convolutions, called from XLA as FFI custom calls.

`Conv` is a drop-in for `flax.linen.Conv` (NHWC, kernel HWIO named "kernel", optional
"bias"), so parameters are interchangeable between the XLA and the CPU-fast paths.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from iap_jax.models import onednn

Padding = tuple[tuple[int, int], tuple[int, int]]

CONV_IMPLS = ("auto", "xla", "cpu_fast", "onednn")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def resolve_conv_impl(impl: str, dtype: Any = None) -> str:
    """Maps "auto" to "xla" off the CPU; on the CPU to "onednn" where oneDNN is available,
    the computation is float32 and JAX has a single device (a custom call is not split
    over a mesh), else to "cpu_fast"."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    float32 = dtype is None or jnp.dtype(dtype) == jnp.float32
    if impl == "auto":
        if jax.default_backend() != "cpu":
            return "xla"
        single = jax.device_count() == 1
        return "onednn" if float32 and single and onednn.available() else "cpu_fast"
    if impl == "onednn":
        if not float32:
            raise ValueError(f"conv_impl 'onednn' computes in float32, not {jnp.dtype(dtype)}")
        if jax.device_count() > 1:
            raise ValueError(f"conv_impl 'onednn' runs on a single device, and JAX has "
                             f"{jax.device_count()}; use 'auto' or 'cpu_fast'")
        reason = onednn.unavailable_reason()
        if reason is not None:
            raise onednn.OnednnUnavailable(f"conv_impl 'onednn' is unavailable: {reason}")
    return impl


def resolve_inference_conv_impl(impl: str, dtype: Any = None) -> str:
    """The convolution a folded inference forward runs (`Conv` with `affine`): as
    resolve_conv_impl, except that bfloat16 on a CPU runs oneDNN's bfloat16 inference
    convolution where this CPU has one (AVX-512; AMX makes it several times float32's speed).
    Training's oneDNN convolutions stay float32."""
    bfloat16 = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if bfloat16 and impl in ("auto", "onednn") and jax.default_backend() == "cpu" \
            and jax.device_count() == 1 and onednn.available():
        if onednn.bfloat16_inference_available():
            return "onednn"
        if impl == "onednn":
            raise ValueError("conv_impl 'onednn' has no bfloat16 inference convolution on this "
                             "CPU (it needs AVX-512); use float32")
    return resolve_conv_impl(impl, dtype)


def explicit_padding(
    in_hw: Sequence[int], kernel_hw: Sequence[int], strides: Sequence[int], padding: Any
) -> Padding:
    """Turns "SAME"/"VALID", an int, or per-side pairs into ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding)
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    else:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != 2:
        raise ValueError(f"2-D convolution needs 2 padding pairs, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pads)


def _output_hw(in_hw, kernel_hw, strides, padding: Padding) -> tuple[int, int]:
    return tuple(
        (size + lo + hi - k) // s + 1
        for size, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, padding)
    )


def _window_slices(xp: jnp.ndarray, out_hw, kernel_hw, strides) -> list[jnp.ndarray]:
    """One strided [B, Ho, Wo, C] view of the padded input per kernel offset, row-major."""
    kh, kw = kernel_hw
    sh, sw = strides
    ho, wo = out_hw
    batch, channels = xp.shape[0], xp.shape[3]
    return [
        lax.slice(
            xp,
            (0, i, j, 0),
            (batch, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, channels),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def _patches(x: jnp.ndarray, kernel_hw, strides, padding: Padding) -> jnp.ndarray:
    """[B, H, W, C] -> [B, Ho, Wo, kh*kw*C], channels ordered like an HWIO kernel reshape."""
    out_hw = _output_hw(x.shape[1:3], kernel_hw, strides, padding)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    cols = _window_slices(xp, out_hw, kernel_hw, strides)
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _fold(pieces, in_shape, kernel_hw, strides, padding: Padding) -> jnp.ndarray:
    """Adjoint of `_patches` (col2im): sums each window offset's [B, Ho, Wo, C] gradient
    back onto the input positions it was sliced from."""
    _, height, width, _ = in_shape
    kh, kw = kernel_hw
    sh, sw = strides
    ho, wo = pieces[0].shape[1:3]
    padded_h = height + padding[0][0] + padding[0][1]
    padded_w = width + padding[1][0] + padding[1][1]
    zero = jnp.zeros((), pieces[0].dtype)
    total = None
    for index, piece in enumerate(pieces):
        i, j = divmod(index, kw)
        placed = lax.pad(
            piece,
            zero,
            (
                (0, 0, 0),
                (i, padded_h - i - (ho - 1) * sh - 1, sh - 1),
                (j, padded_w - j - (wo - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ),
        )
        total = placed if total is None else total + placed
    return total[:, padding[0][0] : padding[0][0] + height, padding[1][0] : padding[1][0] + width, :]


class ConvPlan(NamedTuple):
    """How one convolution shape runs: forward "xla"|"matmul", weight gradient
    "xla"|"matmul", input gradient "xla"|"fold"."""

    forward: str
    weight_grad: str
    input_grad: str


def conv_plan(in_shape, kernel_shape, strides, padding: Padding) -> ConvPlan:
    """Picks the fastest CPU formulation for a shape (measured on ResNet-18 layers, batch 32).

    1x1 kernels, and output maps smaller than the kernel (where XLA's convolution is
    pathologically slow), are matrix products everywhere. Otherwise XLA's forward
    convolution, its weight gradient and its stride-1 input gradient measured fastest
    (the patch products were 1.3-4x slower on 14-56 px maps); a strided input gradient
    is folded from one matrix product instead of XLA's input-dilated convolution.
    """
    kh, kw = kernel_shape[:2]
    ho, wo = _output_hw(in_shape[1:3], (kh, kw), strides, padding)
    if (kh, kw) == (1, 1) or ho < kh or wo < kw:
        return ConvPlan("matmul", "matmul", "fold")
    return ConvPlan("xla", "xla", "xla" if tuple(strides) == (1, 1) else "fold")


def _xla_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


def _forward(x, kernel, strides, padding: Padding, plan: ConvPlan):
    if plan.forward == "xla":
        return _xla_conv(x, kernel, strides, padding)
    kh, kw, cin, cout = kernel.shape
    patches = _patches(x, (kh, kw), strides, padding)
    return lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


def _weight_grad(x, kernel, strides, padding: Padding, plan: ConvPlan, dy):
    if plan.weight_grad == "xla":
        return jax.vjp(lambda k: _xla_conv(x, k, strides, padding), kernel)[1](dy)[0]
    kh, kw = kernel.shape[:2]
    patches = _patches(x, (kh, kw), strides, padding)
    # Contract batch and both spatial axes at once: one large matrix product.
    return lax.dot_general(patches, dy, (((0, 1, 2), (0, 1, 2)), ((), ()))).reshape(kernel.shape)


def _input_grad(x, kernel, strides, padding: Padding, plan: ConvPlan, dy):
    if plan.input_grad == "xla":
        return jax.vjp(lambda a: _xla_conv(a, kernel, strides, padding), x)[1](dy)[0]
    kh, kw, cin, cout = kernel.shape
    dpatches = lax.dot_general(dy, kernel.reshape(kh * kw * cin, cout), (((3,), (1,)), ((), ())))
    pieces = jnp.split(dpatches, kh * kw, axis=-1) if kh * kw > 1 else [dpatches]
    return _fold(pieces, x.shape, (kh, kw), strides, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding, conv_plan(x.shape, kernel.shape, strides, padding))


def _conv2d_fwd(x, kernel, strides, padding):
    return _conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    plan = conv_plan(x.shape, kernel.shape, strides, padding)
    return (
        _input_grad(x, kernel, strides, padding, plan, dy),
        _weight_grad(x, kernel, strides, padding, plan, dy),
    )


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv2d(x, kernel, strides, padding):
    out_hw = _output_hw(x.shape[1:3], kernel.shape[:2], strides, padding)
    return onednn.forward(x, kernel, strides, padding, out_hw)


def _onednn_conv2d_fwd(x, kernel, strides, padding):
    return _onednn_conv2d(x, kernel, strides, padding), (x, kernel)


def _onednn_conv2d_bwd(strides, padding, residuals, dy):
    # An unused gradient (the image's, at the stem) is dropped by XLA: custom calls are pure.
    x, kernel = residuals
    dw = onednn.weight_grad(x, dy, kernel.shape, strides, padding)
    return onednn.input_grad(dy, kernel, x.shape, strides, padding, after=dw), dw


_onednn_conv2d.defvjp(_onednn_conv2d_fwd, _onednn_conv2d_bwd)


def _checked(x, kernel, strides, padding):
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"expected NHWC input and HWIO kernel, got shapes {x.shape} and {kernel.shape}")
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(f"input has {x.shape[3]} channels but the kernel expects {kernel.shape[2]}")
    strides = tuple(int(s) for s in strides)
    return strides, explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)


def conv2d_cpu(x: jnp.ndarray, kernel: jnp.ndarray, strides=(1, 1), padding: Any = "SAME") -> jnp.ndarray:
    """NHWC x HWIO convolution with a CPU-fast gradient; same result as `lax.conv_general_dilated`."""
    strides, pads = _checked(x, kernel, strides, padding)
    return _conv2d(x, kernel, strides, pads)


def conv2d_onednn(x: jnp.ndarray, kernel: jnp.ndarray, strides=(1, 1), padding: Any = "SAME") -> jnp.ndarray:
    """NHWC x HWIO float32 convolution whose forward pass and gradients run in oneDNN."""
    strides, pads = _checked(x, kernel, strides, padding)
    return _onednn_conv2d(x, kernel, strides, pads)


# The variable collection of kernels folded and packed for oneDNN inference: made from a
# checkpoint's variables on the predicting machine, for one batch shape, never saved.
PACKED = "packed_inference"


def pack_for_inference(model: nn.Module, variables, input_shape) -> dict:
    """`variables` plus the PACKED collection for `model.apply(..., train=False)` on inputs of
    `input_shape`: every oneDNN inference convolution's kernel folded with its BatchNorm
    and reordered once, instead of at every call. Where nothing is packed (other
    convolutions, or BatchNorm not folded) the variables come back as they were, and
    nothing is traced. `model` is a ResNet (it has conv_impl, dtype and fold_norms)."""
    if not model.fold_norms or resolve_inference_conv_impl(model.conv_impl, model.dtype) != "onednn":
        return variables

    def packed(variables):
        # Only the packing is kept: the forward's convolutions are unused and dropped.
        return model.apply(variables, jnp.zeros(tuple(input_shape), jnp.float32), train=False,
                           mutable=[PACKED])[1].get(PACKED, {})

    collection = jax.jit(packed)(variables)
    return {**variables, PACKED: collection} if collection else dict(variables)


class Conv(nn.Module):
    """`flax.linen.Conv` subset (2-D, NHWC, no dilation or groups) with a selectable backend.

    impl: "xla" runs `lax.conv_general_dilated`; "cpu_fast" runs `conv2d_cpu`; "onednn"
    runs `conv2d_onednn`; "auto" picks per `resolve_conv_impl`. Parameters are identical
    in every case.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, affine=None, residual=None, relu: bool = False) -> jnp.ndarray:
        """conv(x); or, with affine = (multiplier, shift) per output channel (a folded
        BatchNorm), conv(x) * multiplier + shift [+ residual] [then ReLU] as one oneDNN call
        with the affine folded into kernel and bias (forward only: for prediction)."""
        kernel_hw = tuple(self.kernel_size)
        strides = tuple(self.strides)
        kernel = self.param(
            "kernel", self.kernel_init, kernel_hw + (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        params = kernel, bias  # as stored (float32): what a BatchNorm is folded into
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pads = explicit_padding(x.shape[1:3], kernel_hw, strides, self.padding)
        if affine is not None or residual is not None or relu:
            if affine is None or resolve_inference_conv_impl(self.impl, x.dtype) != "onednn":
                # Elsewhere the caller applies norm, residual and ReLU (ResNet's conv_norm).
                raise ValueError("affine/residual/relu are for oneDNN inference only")
            multiplier, shift = affine
            out_hw = _output_hw(x.shape[1:3], kernel_hw, strides, pads)

            def folded():  # in float32, whatever the activations' dtype
                k, b = (None if p is None else p.astype(jnp.float32) for p in params)
                return k * multiplier, shift if b is None else b * multiplier + shift

            # Packed only on request (pack_for_inference), never by init: a model's variables
            # and checkpoints hold no packed kernels.
            packing = self.is_mutable_collection(PACKED) and not self.is_initializing()
            if not (packing or self.has_variable(PACKED, "kernel")):
                k, b = folded()
                return onednn.inference(x, k.astype(x.dtype), b, strides, pads, out_hw, relu,
                                        residual)
            # Prediction: the folded kernel packed once (see `pack_for_inference`).
            packed = self.variable(PACKED, "kernel", lambda: onednn.pack_weights(
                folded()[0], x.shape, strides, pads, out_hw, relu, residual is not None, x.dtype))
            packed_bias = self.variable(PACKED, "bias", lambda: folded()[1])
            # The layout belongs to the input shape it was packed for, which this empty
            # array's shape records (the later size checks are a backstop: they pass a
            # layout of the same size).
            packed_for = self.variable(PACKED, "input_shape", lambda: jnp.zeros((*x.shape, 0)))
            if tuple(packed_for.value.shape[:-1]) != tuple(x.shape):
                raise ValueError(f"{self.name}: kernels packed for input {packed_for.value.shape[:-1]} "
                                 f"applied to {tuple(x.shape)}; pack them for this shape")
            return onednn.inference(x, packed.value, packed_bias.value, strides, pads, out_hw,
                                    relu, residual, kernel_shape=kernel.shape)
        impl = resolve_conv_impl(self.impl, x.dtype)
        if impl == "onednn":
            y = _onednn_conv2d(x, kernel, strides, pads)
        elif impl == "cpu_fast":
            y = _conv2d(x, kernel, strides, pads)
        else:
            y = _xla_conv(x, kernel, strides, pads)
        return y if bias is None else y + bias


# 3x3 stride-2 max pooling (the ResNet stem). XLA's CPU gradient of reduce_window is a
# select-and-scatter that runs slowly; here the gradient goes, like PyTorch's, to the
# first maximal position of each window, written as masks and the same fold as above.
_POOL_WINDOW = (3, 3)
_POOL_STRIDES = (2, 2)
_POOL_PADDING = ((1, 1), (1, 1))


def _pool_windows(x):
    out_hw = _output_hw(x.shape[1:3], _POOL_WINDOW, _POOL_STRIDES, _POOL_PADDING)
    xp = jnp.pad(x, ((0, 0), *_POOL_PADDING, (0, 0)), constant_values=-jnp.inf)
    return _window_slices(xp, out_hw, _POOL_WINDOW, _POOL_STRIDES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool(x, with_onednn: bool):
    if with_onednn:  # not differentiated: prediction and evaluation
        out_hw = _output_hw(x.shape[1:3], _POOL_WINDOW, _POOL_STRIDES, _POOL_PADDING)
        return onednn.max_pool(x, _POOL_WINDOW, _POOL_STRIDES, _POOL_PADDING, out_hw)
    return functools.reduce(jnp.maximum, _pool_windows(x))


def _max_pool_fwd(x, with_onednn: bool):
    # Differentiated (training), the maxima are XLA's even with oneDNN: the backward finds
    # each window's maximum by comparing it with y, and XLA may recompute x for those
    # comparisons (a BatchNorm and ReLU fused into them) with other rounding than the copy
    # a oneDNN call read, whose maxima then match no window (485 of 3200 in a tiny ResNet).
    y = _max_pool(x, False)
    return y, (x, y)


def _max_pool_bwd(with_onednn: bool, residuals, dy):
    x, y = residuals
    taken = jnp.zeros(y.shape, bool)
    pieces = []
    for window in _pool_windows(x):
        first_max = (window == y) & ~taken
        taken = taken | first_max
        pieces.append(jnp.where(first_max, dy, jnp.zeros((), dy.dtype)))
    return (_fold(pieces, x.shape, _POOL_WINDOW, _POOL_STRIDES, _POOL_PADDING),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_stride2(x: jnp.ndarray, impl: str = "auto") -> jnp.ndarray:
    """PyTorch's MaxPool2d(3, stride=2, padding=1) on NHWC input, CPU-fast when impl says so
    (undifferentiated with oneDNN convolutions, oneDNN's pooling: about 6x faster than XLA's CPU
    loop on the 224 px stem)."""
    if resolve_inference_conv_impl(impl, x.dtype) == "onednn":
        return _max_pool(x, True)
    if resolve_conv_impl(impl, x.dtype) == "cpu_fast":
        return _max_pool(x, False)
    return nn.max_pool(x, _POOL_WINDOW, strides=_POOL_STRIDES, padding=_POOL_PADDING)
