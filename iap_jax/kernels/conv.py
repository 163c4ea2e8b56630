"""CPU convolutions and max pooling for the ResNet: drop-in Flax modules and functions.

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

Faster still, where the machine has oneDNN, is "onednn" (`iap_jax/kernels/onednn.py`): all
three products are oneDNN's convolutions, called from XLA as FFI custom calls.

`Conv` is a drop-in for `flax.linen.Conv` (NHWC, kernel HWIO named "kernel", optional
"bias"), so parameters are interchangeable between the XLA and the CPU paths; `max_pool`
one for `flax.linen.max_pool`. `FoldedConv` is oneDNN's inference convolution with a
BatchNorm already folded into its kernel and bias (see `iap_jax.models.resnet.fold_batch_norms`),
the residual sum and the ReLU in the same call. Which of them a model uses is decided once,
by `iap_jax.models.factory`; nothing here reads the backend or the device count.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from iap_jax.kernels import onednn

Padding = tuple[tuple[int, int], tuple[int, int]]

IMPLS = ("xla", "cpu_fast", "onednn")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


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


class Conv(nn.Module):
    """`flax.linen.Conv` subset (2-D, NHWC, no dilation or groups) computed by `impl`:
    "xla" runs `lax.conv_general_dilated`, "cpu_fast" `conv2d_cpu`, "onednn" `conv2d_onednn`.
    Parameters are identical in every case."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    impl: str = "cpu_fast"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.impl not in IMPLS:
            raise ValueError(f"Conv impl must be one of {IMPLS}, got {self.impl!r}")
        kernel_hw = tuple(self.kernel_size)
        strides = tuple(int(s) for s in self.strides)
        kernel = self.param(
            "kernel", self.kernel_init, kernel_hw + (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pads = explicit_padding(x.shape[1:3], kernel_hw, strides, self.padding)
        if self.impl == "onednn":
            y = _onednn_conv2d(x, kernel, strides, pads)
        elif self.impl == "cpu_fast":
            y = _conv2d(x, kernel, strides, pads)
        else:
            y = _xla_conv(x, kernel, strides, pads)
        return y if bias is None else y + bias


# The variable collection of folded kernels packed for oneDNN inference: made from a
# model's folded variables on the predicting machine, for one batch shape, never saved.
PACKED = "packed_inference"


class FoldedConv(nn.Module):
    """relu(conv(x) + bias [+ residual]) as one oneDNN inference call (forward only: for
    prediction), where kernel and bias are a convolution's with its BatchNorm folded in
    (`iap_jax.models.resnet.fold_batch_norms`). Parameters "kernel" (HWIO) and "bias" are
    float32; the activations are float32 or bfloat16 (`dtype`), the residual x's dtype.

    Applied with the PACKED collection mutable (`iap_jax.models.factory.prepare_inference`),
    it also stores its kernel packed once into the layout oneDNN reads for this input shape;
    applied with that collection present, it reads the packed kernel instead."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual=None, relu: bool = False) -> jnp.ndarray:
        kernel_hw = tuple(self.kernel_size)
        strides = tuple(int(s) for s in self.strides)
        kernel = self.param(
            "kernel", self.kernel_init, kernel_hw + (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        pads = explicit_padding(x.shape[1:3], kernel_hw, strides, self.padding)
        out_hw = _output_hw(x.shape[1:3], kernel_hw, strides, pads)
        kernel32, bias32 = kernel.astype(jnp.float32), bias.astype(jnp.float32)
        # Packed only on request, never by init: a model's variables hold no packed kernels.
        packing = self.is_mutable_collection(PACKED) and not self.is_initializing()
        if not (packing or self.has_variable(PACKED, "kernel")):
            return onednn.inference(x, kernel32.astype(x.dtype), bias32, strides, pads, out_hw,
                                    relu, residual)
        packed = self.variable(PACKED, "kernel", lambda: onednn.pack_weights(
            kernel32, x.shape, strides, pads, out_hw, relu, residual is not None, x.dtype))
        packed_bias = self.variable(PACKED, "bias", lambda: bias32)
        # The layout belongs to the input shape it was packed for, which this empty array's
        # shape records (the later size checks are a backstop: they pass a layout of the
        # same size).
        packed_for = self.variable(PACKED, "input_shape", lambda: jnp.zeros((*x.shape, 0)))
        if tuple(packed_for.value.shape[:-1]) != tuple(x.shape):
            raise ValueError(f"{self.name}: kernels packed for input {packed_for.value.shape[:-1]} "
                             f"applied to {tuple(x.shape)}; pack them for this shape")
        return onednn.inference(x, packed.value, packed_bias.value, strides, pads, out_hw,
                                relu, residual, kernel_shape=kernel.shape)


# Max pooling. XLA's CPU gradient of reduce_window is a select-and-scatter that runs slowly;
# here the gradient goes, like PyTorch's, to the first maximal position of each window,
# written as masks and the same fold as the convolutions' input gradient.
def _pool_windows(x, window, strides, padding: Padding):
    out_hw = _output_hw(x.shape[1:3], window, strides, padding)
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    return _window_slices(xp, out_hw, window, strides)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, padding: Padding, with_onednn: bool):
    if with_onednn:  # not differentiated: prediction and evaluation
        out_hw = _output_hw(x.shape[1:3], window, strides, padding)
        return onednn.max_pool(x, window, strides, padding, out_hw)
    return functools.reduce(jnp.maximum, _pool_windows(x, window, strides, padding))


def _max_pool_fwd(x, window, strides, padding, with_onednn: bool):
    # Differentiated (training), the maxima are XLA's even with oneDNN: the backward finds
    # each window's maximum by comparing it with y, and XLA may recompute x for those
    # comparisons (a BatchNorm and ReLU fused into them) with other rounding than the copy
    # a oneDNN call read, whose maxima then match no window (485 of 3200 in a tiny ResNet).
    y = _max_pool(x, window, strides, padding, False)
    return y, (x, y)


def _max_pool_bwd(window, strides, padding, with_onednn: bool, residuals, dy):
    x, y = residuals
    taken = jnp.zeros(y.shape, bool)
    pieces = []
    for piece in _pool_windows(x, window, strides, padding):
        first_max = (piece == y) & ~taken
        taken = taken | first_max
        pieces.append(jnp.where(first_max, dy, jnp.zeros((), dy.dtype)))
    return (_fold(pieces, x.shape, window, strides, padding),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(inputs: jnp.ndarray, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: Any = "VALID", *, impl: str = "cpu_fast") -> jnp.ndarray:
    """`flax.linen.max_pool` on 2-D NHWC maps with a CPU-fast gradient ("cpu_fast"); with
    "onednn", undifferentiated, oneDNN's pooling (about 6x faster than XLA's CPU loop on the
    224 px stem), and "xla" is flax's own."""
    if impl not in IMPLS:
        raise ValueError(f"max_pool impl must be one of {IMPLS}, got {impl!r}")
    window = tuple(int(w) for w in window_shape)
    strides = tuple(int(s) for s in (strides or (1,) * len(window)))
    if impl == "xla":
        return nn.max_pool(inputs, window, strides=strides, padding=padding)
    if inputs.ndim != 4 or len(window) != 2:
        raise ValueError(f"max_pool here takes NHWC maps and a 2-D window, got {inputs.shape}, {window}")
    pads = explicit_padding(inputs.shape[1:3], window, strides, padding)
    return _max_pool(inputs, window, strides, pads, impl == "onednn")
