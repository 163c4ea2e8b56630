"""CPU kernels for the ResNet, as drop-in Flax layers.

`conv.Conv` (for `flax.linen.Conv`), `norm.BatchNorm` (for `flax.linen.BatchNorm`, with a
closed-form gradient) and `conv.max_pool` (for `flax.linen.max_pool`), each computing with
XLA's own ops, the pure-JAX CPU-fast formulations ("cpu_fast") or oneDNN ("onednn",
`onednn.py`, the library the iap-jax-native package, `native/`, builds at install time); `conv.FoldedConv` is oneDNN's
inference convolution with a BatchNorm folded in. The model never imports this package:
`iap_jax.models.factory` does, once, where a CPU kernel is asked for.
"""
