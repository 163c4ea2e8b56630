"""Reading headers and pixels of real and hand-made DICOM files."""
import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless

import prep_series

from iap_jax.io.dicom import (DicomError, iap_values, order_frames, read_frame, read_instance_header,
                              read_series)


@pytest.fixture(scope="module")
def mr_small_pixels():
    return read_frame(get_testdata_file("MR_small.dcm"))


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_every_encoding_decodes_to_the_same_pixels(name, mr_small_pixels):
    path = get_testdata_file(name)
    header = read_instance_header(path)
    assert (header.rows, header.columns, len(header.frames)) == (64, 64, 1)
    assert iap_values(header.frames[0])["EchoTime"].value == "240"
    np.testing.assert_array_equal(read_frame(path), mr_small_pixels)


def test_signed_pixels_keep_their_sign(mr_small_pixels):
    # MR_small is signed 16-bit (PixelRepresentation 1).
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(mr_small_pixels, ds.pixel_array.astype(np.float32))


def test_jpeg2000_philips_matches_uncompressed():
    lossless = read_frame(get_testdata_file("MR2_J2KR.dcm"))
    np.testing.assert_array_equal(lossless, read_frame(get_testdata_file("MR2_UNCR.dcm")))


def test_truncated_file_is_reported():
    with pytest.raises(DicomError) as err:
        read_instance_header(get_testdata_file("MR_truncated.dcm"))
    assert err.value.reason == "truncated" and "MR_truncated.dcm" in str(err.value)


def test_enhanced_multiframe_frames_are_slices():
    path = get_testdata_file("emri_small.dcm")
    header = read_instance_header(path)
    assert len(header.frames) == 10
    frames = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(read_frame(path, 3), frames[3].astype(np.float32))


def test_rescale_and_monochrome1(tmp_path):
    path = prep_series.write_series(str(tmp_path), patient_id="P", description="ax dyn pre",
                                    num_slices=1)[0]
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-10"
    ds.save_as(path)
    np.testing.assert_allclose(read_frame(path), stored * 2 - 10)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(path)
    # 12 bits stored: inverted within [0, 4095], then rescaled.
    np.testing.assert_allclose(read_frame(path), (4095 - stored) * 2 - 10)


def test_bad_files_raise_with_reasons(tmp_path):
    cases = {}
    (tmp_path / "empty.dcm").write_bytes(b"")
    cases["empty.dcm"] = "zero_byte"
    (tmp_path / "notes.txt").write_text("not an image")
    cases["notes.txt"] = "not_dicom"
    good = prep_series.write_series(str(tmp_path / "s"), patient_id="P", description="x", num_slices=1)[0]
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    cases["nopixels.dcm"] = "no_pixel_data"
    cases[os.path.relpath(os.path.join(os.path.dirname(get_testdata_file("MR_small.dcm")),
                                       "dicomdirtests", "DICOMDIR"), tmp_path)] = "non_image"
    for name, reason in cases.items():
        with pytest.raises(DicomError) as err:
            read_instance_header(str(tmp_path / name))
        assert err.value.reason == reason, name


def test_undecodable_compression_fails_at_decode(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small_jp2klossless.dcm"))
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    path = str(tmp_path / "bad_j2k.dcm")
    ds.save_as(path)
    read_instance_header(path)  # the header is fine
    with pytest.raises(DicomError) as err:
        read_frame(path)
    assert err.value.reason == "undecodable"


def test_frames_are_ordered_along_the_slice_normal(tmp_path):
    paths = prep_series.write_series(str(tmp_path), patient_id="P", description="ax dyn pre",
                                     num_slices=5)
    headers = [read_instance_header(p) for p in sorted(paths)]  # names run backwards
    ordered = order_frames(headers)
    positions = [frame.position for _, frame in ordered]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert [h.instance_number for h, _ in ordered] == [1, 2, 3, 4, 5]


def test_read_series_of_the_tiny_philips_series():
    root = os.path.join(os.path.dirname(get_testdata_file("MR_small.dcm")), "dicomdirtests", "98892003", "MR1")
    slices = read_series([os.path.join(root, name) for name in sorted(os.listdir(root))])
    assert len(slices) == 3
    assert all(pixels.dtype == np.float32 and pixels.ndim == 2 for pixels, _ in slices)
    assert {labels["Manufacturer"].value for _, labels in slices} == {"PHILIPS MEDICAL SYSTEMS, INC."}


def test_file_without_preamble_passes_both_stages(tmp_path, mr_small_pixels):
    """Some exporters write the dataset without the 128-byte preamble and DICM prefix."""
    content = open(get_testdata_file("MR_small.dcm"), "rb").read()
    assert content[128:132] == b"DICM"
    path = str(tmp_path / "bare.dcm")
    with open(path, "wb") as f:
        f.write(content[132:])
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)
    header = read_instance_header(path)
    assert iap_values(header.frames[0])["EchoTime"].value == "240"
    np.testing.assert_array_equal(read_frame(path), mr_small_pixels)
