"""A 2-D convolution that trains fast on XLA's CPU backend, and a Flax module for it.

XLA's CPU convolution is acceptable in the forward pass on large feature maps, but its
gradients (and any convolution on a tiny feature map) are several times slower than the
same arithmetic written as patches ("im2col") plus one matrix product. `conv2d_cpu` keeps
the forward convolution where XLA is fast and computes everything else as matrix
products inside a `jax.custom_vjp`:

  weight gradient  dW = patches(x)^T @ dy
  input gradient   dx = fold(dy @ W^T)   (fold = sum of shifted, strided pads: col2im)

`Conv` is a drop-in for `flax.linen.Conv` (NHWC, kernel HWIO named "kernel", optional
"bias"), so parameters are interchangeable between the XLA and the CPU-fast paths.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

Padding = tuple[tuple[int, int], tuple[int, int]]

CONV_IMPLS = ("auto", "xla", "cpu_fast")
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Output maps with at most this many pixels per image run the forward pass as a matrix
# product too: XLA's CPU convolution has a high fixed cost per output pixel row there.
_MATMUL_FORWARD_MAX_PIXELS = 64


def resolve_conv_impl(impl: str) -> str:
    """Maps "auto" to "cpu_fast" on the CPU backend and to "xla" elsewhere."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "cpu_fast" if jax.default_backend() == "cpu" else "xla"
    return impl


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


def _patches(x: jnp.ndarray, kernel_hw, strides, padding: Padding) -> jnp.ndarray:
    """[B, H, W, C] -> [B, Ho, Wo, kh*kw*C], channels ordered like an HWIO kernel reshape."""
    kh, kw = kernel_hw
    sh, sw = strides
    ho, wo = _output_hw(x.shape[1:3], kernel_hw, strides, padding)
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    batch, channels = x.shape[0], x.shape[3]
    cols = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (batch, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, channels),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _fold(dpatches: jnp.ndarray, in_shape, kernel_hw, strides, padding: Padding) -> jnp.ndarray:
    """Adjoint of `_patches`: scatters patch gradients back onto the input (col2im)."""
    batch, height, width, channels = in_shape
    kh, kw = kernel_hw
    sh, sw = strides
    _, ho, wo, _ = dpatches.shape
    padded_h = height + padding[0][0] + padding[0][1]
    padded_w = width + padding[1][0] + padding[1][1]
    pieces = dpatches.reshape(batch, ho, wo, kh * kw, channels)
    zero = jnp.zeros((), dpatches.dtype)
    total = None
    for index in range(kh * kw):
        i, j = divmod(index, kw)
        placed = lax.pad(
            pieces[:, :, :, index, :],
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


def _matmul(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """[..., K] @ [K, N] with f32 accumulation kept in the input dtype."""
    return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))


def _forward(x, kernel, strides, padding: Padding):
    kh, kw, cin, cout = kernel.shape
    ho, wo = _output_hw(x.shape[1:3], (kh, kw), strides, padding)
    if (kh, kw) == (1, 1) or ho * wo <= _MATMUL_FORWARD_MAX_PIXELS:
        return _matmul(_patches(x, (kh, kw), strides, padding), kernel.reshape(kh * kw * cin, cout))
    return lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=_DIMENSION_NUMBERS
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
    return _forward(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    flat_kernel = kernel.reshape(kh * kw * cin, cout)
    patches = _patches(x, (kh, kw), strides, padding)
    # Contract batch and both spatial axes at once: one large matrix product.
    dkernel = lax.dot_general(patches, dy, (((0, 1, 2), (0, 1, 2)), ((), ())))
    dpatches = lax.dot_general(dy, flat_kernel, (((3,), (1,)), ((), ())))
    dx = _fold(dpatches, x.shape, (kh, kw), strides, padding)
    return dx, dkernel.reshape(kernel.shape)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d_cpu(x: jnp.ndarray, kernel: jnp.ndarray, strides=(1, 1), padding: Any = "SAME") -> jnp.ndarray:
    """NHWC x HWIO convolution with a CPU-fast gradient; same result as `lax.conv_general_dilated`."""
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"expected NHWC input and HWIO kernel, got shapes {x.shape} and {kernel.shape}")
    if x.shape[3] != kernel.shape[2]:
        raise ValueError(f"input has {x.shape[3]} channels but the kernel expects {kernel.shape[2]}")
    strides = tuple(int(s) for s in strides)
    pads = explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)
    return _conv2d(x, kernel, strides, pads)


class Conv(nn.Module):
    """`flax.linen.Conv` subset (2-D, NHWC, no dilation or groups) with a selectable backend.

    impl: "xla" runs `lax.conv_general_dilated`; "cpu_fast" runs `conv2d_cpu`; "auto"
    picks "cpu_fast" only on the CPU backend. Parameters are identical in every case.
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
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel_hw = tuple(self.kernel_size)
        strides = tuple(self.strides)
        kernel = self.param(
            "kernel", self.kernel_init, kernel_hw + (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        pads = explicit_padding(x.shape[1:3], kernel_hw, strides, self.padding)
        if resolve_conv_impl(self.impl) == "cpu_fast":
            y = _conv2d(x, kernel, strides, pads)
        else:
            y = lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMENSION_NUMBERS)
        if bias is not None:
            y = y + bias
        return y
