"""Siemens MOSAIC files: a volume in one image, split into its slices (tiles) in slice order,
never passed on as one image; one whose tiles cannot be told apart is skipped."""
import gzip
import os
import shutil
import struct
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

import prep_series

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.core.preprocess import restore_intensities
from iap_jax.core.siemens_csa import cut_tile, mosaic_layout, parse_csa
from iap_jax.io.dicom import DicomError, read_frame, read_instance_header, read_prepared_frame
from iap_jax.io.series import discover

NIBABEL_DATA = os.path.join(os.path.dirname(__import__("nibabel").__file__), "nicom", "tests", "data")

TILE, PER_ROW, IMAGES = 8, 3, 7  # a 3 x 3 grid of 8 x 8 tiles, the last two blank
SPACING, FIRST_Z = 3.0, 10.0


def _csa(elements: dict, csa2: bool = True) -> bytes:
    """A CSA header holding `elements` (name -> list of text values), each value a
    NUL-terminated item padded to 4 bytes; every element also gets one empty item more than
    its value multiplicity, as scanners write them."""
    first_items = len(next(iter(elements.values()))) + 1
    out = (b"SV10\x04\x03\x02\x01" if csa2 else b"") + struct.pack("<2I", len(elements), 77)
    for name, values in elements.items():
        items = list(values) + [""]
        out += struct.pack("<64si4s3i", name.encode(), len(values), b"DS\0\0", 3, len(items), 77)
        for value in items:
            data = value.encode() + b"\0" if value else b""
            size = len(data)
            first = size + first_items if not csa2 else size  # CSA1's odd length word
            out += struct.pack("<4i", first, size, 77, size) + data + b"\0" * (-size % 4)
    return out


def _mosaic(images=IMAGES, normal=(0.0, 0.0, 1.0), csa: dict | None = None, columns=None, **tags):
    """A MOSAIC whose tile k is filled with 100 * (k + 1); blank tiles hold 9999."""
    ds = prep_series.make_instance(
        patient_id="P1", patient_name="Doe^P1", birth_date="19700101", study_uid=generate_uid(),
        series_uid=generate_uid(), description="ep2d bold", index=0, position=FIRST_Z,
        rows=TILE * PER_ROW, columns=columns or TILE * PER_ROW,
        tags=dict(Manufacturer="SIEMENS", RepetitionTime="3000", EchoTime="30", FlipAngle="90",
                  SpacingBetweenSlices=str(SPACING), SliceThickness="2.5",
                  ImageType=["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"], **tags))
    ds.PixelSpacing = [2.0, 2.0]
    pixels = np.full((ds.Rows, ds.Columns), 9999, np.uint16)
    for k in range(min(images, PER_ROW * PER_ROW)):
        row, column = divmod(k, PER_ROW)
        pixels[row * TILE:(row + 1) * TILE, column * TILE:(column + 1) * TILE] = 100 * (k + 1)
    ds.PixelData = pixels.tobytes()
    if csa is None:
        # Real image headers are ~10 KB: more than the reader keeps in memory before the pixels.
        csa = {"NumberOfImagesInMosaic": [str(images)], "SliceNormalVector": [str(v) for v in normal],
               "ImageHistory": ["x" * 3000]}
    if csa:
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        block.add_new(0x10, "OB", _csa(csa))
    return ds


def _write(ds, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "mosaic.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("compressed", [False, True])
def test_mosaic_tiles_are_the_slices_in_position_order(tmp_path, sign, compressed):
    path = _write(_mosaic(normal=(0.0, 0.0, sign)), str(tmp_path / "dicom"))
    if compressed:  # read from memory: the CSA header must be there too
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as out:
            shutil.copyfileobj(f, out)
        os.remove(path)
        path += ".gz"
    found = discover(str(tmp_path / "dicom"), progress=False)
    assert found.skips == [] and len(found.series) == 1
    series = found.series[0]
    assert (series.rows, series.columns) == (TILE, TILE) and len(series.slices) == IMAGES
    # Tile k lies k spacings along the CSA normal: a reversed normal reverses the slices.
    tiles = list(range(IMAGES)) if sign > 0 else list(range(IMAGES))[::-1]
    assert [s.frame for s in series.slices] == tiles
    header = read_instance_header(path)
    assert (header.rows, header.columns) == (TILE, TILE)
    np.testing.assert_allclose([f.position for f in header.frames],
                               [FIRST_Z + sign * SPACING * k for k in range(IMAGES)])
    for ref in series.slices:
        pixels = read_frame(ref.path, ref.frame)
        assert pixels.shape == (TILE, TILE)
        np.testing.assert_array_equal(pixels, 100 * (ref.frame + 1))
        prepared = read_prepared_frame(ref.path, ref.frame, 16, "resize")
        np.testing.assert_allclose(restore_intensities(prepared.image, prepared.scale, prepared.offset),
                                   100 * (ref.frame + 1), rtol=1e-3)
        fov = ref.iaps[IAP_NAMES.index("FOV")]
        assert float(fov[2]) == TILE * 2.0  # one tile's field of view, not the mosaic's
    with pytest.raises(DicomError):  # a blank tile after the last image is no slice
        read_frame(path, IMAGES)


@pytest.mark.parametrize("case, detail", [
    ("no CSA header", "no CSA image header"),
    ("no image count", "no NumberOfImagesInMosaic"),
    ("tiling from the acquisition matrix only", "no CSA image header"),
    ("no slice normal", "no SliceNormalVector"),
    ("normal across the image", "not along"),
    ("grid that does not divide the image", "do not divide"),
    ("unreadable CSA header", "unreadable CSA image header"),
])
def test_a_mosaic_whose_tiles_cannot_be_told_apart_is_skipped(tmp_path, case, detail):
    ds = {
        "no CSA header": lambda: _mosaic(csa={}),
        "no image count": lambda: _mosaic(csa={"SliceNormalVector": ["0", "0", "1"]}),
        # The tiles per row would be known (24 / 8), the blank tiles would not.
        "tiling from the acquisition matrix only": lambda: _mosaic(csa={}, AcquisitionMatrix=[8, 0, 0, 8]),
        "no slice normal": lambda: _mosaic(csa={"NumberOfImagesInMosaic": ["7"]}),
        "normal across the image": lambda: _mosaic(normal=(1.0, 0.0, 0.0)),
        "grid that does not divide the image": lambda: _mosaic(images=17),
        "unreadable CSA header": lambda: _mosaic(csa={"NumberOfImagesInMosaic": ["7"]}),
    }[case]()
    if case == "unreadable CSA header":
        ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value = b"SV10\0\0\0\0\xff\xff\xff\xff"
    path = _write(ds, str(tmp_path / "dicom"))
    found = discover(str(tmp_path / "dicom"), progress=False)
    assert found.series == [] and [s.reason for s in found.skips] == ["mosaic"]
    assert detail in found.skips[0].detail
    with pytest.raises(DicomError) as err:
        read_frame(path, 0)  # never the whole mosaic as one image
    assert err.value.reason == "mosaic"


def test_real_mosaic_whose_grid_does_not_divide_it_is_skipped():
    """nibabel's 0.dcm: 48 images (7 x 7 tiles) in 256 x 256 pixels, which 7 does not divide."""
    with pytest.raises(DicomError) as err:
        read_instance_header(os.path.join(NIBABEL_DATA, "0.dcm"))
    assert err.value.reason == "mosaic" and "7 x 7 tiles" in err.value.detail


def test_real_mosaic_geometry_matches_nibabel():
    """A real Siemens MOSAIC (nibabel's csa_slice_norm.dcm, an oblique 6 x 6 grid of 64 px
    tiles): the first tile's position and the step between tiles are nibabel's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel calls its DICOM readers experimental
        from nibabel.nicom import dicomwrappers

        ds = pydicom.dcmread(os.path.join(NIBABEL_DATA, "csa_slice_norm.dcm"))
        wrapper = dicomwrappers.wrapper_from_data(ds)
    mosaic = mosaic_layout(ds)
    assert (mosaic.images, mosaic.tiles_per_row, mosaic.tile_rows, mosaic.tile_columns) == (32, 6, 64, 64)
    np.testing.assert_allclose(mosaic.origins[0], wrapper.image_position, atol=1e-6)
    np.testing.assert_allclose(np.subtract(mosaic.origins[1], mosaic.origins[0]), wrapper.affine[:3, 2],
                               atol=1e-6)
    assert np.all(np.diff(mosaic.positions) > 0)


def test_csa_parser_gives_nibabels_values_for_real_headers():
    from nibabel.nicom import csareader

    blobs = [open(os.path.join(NIBABEL_DATA, name), "rb").read() for name in ("csa2_b0.bin", "csa2_b1000.bin")]
    for name in ("0.dcm", "csa_slice_norm.dcm"):
        ds = pydicom.dcmread(os.path.join(NIBABEL_DATA, name), stop_before_pixels=True)
        blobs.append(ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value)
    for blob in blobs:
        ours, theirs = parse_csa(blob), csareader.read(blob)["tags"]
        assert ours.keys() == theirs.keys()
        for name, tag in theirs.items():
            expected = [str(v).strip() for v in tag["items"]]
            while expected and not expected[-1]:
                expected.pop()
            got = list(ours[name])
            if tag["vr"] in ("FD", "FL", "DS", "IS", "SL", "UL", "SS", "US"):
                got, expected = [float(v) for v in got], [float(v) for v in expected]
            assert got == expected, name


def test_csa1_and_csa2_layouts_read_alike():
    elements = {"NumberOfImagesInMosaic": ["7"], "SliceNormalVector": ["0", "0", "-1"], "ImageType": ["M"]}
    for csa2 in (True, False):
        assert parse_csa(_csa(elements, csa2=csa2)) == {k: tuple(v) for k, v in elements.items()}
    with pytest.raises(ValueError):
        parse_csa(b"SV10\0\0\0\0\x05\0\0\0M\0\0\0")  # cut off


def test_cut_tile_is_row_major():
    ds = _mosaic()
    mosaic = mosaic_layout(ds)
    pixels = ds.pixel_array
    for k in range(IMAGES):
        np.testing.assert_array_equal(cut_tile(pixels, mosaic, k), 100 * (k + 1))
    with pytest.raises(ValueError):
        cut_tile(pixels, mosaic, IMAGES)
