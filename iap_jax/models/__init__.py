"""Flax models: the multi-task ResNet family (its layers injected) and the factory that
picks those layers for a machine."""
from iap_jax.models.resnet import ARCHITECTURES, ResNet, fold_batch_norms, make_model

__all__ = ["ARCHITECTURES", "ResNet", "fold_batch_norms", "make_model"]
