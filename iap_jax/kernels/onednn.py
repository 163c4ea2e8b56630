"""oneDNN convolutions on the CPU, called from XLA as FFI custom calls.

XLA's CPU convolutions run at a fraction of the machine's speed on ResNet shapes (the weight
gradient of a 56 x 56, 64 -> 64 layer: 130 ms against 41 ms in PyTorch, which calls oneDNN).
`native/src/onednn_conv.cc` hands the three convolution products (forward, input gradient,
weight gradient) to oneDNN on NHWC / HWIO float32 buffers, so XLA keeps fusing everything
around them. The library is built once, when the package `iap-jax-native` (`native/`,
scikit-build-core and CMake against jaxlib's FFI headers and the onednn-devel-cpu-gomp wheel)
is installed: iap-jax's [cpu] extra installs it on Linux x86-64. This module only loads it.
Where it is not installed, `available()` is False, `unavailable_reason()` says why, and
"auto" falls back to the pure-JAX CPU convolution.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

TARGETS = {"forward": "IapConvForward", "input_grad": "IapConvInputGrad",
           "weight_grad": "IapConvWeightGrad", "inference": "IapConvInference",
           "pack": "IapConvPackWeights", "inference_bf16": "IapConvInferenceBf16",
           "pack_bf16": "IapConvPackWeightsBf16", "max_pool": "IapMaxPool",
           "max_pool_bf16": "IapMaxPoolBf16"}
# The inference convolution's activation dtypes (its bias is float32 either way); training's
# convolutions are float32 only.
INFERENCE_DTYPES = (jnp.float32, jnp.bfloat16)
_FFI_PREFIX = "iap_onednn_"
NOT_INSTALLED = ("the oneDNN convolutions are not installed: pip install 'iap-jax[cpu]' "
                 "(Linux x86-64) builds them")


class OnednnUnavailable(RuntimeError):
    """The oneDNN convolution library is not installed or cannot be loaded (the message says
    why)."""


def library_path() -> str | None:
    """The installed library (the iap-jax-native package's), or None."""
    try:
        import iap_jax_native
    except ImportError:
        return None
    return iap_jax_native.LIBRARY


def _preload_onednn() -> None:
    """Loads the onednn-cpu-gomp wheel's libdnnl by its path, so that the kernel library finds
    it wherever this environment's lib folder is (its runpath covers a plain venv only)."""
    try:
        dist = importlib.metadata.distribution("onednn-cpu-gomp")
    except importlib.metadata.PackageNotFoundError:
        return  # another oneDNN (ONEDNN_ROOT at build time): the loader's search path
    for file in dist.files or ():
        if str(file).endswith("libdnnl.so.3"):
            ctypes.CDLL(os.path.realpath(dist.locate_file(file)), mode=ctypes.RTLD_GLOBAL)
            return


_LIBRARY: dict = {}


@functools.cache
def _load() -> str | None:
    """Loads and registers the installed library once; None, or why it cannot."""
    if sys.platform != "linux":
        return f"the oneDNN convolutions are built for Linux only, not {sys.platform}"
    path = library_path()
    if path is None:
        return NOT_INSTALLED
    if not os.path.exists(path):
        return f"{path} is missing: reinstall iap-jax's [cpu] extra"
    try:
        _preload_onednn()
        library = ctypes.cdll.LoadLibrary(path)
        size_query = library.iap_onednn_packed_weight_bytes
        size_query.restype = ctypes.c_int64
        size_query.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 3 + [ctypes.c_int64] * 9
        _LIBRARY["packed_weight_bytes"] = size_query
        native = library.iap_onednn_bf16_inference_native
        native.restype = ctypes.c_int64
        native.argtypes = [ctypes.POINTER(ctypes.c_int64)] * 3 + [ctypes.c_int64] * 6
        _LIBRARY["bf16_native"] = native
        for name in TARGETS.values():
            jax.ffi.register_ffi_target(_FFI_PREFIX + name, jax.ffi.pycapsule(getattr(library, name)),
                                        platform="cpu")
    except (OSError, AttributeError) as error:
        return f"loading {path} failed: {error}"
    return None


def available() -> bool:
    return _load() is None


def unavailable_reason() -> str | None:
    return _load()


def _attributes(strides, padding) -> dict:
    (top, bottom), (left, right) = padding
    values = dict(stride_h=strides[0], stride_w=strides[1], pad_top=top, pad_bottom=bottom,
                  pad_left=left, pad_right=right)
    return {k: np.int64(v) for k, v in values.items()}


def _call(target: str, shape, a, b, strides, padding, *extra, aliases=None, dtype=jnp.float32,
          **attributes):
    reason = _load()
    if reason is not None:
        raise OnednnUnavailable(f"oneDNN convolutions unavailable: {reason}")
    if a.dtype != dtype or b.dtype != dtype:
        raise TypeError(f"oneDNN convolutions here take {jnp.dtype(dtype)}, got {a.dtype} and {b.dtype}")
    result = jax.ShapeDtypeStruct(tuple(shape), dtype)
    attributes = {k: v if isinstance(v, np.ndarray) else np.int64(v) for k, v in attributes.items()}
    return jax.ffi.ffi_call(_FFI_PREFIX + TARGETS[target], result, vmap_method="sequential",
                            input_output_aliases=aliases)(
        a, b, *extra, **_attributes(strides, padding), **attributes)


def forward(x, kernel, strides, padding, out_hw):
    shape = (x.shape[0], *out_hw, kernel.shape[3])
    return _call("forward", shape, x, kernel, strides, padding)


def _inference_geometry(x_shape, kernel_shape, out_hw):
    return (tuple(int(d) for d in x_shape), tuple(int(d) for d in kernel_shape),
            (int(x_shape[0]), *map(int, out_hw), int(kernel_shape[3])))


def _inference_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype not in INFERENCE_DTYPES:
        raise TypeError(f"oneDNN inference convolutions take float32 or bfloat16, not {dtype}")
    return dtype


def packed_weight_size(x_shape, kernel_shape, strides, padding, out_hw, relu: bool,
                       residual: bool, dtype=jnp.float32) -> int:
    """Elements (of `dtype`, the activations') of a kernel packed (`pack_weights`) for an
    inference geometry."""
    dtype = _inference_dtype(dtype)
    reason = _load()
    if reason is not None:
        raise OnednnUnavailable(f"oneDNN convolutions unavailable: {reason}")
    x, w, y = _inference_geometry(x_shape, kernel_shape, out_hw)
    (top, bottom), (left, right) = padding
    arrays = [(ctypes.c_int64 * 4)(*dims) for dims in (x, w, y)]
    size = _LIBRARY["packed_weight_bytes"](*arrays, strides[0], strides[1], top, bottom, left,
                                           right, int(bool(residual)), int(bool(relu)),
                                           int(dtype == jnp.bfloat16))
    if size < 0:
        raise OnednnUnavailable(f"oneDNN has no {dtype} inference convolution for input {x}, "
                                f"kernel {w} on this CPU")
    return size // dtype.itemsize


@functools.cache
def bfloat16_inference_available() -> bool:
    """Whether this CPU has native oneDNN bfloat16 inference convolutions (AVX-512 ones; AMX
    makes them fast), probed on a small geometry: oneDNN's reference kernel, which runs
    anywhere, is far too slow to count."""
    if not available():
        return False
    dims = [(ctypes.c_int64 * 4)(*d) for d in ((1, 8, 8, 16), (3, 3, 16, 16), (1, 8, 8, 16))]
    return bool(_LIBRARY["bf16_native"](*dims, 1, 1, 1, 1, 1, 1))


def pack_weights(kernel, x_shape, strides, padding, out_hw, relu: bool, residual: bool,
                 dtype=jnp.float32):
    """A float32 HWIO kernel reordered once into the layout `inference(..., kernel_shape=...)`
    reads for this geometry and activation dtype (a 1-D array of that dtype; valid in this
    process, for this geometry only)."""
    dtype = _inference_dtype(dtype)
    x, w, y = _inference_geometry(x_shape, kernel.shape, out_hw)
    size = packed_weight_size(x, w, strides, padding, out_hw, relu, residual, dtype)
    if kernel.dtype != jnp.float32:
        raise TypeError(f"kernels are packed from float32, got {kernel.dtype}")
    result = jax.ShapeDtypeStruct((size,), dtype)
    target = TARGETS["pack_bf16" if dtype == jnp.bfloat16 else "pack"]
    return jax.ffi.ffi_call(_FFI_PREFIX + target, result, vmap_method="sequential")(
        kernel, src=np.asarray(x, np.int64), dst=np.asarray(y, np.int64),
        **_attributes(strides, padding), sum=np.int64(bool(residual)), relu=np.int64(bool(relu)))


def inference(x, kernel, bias, strides, padding, out_hw, relu: bool, residual=None,
              kernel_shape=None):
    """relu(conv(x, kernel) + bias [+ residual]) in one oneDNN call (forward only: for
    prediction, with BatchNorm folded into kernel and bias), in x's dtype (float32 or
    bfloat16; kernel and residual the same, the bias float32). The residual's buffer becomes
    the output (XLA copies it first where it is still needed). With kernel_shape (HWIO),
    `kernel` is `pack_weights`' 1-D array for this geometry instead of the kernel."""
    dtype = _inference_dtype(x.dtype)
    packed = kernel_shape is not None
    kernel_shape = tuple(int(d) for d in (kernel_shape if packed else kernel.shape))
    shape = (x.shape[0], *out_hw, kernel_shape[3])
    if bias.shape != (kernel_shape[3],):
        raise ValueError(f"expected a bias of shape {(kernel_shape[3],)}, got {bias.shape}")
    if packed:
        # Size only, a backstop: a layout of the same size passes (Conv checks the geometry).
        want = packed_weight_size(x.shape, kernel_shape, strides, padding, out_hw, relu,
                                  residual is not None, dtype)
        if kernel.shape != (want,):
            raise ValueError(f"packed weights of shape {kernel.shape} are not the ({want},) this "
                             f"geometry reads: pack them for input {tuple(x.shape)}")
    extra = (bias.astype(jnp.float32),)
    aliases = None
    if residual is not None:
        if tuple(residual.shape) != shape or residual.dtype != dtype:
            raise ValueError(f"the residual must be {dtype} of shape {shape}, got "
                             f"{residual.dtype} {tuple(residual.shape)}")
        extra += (residual,)
        aliases = {3: 0}
    target = "inference_bf16" if dtype == jnp.bfloat16 else "inference"
    return _call(target, shape, x, kernel, strides, padding, *extra, aliases=aliases, dtype=dtype,
                 kernel=np.asarray(kernel_shape, np.int64), packed=packed, relu=bool(relu))


def max_pool(x, window, strides, padding, out_hw):
    """NHWC max pooling (forward only), float32 or bfloat16 (bfloat16 where
    bfloat16_inference_available())."""
    reason = _load()
    if reason is not None:
        raise OnednnUnavailable(f"oneDNN convolutions unavailable: {reason}")
    dtype = _inference_dtype(x.dtype)
    result = jax.ShapeDtypeStruct((x.shape[0], *out_hw, x.shape[3]), dtype)
    target = TARGETS["max_pool_bf16" if dtype == jnp.bfloat16 else "max_pool"]
    return jax.ffi.ffi_call(_FFI_PREFIX + target, result, vmap_method="sequential")(
        x, window_h=np.int64(window[0]), window_w=np.int64(window[1]),
        **_attributes(strides, padding))


def input_grad(dy, kernel, x_shape, strides, padding, after):
    """`after` (the layer's weight gradient) is not read; it makes XLA run this call after
    that one instead of beside it, where the two would compete for the same cores."""
    return _call("input_grad", x_shape, dy, kernel, strides, padding, after)


def weight_grad(x, dy, kernel_shape, strides, padding):
    if tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) != (1, 1) and \
            all(p == (0, 0) for p in map(tuple, padding)):
        # A strided 1x1 convolution reads only every stride-th pixel: its weight gradient is
        # the unstrided one of those pixels. oneDNN 3.2's strided 1x1 weight gradient
        # corrupts the heap with few input channels (8 channels, batch 16, 56 px), and
        # this reads less besides.
        x = x[:, ::strides[0], ::strides[1], :][:, :dy.shape[1], :dy.shape[2], :]
        strides = (1, 1)
    return _call("weight_grad", kernel_shape, x, dy, strides, padding)
