"""ResNet v1.5 (18/34/50 and a tiny test variant) for 1-channel images with one head per IAP.

Shapes follow torchvision's ResNet (7x7 stride-2 stem, 3x3 stride-2 max pool, stride in
the 3x3 convolution of a bottleneck, PyTorch paddings and BatchNorm constants) so that
results and parameter counts compare directly with the paper's PyTorch model.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

# A module class, or a functools.partial of one, that the model instantiates (the layers
# are injected: `iap_jax.models.factory` supplies CPU kernels where they are wanted).
ModuleDef = Any

# PyTorch's BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He initialisation on fan-out, as torchvision initialises its convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Layers(nn.Module):
    """The injected layers, and how every block builds a convolution with its norm.

    conv: `nn.Conv`'s signature (features, kernel_size, strides, padding, use_bias, dtype,
    kernel_init); norm: `nn.BatchNorm`'s (use_running_average, momentum, epsilon, dtype);
    pool: `nn.max_pool`'s. folded_conv: for inference on `fold_batch_norms`' parameters, a
    module (features, kernel_size, strides, padding, dtype) with params "kernel" and "bias"
    computing [ReLU](conv(x) + bias [+ residual]) from `(x, residual=, relu=)`; None keeps
    each convolution and its BatchNorm apart.
    """

    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = nn.BatchNorm
    folded_conv: ModuleDef | None = None

    def layers(self) -> dict:
        return dict(dtype=self.dtype, conv=self.conv, norm=self.norm, folded_conv=self.folded_conv)

    def conv_norm(self, x, train: bool, features: int, kernel: int, stride: int = 1, *,
                  relu: bool = True, residual=None, names=(None, None)) -> jnp.ndarray:
        """[ReLU](norm(conv(x)) [+ residual]): a convolution and its BatchNorm (variables
        named `names`), or with folded_conv the one module that holds both folded."""
        pad = kernel // 2
        geometry = dict(kernel_size=(kernel, kernel), strides=(stride, stride),
                        padding=((pad, pad), (pad, pad)), dtype=self.dtype)
        if self.folded_conv is not None:
            if train:
                raise ValueError("a ResNet with folded BatchNorms is for inference only")
            return self.folded_conv(features, name=names[0], **geometry)(
                x, residual=residual, relu=relu)
        y = self.conv(features, use_bias=False, kernel_init=conv_kernel_init, name=names[0],
                      **geometry)(x)
        y = self.norm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      dtype=self.dtype, name=names[1])(y)
        if residual is not None:
            y = y + residual
        return nn.relu(y) if relu else y


def _block_names(index: int) -> tuple[str, str]:
    # Flax's automatic names for a block's unnamed Conv and BatchNorm, fixed so that the
    # variables do not depend on the injected classes' names.
    return f"Conv_{index}", f"BatchNorm_{index}"


class _Block(_Layers):
    features: int = 64
    stride: int = 1

    def shortcut(self, x, train: bool, out_features: int) -> jnp.ndarray:
        """x, or its 1x1 projection where the block changes the map's size or width."""
        if self.stride == 1 and x.shape[-1] == out_features:
            return x
        return self.conv_norm(x, train, out_features, 1, self.stride, relu=False,
                              names=("proj_conv", "proj_norm"))


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        residual = self.shortcut(x, train, self.features)
        y = self.conv_norm(x, train, self.features, 3, self.stride, names=_block_names(0))
        return self.conv_norm(y, train, self.features, 3, residual=residual, names=_block_names(1))


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        residual = self.shortcut(x, train, self.features * 4)
        y = self.conv_norm(x, train, self.features, 1, names=_block_names(0))
        y = self.conv_norm(y, train, self.features, 3, self.stride, names=_block_names(1))
        return self.conv_norm(y, train, self.features * 4, 1, residual=residual,
                              names=_block_names(2))


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(_Layers):
    """Multi-task ResNet: returns {head name: [batch, head size] float32} for [B, H, W, C] input.

    head_sizes: logits size for a categorical IAP, 1 for a continuous one.
    dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
    conv, norm, pool, folded_conv: the layers (see _Layers); plain Flax by default.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    head_sizes: Mapping[str, int] = None
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> dict[str, jnp.ndarray]:
        if x.ndim != 4:
            raise ValueError(f"ResNet expects [batch, height, width, channels] input, got shape {x.shape}")
        if not self.head_sizes:
            raise ValueError("ResNet needs at least one head in head_sizes")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        block_cls = BLOCKS[self.block]
        x = jnp.asarray(x, self.dtype)
        x = self.conv_norm(x, train, self.width, 7, 2, names=("stem_conv", "stem_norm"))
        # PyTorch's MaxPool2d(3, stride=2, padding=1).
        x = self.pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self._sow_statistics("stage0", x)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = block_cls(
                    features=self.width * 2**stage,
                    stride=2 if stage > 0 and index == 0 else 1,
                    name=f"stage{stage + 1}_block{index + 1}",
                    **self.layers(),
                )(x, train)
            self._sow_statistics(f"stage{stage + 1}", x)
        # Pooling and heads in float32: bf16 would round logits and regression outputs.
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        self.sow("intermediates", "features", features)
        return {
            name: nn.Dense(size, dtype=jnp.float32, name=f"head_{name}")(features)
            for name, size in self.head_sizes.items()
        }

    def _sow_statistics(self, name: str, x: jnp.ndarray) -> None:
        """The channel means and standard deviations of a stage's output over the image (its
        texture statistics: what tells one scanner's noise, filter and coils from another's;
        stage0: the stem's), for out-of-distribution scores. Apply with
        mutable=["intermediates"] to get them and the pooled features; otherwise sow is a
        no-op and XLA drops the computation."""
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=(1, 2))
        std = jnp.sqrt(jnp.maximum(jnp.mean(x * x, axis=(1, 2)) - mean * mean, 0.0))
        self.sow("intermediates", name, jnp.concatenate([mean, std], axis=-1))


ARCHITECTURES = {
    "resnet18": dict(stage_sizes=(2, 2, 2, 2), block="basic"),
    "resnet34": dict(stage_sizes=(3, 4, 6, 3), block="basic"),
    "resnet50": dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"),
    "tiny": dict(stage_sizes=(1, 1), block="basic"),
}


def make_model(
    name: str,
    head_sizes: Mapping[str, int],
    width: int | None = None,
    dtype: Any = jnp.float32,
    **layers: Any,
) -> ResNet:
    """Builds a named ResNet; width defaults to 64 (8 for "tiny"); layers: conv, norm,
    pool, folded_conv (plain Flax where not given)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}")
    for head, size in head_sizes.items():
        if int(size) < 1:
            raise ValueError(f"head {head!r} needs a positive output size, got {size}")
    if width is None:
        width = 8 if name == "tiny" else 64
    return ResNet(head_sizes=dict(head_sizes), width=width, dtype=dtype, **ARCHITECTURES[name], **layers)


def _norm_name(conv_name: str) -> str | None:
    """The BatchNorm that follows a convolution of that name in this model, if it is one."""
    if conv_name.endswith("_conv"):
        return conv_name[: -len("conv")] + "norm"
    if conv_name.startswith("Conv_"):
        return "BatchNorm_" + conv_name[len("Conv_"):]
    return None


def fold_batch_norms(variables: Mapping[str, Any], epsilon: float = BN_EPSILON) -> dict:
    """A ResNet's {"params", "batch_stats"} -> {"params"} of the same model with its
    BatchNorms folded into the convolutions before them (for a ResNet built with a
    folded_conv): each convolution's kernel scaled by its norm's scale / sqrt(var + eps) per
    output channel and a bias of norm bias - mean * that multiplier, in float32, the
    norms dropped. Inference with running averages computes the same map, in one pass
    fewer over every activation."""
    def fold(params: Mapping[str, Any], stats: Mapping[str, Any]) -> dict:
        norms = {_norm_name(k) for k in params if _norm_name(k) in params}
        folded = {}
        for key, value in params.items():
            norm = _norm_name(key)
            if key in norms:
                continue
            if norm in norms:
                multiplier = lax.rsqrt(stats[norm]["var"] + epsilon) * params[norm]["scale"]
                shift = params[norm]["bias"] - stats[norm]["mean"] * multiplier
                if "bias" in value:
                    shift = shift + value["bias"].astype(jnp.float32) * multiplier
                folded[key] = {"kernel": value["kernel"].astype(jnp.float32) * multiplier,
                               "bias": shift}
            elif isinstance(value, Mapping):
                folded[key] = fold(value, stats.get(key, {}))
            else:
                folded[key] = value
        return folded

    return {"params": fold(variables["params"], variables.get("batch_stats", {}))}
