"""Optimisers from config.

  paper  Adam(lr) with coupled L2: the decay is added to the gradient before Adam, as
         torch.optim.Adam(weight_decay=...) does in the reference code; constant lr.
  adamw  AdamW with linear warmup then cosine decay; decoupled weight decay on kernels
         only (not on biases or BatchNorm scales). The default.
Both take optional global-norm gradient clipping (clip_norm > 0).
"""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("paper", "adamw")


def _kernels_only(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
    """config: name, learning_rate, weight_decay, warmup_steps, clip_norm, b1, b2."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.name!r}; expected one of {OPTIMIZERS}")
    chain = []
    if config.clip_norm and config.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(config.clip_norm))
    if config.name == "paper":
        if config.weight_decay:
            chain.append(optax.add_decayed_weights(config.weight_decay))
        chain.append(optax.adam(config.learning_rate, b1=config.b1, b2=config.b2))
    else:
        warmup = min(int(config.warmup_steps), max(total_steps - 1, 0))
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * 0.01)
        chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2,
                                 weight_decay=config.weight_decay, mask=_kernels_only))
    return optax.chain(*chain)
