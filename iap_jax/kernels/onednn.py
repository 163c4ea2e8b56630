"""oneDNN convolutions on the CPU, called from XLA as FFI custom calls.

XLA's CPU convolutions run at a fraction of the machine's speed on ResNet shapes (the weight
gradient of a 56 x 56, 64 -> 64 layer: 130 ms against 41 ms in PyTorch, which calls oneDNN).
`iap_jax/kernels/native/onednn_conv.cc` hands the three convolution products (forward, input
gradient, weight gradient) to oneDNN on NHWC / HWIO float32 buffers, so XLA keeps fusing
everything around them. The library is compiled on first use against the installed jaxlib's
FFI headers and oneDNN (the onednn-devel-cpu-gomp wheel that setup.py installs on Linux
x86-64; another install: IAP_JAX_ONEDNN_ROOT=<prefix with include/ and lib/>; else the
compiler's default paths, e.g. Debian's libdnnl-dev), then cached under IAP_JAX_CACHE
(default ~/.cache/iap_jax). Where it cannot be built, `available()` is False,
`unavailable_reason()` says why, and "auto" falls back to the pure-JAX CPU convolution.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).resolve().parent / "native" / "onednn_conv.cc"
TARGETS = {"forward": "IapConvForward", "input_grad": "IapConvInputGrad",
           "weight_grad": "IapConvWeightGrad", "inference": "IapConvInference",
           "pack": "IapConvPackWeights", "inference_bf16": "IapConvInferenceBf16",
           "pack_bf16": "IapConvPackWeightsBf16", "max_pool": "IapMaxPool",
           "max_pool_bf16": "IapMaxPoolBf16"}
# The inference convolution's activation dtypes (its bias is float32 either way); training's
# convolutions are float32 only.
INFERENCE_DTYPES = (jnp.float32, jnp.bfloat16)
_FFI_PREFIX = "iap_onednn_"

class OnednnUnavailable(RuntimeError):
    """The oneDNN convolution library could not be built or loaded (the message says why)."""


def cache_dir() -> Path:
    base = os.environ.get("IAP_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "iap_jax")
    return Path(base)


def onednn_root() -> str | None:
    """The prefix holding include/oneapi/dnnl and lib/libdnnl.so: IAP_JAX_ONEDNN_ROOT, else
    this environment's (the onednn-devel-cpu-gomp wheel installs there), else None (the
    compiler's default paths, e.g. Debian's libdnnl-dev)."""
    root = os.environ.get("IAP_JAX_ONEDNN_ROOT")
    if root:
        return root
    if os.path.exists(os.path.join(sys.prefix, "include", "oneapi", "dnnl", "dnnl.hpp")):
        return sys.prefix
    return None


def _build_flags() -> list[str]:
    root = onednn_root()
    if not root:
        return []
    return [f"-I{root}/include", f"-L{root}/lib", f"-Wl,-rpath,{root}/lib"]


def library_path() -> Path:
    """Where the compiled library for this source, jaxlib and oneDNN location is cached."""
    import jaxlib

    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(jaxlib.__version__.encode())
    key.update(" ".join(_build_flags()).encode())
    return cache_dir() / f"onednn_conv-{key.hexdigest()[:16]}.so"


def build(path: Path) -> Path:
    """Compiles the library to `path` (atomically, so parallel builders cannot collide)."""
    compiler = os.environ.get("CXX", "c++")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
               f"-I{jax.ffi.include_dir()}", *_build_flags(), str(SOURCE), "-o", tmp, "-ldnnl"]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except FileNotFoundError:
        os.unlink(tmp)
        raise OnednnUnavailable(f"no C++ compiler {compiler!r} (set CXX)") from None
    if result.returncode != 0:
        os.unlink(tmp)
        lines = [line for line in result.stderr.splitlines() if "error" in line] or \
            result.stderr.splitlines()[-3:]
        hint = " (install oneDNN: pip install onednn-devel-cpu-gomp)" if "dnnl" in result.stderr else ""
        raise OnednnUnavailable(f"compiling {SOURCE.name} failed{hint}: " + " | ".join(lines[:3]))
    os.replace(tmp, path)
    return path


def _trusted(path: Path) -> bool:
    """Whether a cached library may be loaded: a regular file owned by this user that no one
    else can write (else it is rebuilt, so nobody can plant code in a shared cache)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


_LIBRARY: dict = {}


@functools.cache
def _load() -> str | None:
    """Builds (once per machine), loads and registers the library; None or why it failed."""
    if sys.platform != "linux":
        return f"the oneDNN convolutions are built for Linux only, not {sys.platform}"
    try:
        path = library_path()
        if not path.exists() or not _trusted(path):
            build(path)
        library = ctypes.cdll.LoadLibrary(str(path))
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
    except (OnednnUnavailable, OSError) as error:
        return str(error)
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
