"""One slice of intensities -> the model-ready square uint16 image (prep and predictor).

A pure function of a 2D float array so that the prep stage and the predictor give the
same image for the same slice. Resizing is separable linear interpolation whose kernel
widens by the shrink factor (anti-aliasing, the same sampling as
`jax.image.resize(..., "linear", antialias=True)`), done as two small matrix products.

Modes: "resize" stretches the slice to image_size x image_size (the paper's direct
resize); "pad" keeps the aspect ratio, fitting the longer side and padding the shorter
with the slice's minimum (its background).

The result is quantised to the full uint16 range; intensities come back as
image * scale + offset with an error of at most scale / 2.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np

RESIZE_MODES = ("resize", "pad")
UINT16_MAX = 65535


@dataclasses.dataclass(frozen=True)
class PreparedSlice:
    image: np.ndarray  # uint16 [image_size, image_size]
    scale: float
    offset: float


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] linear-interpolation weights, anti-aliased when shrinking."""
    scale = out_size / in_size
    kernel_width = max(1.0 / scale, 1.0)
    centres = (np.arange(out_size) + 0.5) / scale - 0.5
    distance = (np.arange(in_size)[None, :] - centres[:, None]) / kernel_width
    weights = np.maximum(0.0, 1.0 - np.abs(distance))
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    weights.setflags(write=False)  # shared by every caller through the cache
    return weights


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Anti-aliased linear resize of a 2D array to `shape` (float32)."""
    image = np.asarray(image, np.float32)
    rows, columns = image.shape
    if (rows, columns) == tuple(shape):
        return image.copy()
    return resize_weights(rows, shape[0]) @ image @ resize_weights(columns, shape[1]).T


def to_square(image: np.ndarray, size: int, mode: str = "resize") -> np.ndarray:
    """The slice as a float32 [size, size] array, stretched ("resize") or padded ("pad")."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    image = np.asarray(image, np.float32)
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 2D slice, got shape {image.shape}")
    if mode == "resize":
        return resize(image, (size, size))
    factor = size / max(image.shape)
    rows, columns = (max(1, round(n * factor)) for n in image.shape)
    fitted = resize(image, (rows, columns))
    square = np.full((size, size), image.min(), np.float32)
    top, left = (size - rows) // 2, (size - columns) // 2
    square[top:top + rows, left:left + columns] = fitted
    return square


def quantise_uint16(image: np.ndarray) -> PreparedSlice:
    """Full-range uint16 with the scale and offset that recover the intensities."""
    image = np.asarray(image, np.float32)
    low, high = float(image.min()), float(image.max())
    scale = (high - low) / UINT16_MAX if high > low else 1.0
    normalised = (image - np.float32(low)) * np.float32(1.0 / scale)
    quantised = np.clip(np.rint(normalised), 0, UINT16_MAX).astype(np.uint16)
    return PreparedSlice(quantised, float(np.float32(scale)), float(np.float32(low)))


def preprocess_slice(pixels: np.ndarray, image_size: int, mode: str = "resize") -> PreparedSlice:
    """One 2D slice of intensities -> model-ready uint16 image with its intensity mapping."""
    pixels = np.asarray(pixels, np.float32)
    if not np.all(np.isfinite(pixels)):
        raise ValueError("slice has non-finite intensities")
    return quantise_uint16(to_square(pixels, image_size, mode))


def restore_intensities(image: np.ndarray, scale: float, offset: float) -> np.ndarray:
    return np.asarray(image, np.float32) * np.float32(scale) + np.float32(offset)
