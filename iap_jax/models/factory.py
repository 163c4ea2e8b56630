"""The model factory that training and prediction both call.

A checkpoint records the model config it was trained with; prediction rebuilds the same
module with a convolution and compute dtype fit for the machine it runs on (parameters
are the same whatever the convolution, so a bf16 GPU checkpoint predicts on a CPU).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from iap_jax.models import onednn
from iap_jax.models.conv import resolve_conv_impl, resolve_inference_conv_impl
from iap_jax.models.resnet import ResNet, make_model


def build_model(model_config: Mapping[str, Any], head_sizes: Mapping[str, int], *,
                conv_impl: str | None = None, dtype: str | None = None,
                fold_norms: bool = True) -> ResNet:
    """The ResNet named by a model config ({name, width, dtype, conv_impl}), with its
    convolution and dtype optionally replaced. fold_norms=False keeps BatchNorm a pass of
    its own at inference with oneDNN (the same numbers within float rounding, slower)."""
    model = make_model(model_config["name"], head_sizes, width=model_config["width"],
                       dtype=jnp.dtype(dtype or model_config["dtype"]),
                       conv_impl=conv_impl or model_config["conv_impl"])
    return model if fold_norms else model.clone(fold_norms=False)


def describe_convolutions(conv_impl: str, dtype: str, inference: bool = False) -> str:
    """Which convolution a model runs here (for training, or with inference=True for a
    prediction's folded forward), and why not oneDNN where that was possible."""
    impl = (resolve_inference_conv_impl if inference else resolve_conv_impl)(conv_impl, dtype)
    reason = onednn.unavailable_reason() if impl == "cpu_fast" and conv_impl == "auto" else None
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
