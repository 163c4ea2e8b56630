"""Flax models: the multi-task ResNet family and its CPU-fast convolution."""
from iap_jax.models.conv import Conv, conv2d_cpu, max_pool_3x3_stride2, resolve_conv_impl
from iap_jax.models.resnet import ARCHITECTURES, ResNet, make_model

__all__ = ["ARCHITECTURES", "Conv", "ResNet", "conv2d_cpu", "make_model", "max_pool_3x3_stride2", "resolve_conv_impl"]
