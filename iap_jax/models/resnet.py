"""ResNet v1.5 (18/34/50 and a tiny test variant) for 1-channel images with one head per IAP.

Shapes follow torchvision's ResNet (7x7 stride-2 stem, 3x3 stride-2 max pool, stride in
the 3x3 convolution of a bottleneck, PyTorch paddings and BatchNorm constants) so that
results and parameter counts compare directly with the paper's PyTorch model.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from iap_jax.models.conv import Conv, max_pool_3x3_stride2, resolve_conv_impl, resolve_inference_conv_impl
from iap_jax.models.norm import BatchNorm

# PyTorch's BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He initialisation on fan-out, as torchvision initialises its convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Layers(nn.Module):
    """Shared constructors so every block builds convolutions and norms the same way."""

    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    # At inference with oneDNN, each BatchNorm folds into its convolution, which also adds
    # the residual and applies the ReLU (one call, no pass over the activations between).
    fold_norms: bool = True

    def conv(self, features: int, kernel: int, stride: int = 1, name: str | None = None) -> Conv:
        pad = kernel // 2
        return Conv(
            features,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=conv_kernel_init,
            impl=self.conv_impl,
            name=name,
        )

    def norm(self, train: bool, name: str | None = None) -> nn.Module:
        # The same variables either way; the closed-form gradient is the CPU's faster one.
        resolve = resolve_conv_impl if train else resolve_inference_conv_impl
        cpu = resolve(self.conv_impl, self.dtype) in ("cpu_fast", "onednn")
        return (BatchNorm if cpu else nn.BatchNorm)(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            name=name,
        )


    def conv_norm(self, x, train: bool, features: int, kernel: int, stride: int = 1, *,
                  relu: bool = True, residual=None, names=(None, None)) -> jnp.ndarray:
        """[ReLU](norm(conv(x)) [+ residual]): a convolution and its BatchNorm (variables
        named as when built apart), folded into one oneDNN call at inference."""
        conv = self.conv(features, kernel, stride, name=names[0])
        norm = self.norm(train, name=names[1])
        if self.fold_norms and not train and \
                resolve_inference_conv_impl(self.conv_impl, self.dtype) == "onednn":
            return conv(x, affine=norm(fold_channels=features), residual=residual, relu=relu)
        # Conv takes affine/residual/relu only as one oneDNN call; here they follow it.
        y = norm(conv(x))
        if residual is not None:
            y = y + residual
        return nn.relu(y) if relu else y


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
        y = self.conv_norm(x, train, self.features, 3, self.stride)
        return self.conv_norm(y, train, self.features, 3, residual=residual)


class BottleneckBlock(_Block):
    """1x1 reduce, 3x3 (carrying the stride: v1.5), 1x1 expand by 4 (ResNet-50)."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        residual = self.shortcut(x, train, self.features * 4)
        y = self.conv_norm(x, train, self.features, 1)
        y = self.conv_norm(y, train, self.features, 3, self.stride)
        return self.conv_norm(y, train, self.features * 4, 1, residual=residual)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNet(_Layers):
    """Multi-task ResNet: returns {head name: [batch, head size] float32} for [B, H, W, C] input.

    head_sizes: logits size for a categorical IAP, 1 for a continuous one.
    dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
    conv_impl: "auto" | "xla" | "cpu_fast" (auto: cpu_fast on the CPU backend only).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"
    width: int = 64
    head_sizes: Mapping[str, int] = None

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
        x = max_pool_3x3_stride2(x, self.conv_impl)
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = block_cls(
                    features=self.width * 2**stage,
                    stride=2 if stage > 0 and index == 0 else 1,
                    dtype=self.dtype,
                    conv_impl=self.conv_impl,
                    fold_norms=self.fold_norms,
                    name=f"stage{stage + 1}_block{index + 1}",
                )(x, train)
        # Pooling and heads in float32: bf16 would round logits and regression outputs.
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        # The pooled features, for out-of-distribution scores: apply with
        # mutable=["intermediates"] to get them; otherwise sow is a no-op.
        self.sow("intermediates", "features", features)
        return {
            name: nn.Dense(size, dtype=jnp.float32, name=f"head_{name}")(features)
            for name, size in self.head_sizes.items()
        }


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
    conv_impl: str = "auto",
) -> ResNet:
    """Builds a named ResNet; width defaults to 64 (8 for "tiny")."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(ARCHITECTURES)}")
    for head, size in head_sizes.items():
        if int(size) < 1:
            raise ValueError(f"head {head!r} needs a positive output size, got {size}")
    resolve_conv_impl(conv_impl)
    if width is None:
        width = 8 if name == "tiny" else 64
    return ResNet(
        head_sizes=dict(head_sizes), width=width, dtype=dtype, conv_impl=conv_impl, **ARCHITECTURES[name]
    )
