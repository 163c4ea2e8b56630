"""Training augmentation on the device, after preprocess.model_input, seeded from the train
state's key (so a resumed run augments exactly as an uninterrupted one).

A shift of up to 1/16 of the image (reflected at the border) and a mild intensity gain.
No flips: left-right orientation carries the patient position.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def augment(images: jax.Array, rng: jax.Array) -> jax.Array:
    """[B, S, S, C] model inputs in [0, 255] -> shifted and scaled, still in [0, 255]."""
    batch, size = images.shape[0], images.shape[1]
    margin = max(size // 16, 1)
    shift_rng, gain_rng = jax.random.split(rng)
    padded = jnp.pad(images, ((0, 0), (margin, margin), (margin, margin), (0, 0)), mode="reflect")
    starts = jax.random.randint(shift_rng, (batch, 2), 0, 2 * margin + 1)

    def crop(image, start):
        return jax.lax.dynamic_slice(image, (start[0], start[1], 0),
                                     (size, size, images.shape[3]))

    shifted = jax.vmap(crop)(padded, starts)
    gain = jax.random.uniform(gain_rng, (batch, 1, 1, 1), minval=0.9, maxval=1.1)
    return jnp.clip(shifted * gain, 0.0, 255.0)
