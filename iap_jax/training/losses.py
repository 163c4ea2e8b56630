"""Multi-task loss: masked cross-entropy per categorical head, masked regression per
continuous head, summed with per-head weights.

A masked label contributes zero loss and zero gradient; a head with no labelled example
in the batch contributes exactly 0 (its mean divides by max(count, 1)), never NaN.
Means are over the global batch: under SPMD jit the sums already span every device.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from iap_jax.core.labels import LabelEncoding

LOSS_MODES = ("default", "paper")


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the labelled examples (0 when none)."""
    safe_labels = jnp.where(mask > 0, labels, 0)
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), safe_labels)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_regression(prediction: jax.Array, target: jax.Array, mask: jax.Array,
                      huber_delta: float = 0.0) -> jax.Array:
    """Mean squared error (or Huber with delta > 0) over the labelled examples."""
    prediction = prediction.reshape(prediction.shape[0], -1)[:, 0].astype(jnp.float32)
    error = jnp.where(mask > 0, prediction - jnp.where(mask > 0, target, 0.0), 0.0)
    if huber_delta > 0:
        per_example = optax.huber_loss(error, delta=huber_delta)
    else:
        per_example = jnp.square(error)
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_loss_fn(encoding: LabelEncoding, *, mode: str = "default",
                 weights: Mapping[str, float] | None = None, huber_delta: float = 0.0
                 ) -> Callable[[Mapping, Mapping, Mapping], tuple[jax.Array, dict]]:
    """loss_fn(outputs, targets, masks) -> (total, {IAP: head loss}).

    "paper": every head weighted 1 and plain MSE on raw values, as the reference code;
    it needs the continuous heads encoded with transform "raw" (milliseconds)."""
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    weights = dict(weights or {})
    unknown = set(weights) - set(encoding.names)
    if unknown:
        raise ValueError(f"loss weights for unknown heads {sorted(unknown)}")
    if mode == "paper":
        not_raw = [h.name for h in encoding.heads if not h.categorical and h.transform != "raw"]
        if not_raw:
            raise ValueError(f"paper loss regresses raw values; heads {not_raw} use a transform "
                             "(set labels.transforms to 'raw' for them)")
        weights, huber_delta = {}, 0.0
    heads = encoding.heads

    def loss_fn(outputs, targets, masks):
        per_head = {}
        for head in heads:
            if head.categorical:
                per_head[head.name] = masked_cross_entropy(
                    outputs[head.name], targets[head.name], masks[head.name])
            else:
                per_head[head.name] = masked_regression(
                    outputs[head.name], targets[head.name], masks[head.name], huber_delta)
        total = sum(weights.get(name, 1.0) * value for name, value in per_head.items())
        return total, per_head

    return loss_fn
