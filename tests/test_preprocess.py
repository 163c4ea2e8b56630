"""One slice -> model-ready uint16 image."""
import jax
import numpy as np
import pytest

from iap_jax.preprocess import preprocess_slice, resize, restore_intensities, to_square


def test_resize_matches_jax_antialiased_linear():
    image = np.random.default_rng(0).normal(size=(96, 130)).astype(np.float32)
    for shape in [(32, 32), (200, 150), (40, 300)]:
        expected = jax.image.resize(image, shape, "linear", antialias=True)
        np.testing.assert_allclose(resize(image, shape), expected, atol=1e-4)


def test_shrinking_is_anti_aliased():
    checkerboard = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    small = resize(checkerboard, (224, 224))
    assert small.std() < 0.05  # a naive subsample would alias into stripes of 0 and 1
    assert abs(small.mean() - 0.5) < 0.01


def test_pad_keeps_aspect_ratio_and_pads_with_background():
    image = np.full((50, 100), 7.0, np.float32)
    image[:, :] += np.linspace(0, 1, 100)[None, :]
    square = to_square(image, 40, "pad")
    assert square.shape == (40, 40)
    assert np.all(square[:10] == image.min()) and np.all(square[30:] == image.min())
    assert np.all(square[10:30] > 7.0)
    stretched = to_square(image, 40, "resize")
    assert np.all(stretched > 7.0)


def test_quantisation_recovers_intensities():
    image = np.random.default_rng(1).uniform(-50, 3000, size=(64, 64)).astype(np.float32)
    prepared = preprocess_slice(image, 64)
    assert prepared.image.dtype == np.uint16 and prepared.image.shape == (64, 64)
    assert prepared.image.min() == 0 and prepared.image.max() == 65535
    restored = restore_intensities(prepared.image, prepared.scale, prepared.offset)
    assert np.abs(restored - image).max() <= prepared.scale * 0.51 + 1e-3


def test_constant_slice_and_bad_input():
    prepared = preprocess_slice(np.full((10, 12), 5.0), 8)
    assert np.all(prepared.image == 0) and prepared.offset == 5.0
    with pytest.raises(ValueError, match="mode"):
        to_square(np.zeros((4, 4)), 8, "crop")
    with pytest.raises(ValueError, match="non-finite"):
        preprocess_slice(np.array([[np.nan, 1.0]]), 8)
