"""The model factory that training and prediction both call.

A checkpoint records the model config it was trained with; prediction rebuilds the same
module with a convolution and compute dtype fit for the machine it runs on (parameters
are the same whatever the convolution, so a bf16 GPU checkpoint predicts on a CPU).

The layers are chosen here, once, from explicit arguments: the config's conv_impl and
dtype, and the backend and device count the model runs on (given by the caller, else this
process's, read when the model is built). The model itself knows no kernel: the CPU ones
(`iap_jax.kernels`) are imported only where they are asked for.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from iap_jax.models.resnet import ResNet, fold_batch_norms
from iap_jax.models.resnet import make_model as _make_resnet

CONV_IMPLS = ("auto", "xla", "cpu_fast", "onednn")


def _onednn():
    from iap_jax.kernels import onednn

    return onednn


def _machine(backend: str | None, device_count: int | None) -> tuple[str, int]:
    return (backend or jax.default_backend(),
            jax.device_count() if device_count is None else int(device_count))


def resolve_conv_impl(impl: str, dtype: Any = None, *, backend: str | None = None,
                      device_count: int | None = None) -> str:
    """Maps "auto" to "xla" off the CPU; on the CPU to "onednn" where oneDNN is available,
    the computation is float32 and there is a single device (a custom call is not split
    over a mesh), else to "cpu_fast". backend and device_count default to this process's."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    float32 = dtype is None or jnp.dtype(dtype) == jnp.float32
    if impl == "xla" or impl == "cpu_fast":
        return impl
    backend, device_count = _machine(backend, device_count)
    if impl == "auto":
        if backend != "cpu":
            return "xla"
        single = device_count == 1
        return "onednn" if float32 and single and _onednn().available() else "cpu_fast"
    if not float32:
        raise ValueError(f"conv_impl 'onednn' computes in float32, not {jnp.dtype(dtype)}")
    if device_count > 1:
        raise ValueError(f"conv_impl 'onednn' runs on a single device, and JAX has "
                         f"{device_count}; use 'auto' or 'cpu_fast'")
    onednn = _onednn()
    reason = onednn.unavailable_reason()
    if reason is not None:
        raise onednn.OnednnUnavailable(f"conv_impl 'onednn' is unavailable: {reason}")
    return impl


def wants_one_cpu_device(conv_impl: str, dtype: Any = None) -> bool:
    """Whether this conv_impl and dtype, on a CPU, convolve in oneDNN, which uses every core
    from one device and runs on a single device only. Asked before any backend starts (to
    choose the CPU device count), so it reads nothing of JAX's state."""
    float32 = dtype is None or jnp.dtype(dtype) == jnp.float32
    return conv_impl in ("auto", "onednn") and float32 and _onednn().available()


def resolve_inference_conv_impl(impl: str, dtype: Any = None, *, backend: str | None = None,
                                device_count: int | None = None) -> str:
    """The convolution an inference forward runs: as resolve_conv_impl, except that
    bfloat16 on a CPU runs oneDNN's bfloat16 inference convolution where this CPU has one
    (AVX-512; AMX makes it several times float32's speed). Training's oneDNN convolutions
    stay float32."""
    bfloat16 = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if bfloat16 and impl in ("auto", "onednn"):
        backend, device_count = _machine(backend, device_count)
        if backend == "cpu" and device_count == 1 and _onednn().available():
            if _onednn().bfloat16_inference_available():
                return "onednn"
            if impl == "onednn":
                raise ValueError("conv_impl 'onednn' has no bfloat16 inference convolution on "
                                 "this CPU (it needs AVX-512); use float32")
    return resolve_conv_impl(impl, dtype, backend=backend, device_count=device_count)


def layers(conv_impl: str, dtype: Any, *, inference: bool = False, fold_norms: bool = True,
           backend: str | None = None, device_count: int | None = None) -> dict:
    """The ResNet's conv, norm, pool and folded_conv for this conv_impl and dtype: {} (plain
    Flax) for XLA; else the CPU kernels. inference: for a model only ever applied with
    train=False (prediction), whose convolutions are oneDNN's fused inference ones where
    those run, with its BatchNorms folded into them (unless fold_norms=False)."""
    machine = dict(backend=backend, device_count=device_count)
    # (The checks of resolve_conv_impl first: an unusable explicit choice is an error.)
    train_impl = resolve_conv_impl(conv_impl, dtype, **machine)
    infer_impl = resolve_inference_conv_impl(conv_impl, dtype, **machine)
    if train_impl == "xla" and infer_impl == "xla":
        return {}
    from iap_jax.kernels import conv, norm

    result = dict(norm=norm.BatchNorm,
                  # An undifferentiated max pool is oneDNN's wherever its inference
                  # convolutions run (its gradient stays the CPU-fast one).
                  pool=functools.partial(conv.max_pool, impl="onednn" if infer_impl == "onednn"
                                         else train_impl))
    if train_impl != "xla":
        result["conv"] = functools.partial(conv.Conv, impl=train_impl)
    if inference and fold_norms and infer_impl == "onednn":
        result["folded_conv"] = conv.FoldedConv
    return result


def make_model(name: str, head_sizes: Mapping[str, int], width: int | None = None,
               dtype: Any = jnp.float32, conv_impl: str = "auto", *, inference: bool = False,
               fold_norms: bool = True, backend: str | None = None,
               device_count: int | None = None) -> ResNet:
    """A named ResNet (resnet.make_model) with the layers of `layers(...)`."""
    return _make_resnet(name, head_sizes, width=width, dtype=dtype,
                        **layers(conv_impl, dtype, inference=inference, fold_norms=fold_norms,
                                 backend=backend, device_count=device_count))


def build_model(model_config: Mapping[str, Any], head_sizes: Mapping[str, int], *,
                conv_impl: str | None = None, dtype: str | None = None,
                inference: bool = False, fold_norms: bool = True,
                backend: str | None = None, device_count: int | None = None) -> ResNet:
    """The ResNet named by a model config ({name, width, dtype, conv_impl}), with its
    convolution and dtype optionally replaced. inference: see `layers`; such a model is
    applied to `prepare_inference`'s variables. fold_norms=False keeps BatchNorm a pass of
    its own at inference with oneDNN (the same numbers within float rounding, slower)."""
    return make_model(model_config["name"], head_sizes, width=model_config["width"],
                      dtype=jnp.dtype(dtype or model_config["dtype"]),
                      conv_impl=conv_impl or model_config["conv_impl"], inference=inference,
                      fold_norms=fold_norms, backend=backend, device_count=device_count)


def is_folded(model: ResNet) -> bool:
    """Whether a model runs on `fold_batch_norms`' parameters."""
    return model.folded_conv is not None


def prepare_inference(model: ResNet, variables: Mapping[str, Any], input_shape) -> dict:
    """A checkpoint's {"params", "batch_stats"} as `model.apply(..., train=False)` takes them
    on inputs of `input_shape`: for a folded model, BatchNorms folded into the convolutions
    (`fold_batch_norms`, a transform of the parameter tree) and, with oneDNN, every kernel
    packed once into the layout its convolution reads (the kernels' PACKED collection,
    made on the predicting machine for this batch shape, never saved), instead of at every
    call. Otherwise the variables come back as they were, and nothing is traced."""
    if not is_folded(model):
        return variables
    from iap_jax.kernels.conv import PACKED

    def prepare(variables):
        folded = fold_batch_norms(variables)
        # Only the packing is kept: the forward's convolutions are unused and dropped.
        return folded, model.apply(folded, jnp.zeros(tuple(input_shape), jnp.float32),
                                   train=False, mutable=[PACKED])[1].get(PACKED, {})

    folded, collection = jax.jit(prepare)(dict(variables))  # one compilation
    return {**folded, PACKED: collection} if collection else folded


def describe_convolutions(conv_impl: str, dtype: str, inference: bool = False, *,
                          backend: str | None = None, device_count: int | None = None) -> str:
    """Which convolution a model runs here (for training, or with inference=True for a
    prediction's folded forward), and why not oneDNN where that was possible."""
    resolve = resolve_inference_conv_impl if inference else resolve_conv_impl
    impl = resolve(conv_impl, dtype, backend=backend, device_count=device_count)
    reason = _onednn().unavailable_reason() if impl == "cpu_fast" and conv_impl == "auto" else None
    return impl + (f" (oneDNN unavailable: {reason})" if reason else "")


def inference_settings(model_config: Mapping[str, Any], conv_impl: str | None = None,
                       dtype: str | None = None) -> tuple[str, str]:
    """(conv_impl, dtype) for predicting on this machine: the flags where given; else "auto"
    convolutions, and the trained dtype on accelerators but float32 on a CPU (the same
    numbers as training's float32 evaluation; `--dtype bfloat16` runs oneDNN's bfloat16
    inference convolutions where the CPU has them, several times faster with AMX)."""
    if dtype is None:
        dtype = "float32" if jax.default_backend() == "cpu" else str(model_config["dtype"])
    return conv_impl or "auto", dtype
