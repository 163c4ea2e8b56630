"""One slice -> model-ready uint16 image."""
import jax
import numpy as np
import pytest

from iap_jax.core.preprocess import (PixelSpec, model_input, preprocess_slice, resize,
                                     restore_intensities, to_square)
from iap_jax.training.augment import augment


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


def _model_input(images, spec, scale=1.0, offset=0.0):
    images = np.asarray(images, np.uint16)
    n = len(images)
    return np.asarray(model_input(images, np.full(n, scale, np.float32),
                                  np.full(n, offset, np.float32), spec))


def test_max_normalisation_is_the_papers_and_copes_with_signed_data():
    spec = PixelSpec(stored_size=2)
    out = _model_input([[[0, 50], [100, 200]]], spec)
    assert out.shape == (1, 2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 63.75, 127.5, 255.0])
    # Stored 0..100 with offset -100: intensities -100..0, shifted to start at 0.
    out = _model_input([[[0, 50], [80, 100]]], spec, offset=-100.0)
    np.testing.assert_allclose(out.ravel(), [0.0, 127.5, 204.0, 255.0])


def test_percentile_normalisation_clips_the_tails_per_image():
    spec = PixelSpec(stored_size=10, normalisation="percentile", percentiles=(10.0, 90.0))
    ramp = np.arange(100, dtype=np.uint16).reshape(10, 10)
    out = _model_input([ramp, ramp * 7], spec, scale=0.5, offset=3.0)
    # Sorted index round(99 * 0.1) = 10 and round(99 * 0.9) = 89 bound the [0, 255] range.
    for image in out[..., 0]:
        assert image.min() == 0.0 and image.max() == 255.0
        assert np.count_nonzero(image == 0.0) == 11 and np.count_nonzero(image == 255.0) == 11
    np.testing.assert_allclose(out[0], out[1], atol=1e-4)  # the same image up to a gain


def test_model_input_resizes_after_normalising_like_the_stored_path():
    rng = np.random.default_rng(2)
    stored = rng.integers(0, 65536, (3, 64, 64)).astype(np.uint16)
    spec = PixelSpec(stored_size=64, image_size=32)
    out = _model_input(stored, spec)
    assert out.shape == (3, 32, 32, 1)
    normalised = _model_input(stored, PixelSpec(stored_size=64))[..., 0]
    for image, small in zip(normalised, out[..., 0]):
        np.testing.assert_allclose(small, resize(image, (32, 32)), atol=1e-3)


def test_pixel_spec_json_round_trip_and_validation():
    spec = PixelSpec(stored_size=64, resize="pad", image_size=32, normalisation="percentile",
                     percentiles=(2, 98), series_filter="dyn", phases="all", slices="central:0.5")
    assert PixelSpec.from_json(spec.to_json()) == spec
    assert spec.input_size == 32 and PixelSpec(stored_size=64).input_size == 64
    with pytest.raises(ValueError, match="normalisation"):
        PixelSpec(stored_size=8, normalisation="zscore")
    with pytest.raises(ValueError, match="unknown pixel spec fields"):
        PixelSpec.from_json({"stored_size": 8, "colour": 1})


def test_augmentation_shifts_without_mirroring_and_stays_in_range():
    ramp = np.tile(np.arange(32, dtype=np.float32) * 8, (4, 32, 1))[..., None]  # left to right
    out = np.asarray(augment(ramp, jax.random.PRNGKey(0)))
    assert out.shape == ramp.shape and 0.0 <= out.min() and out.max() <= 255.0
    assert np.all(out[:, 16, 28, 0] > out[:, 16, 3, 0])  # a mirrored image would fall
    assert not np.array_equal(out[0], out[1])  # each image gets its own shift and gain
    again = np.asarray(augment(ramp, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(out, again)  # seeded: a resumed run augments the same


def test_percentiles_by_bisection_equal_a_full_sort_for_either_sign_of_scale():
    rng = np.random.default_rng(3)
    images = rng.integers(0, 65536, (4, 16, 16)).astype(np.uint16)
    images[0, :4] = 0  # ties at the bottom and the top
    images[1, :4] = 65535
    scales = np.array([0.5, 2.0, -1.0, 1e-3], np.float32)
    offsets = np.array([3, -7, 100, 0], np.float32)
    spec = PixelSpec(stored_size=16, normalisation="percentile", percentiles=(2.0, 97.0))
    got = np.asarray(model_input(images, scales, offsets, spec))[..., 0]
    x = images.astype(np.float32) * scales[:, None, None] + offsets[:, None, None]
    ordered = np.sort(x.reshape(4, -1), axis=1)
    low = ordered[:, int(np.round(255 * 0.02))][:, None, None]
    high = ordered[:, int(np.round(255 * 0.97))][:, None, None]
    expected = (np.clip(x, low, high) - low) / np.maximum(high - low, 1e-6) * 255.0
    np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(ValueError, match="uint16"):
        model_input(images.astype(np.float32), scales, offsets, spec)
