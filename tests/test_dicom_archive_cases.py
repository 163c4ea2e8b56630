"""What hospital archives hold: valid files that must be used, invalid ones that must be named,
and library noise that must stay out of the console."""
import logging
import os

import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

import prep_series
from local_paths_view import path_of

from iap_jax.io.dicom import DicomError, read_frame, read_instance_header


def _instance(**tags):
    return prep_series.make_instance(patient_id="P1", patient_name="Doe^P1", birth_date="19700101",
                                     study_uid=generate_uid(), series_uid=generate_uid(),
                                     description="ax dyn pre", index=0, position=0.0, tags=tags)


def test_deflated_files_are_read_not_called_truncated(tmp_path):
    ds = _instance(**prep_series.SIEMENS)
    ds.PixelData = (np.arange(24 * 24) % 7).astype(np.uint16).tobytes()  # compresses well
    expected = ds.pixel_array.astype(np.float32)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = str(tmp_path / "deflated.dcm")
    ds.save_as(path, enforce_file_format=True)
    assert os.path.getsize(path) < len(ds.PixelData)  # the pixels really are compressed
    header = read_instance_header(path)
    assert (header.rows, header.columns) == (24, 24)
    np.testing.assert_array_equal(read_frame(path), expected)


def test_a_bare_dataset_without_file_meta_is_decoded(tmp_path):
    ds = _instance(**prep_series.SIEMENS)
    expected = ds.pixel_array.astype(np.float32)
    path = str(tmp_path / "bare.dcm")
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = True, True
    pydicom.filewriter.write_dataset(buffer, ds)
    with open(path, "wb") as f:  # implicit VR little endian, no preamble, no group 2
        f.write(buffer.getvalue())
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)  # what a reader that insists on the file meta does
    read_instance_header(path)
    np.testing.assert_array_equal(read_frame(path), expected)


@pytest.mark.parametrize("photometric", ["RGB", "PALETTE COLOR"])
def test_colour_with_one_sample_per_pixel_is_skipped(tmp_path, photometric):
    ds = _instance(**prep_series.SIEMENS)
    ds.PhotometricInterpretation = photometric
    path = str(tmp_path / "colour.dcm")
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as err:
        read_instance_header(path)
    assert err.value.reason == "not_monochrome" and photometric in err.value.detail


def test_non_mr_images_are_skipped_with_the_modality(tmp_path):
    ds = _instance(**prep_series.SIEMENS)
    ds.Modality = "CT"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    path = str(tmp_path / "ct.dcm")
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as err:
        read_instance_header(path)
    assert err.value.reason == "not_mr" and "CT" in err.value.detail


def test_zero_length_pixel_data_is_no_pixel_data_not_truncated(tmp_path):
    ds = _instance(**prep_series.SIEMENS)
    ds.PixelData = b""
    path = str(tmp_path / "empty.dcm")
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as err:
        read_instance_header(path)
    assert err.value.reason == "no_pixel_data"


def test_undecodable_fragments_stay_out_of_the_console(tmp_path, caplog, capfd):
    ds = _instance(**prep_series.SIEMENS)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01garbage" * 8])
    path = str(tmp_path / "broken.dcm")
    ds.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomError) as err:
            read_frame(path)
    assert err.value.reason == "undecodable" and "broken.dcm" in str(err.value)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err


def test_linked_directories_are_followed_once_and_loops_end(tmp_path):
    from iap_jax.io.series import discover, list_files

    root = tmp_path / "archive"
    elsewhere = tmp_path / "elsewhere" / "series"
    prep_series.write_series(str(elsewhere), patient_id="P2", description="ax dyn pre",
                             num_slices=3, tags=prep_series.SIEMENS)
    prep_series.write_series(str(root / "local"), patient_id="P1", description="ax dyn pre",
                             num_slices=2, tags=prep_series.GE)
    os.symlink(elsewhere, root / "linked")
    os.symlink(root, root / "local" / "loop")  # a link back up the tree
    files = list_files(str(root))
    assert sorted(f.split(os.sep)[0] for f in files) == ["linked"] * 3 + ["local"] * 2
    found = discover(str(root), progress=False)
    assert sorted(len(s.slices) for s in found.series) == [2, 3] and not found.skips


def test_standard_functional_group_macros_win_over_philips_private_copies():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from iap_jax.core.iaps import extract_iaps

    def item(**values):
        ds = Dataset()
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        return ds

    ds = Dataset()
    ds.Manufacturer = "Philips"
    shared = Dataset()
    # Philips' private per-frame sequence, here in the shared group, with other values.
    private = item(AcquisitionMatrix=[0, 999, 999, 0], EchoTime=99.0, RepetitionTime=999.0)
    shared.add_new(0x2005140F, "SQ", Sequence([private]))
    shared.MRTimingAndRelatedParametersSequence = Sequence([item(RepetitionTime=5.5, FlipAngle=12)])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frame = Dataset()
    frame.MREchoSequence = Sequence([item(EffectiveEchoTime=2.75)])
    frame.MRFOVGeometrySequence = Sequence([item(MRAcquisitionFrequencyEncodingSteps=448,
                                                 MRAcquisitionPhaseEncodingStepsInPlane=381)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    iaps = extract_iaps(ds, 0)
    assert iaps["AcquisitionMatrix"].value == "448x381"
    assert iaps["EchoTime"].value == "2.75" and iaps["RepetitionTime"].value == "5.5"
    # Where only the private copy has a value, it is still used.
    del ds.PerFrameFunctionalGroupsSequence
    assert extract_iaps(ds, 0)["EchoTime"].value == "99"


def test_pixel_data_beyond_number_of_frames_is_used_and_reported(tmp_path):
    from data_prep.builder import REPORT_FILE, prepare

    root = tmp_path / "dicom"
    paths = prep_series.write_series(str(root / "series"), patient_id="P1", description="ax dyn pre",
                                     num_slices=3, tags=prep_series.SIEMENS)
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 1
    ds.PixelData = ds.PixelData * 2  # two frames of pixels behind a header that says one
    ds.save_as(paths[0], enforce_file_format=True)
    header = read_instance_header(paths[0])
    assert len(header.frames) == 1 and "holds 2 frames" in header.note
    data_dir = tmp_path / "data"
    prepare(str(root), str(data_dir), image_size=16, split=(1.0, 0.0, 0.0), salt="s", progress=False)
    report = __import__("json").load(open(data_dir / REPORT_FILE))
    relative = os.path.relpath(paths[0], root)
    notes = {path_of(key, data_dir): note for key, note in report["notes"]["files"].items()}
    assert "holds 2 frames" in notes[relative]
    assert report["files"]["used"] == 3 and report["files"]["skipped"] == 0


NIBABEL_DATA = os.path.join(os.path.dirname(__import__("nibabel").__file__), "nicom", "tests", "data")


@pytest.mark.parametrize("name, images, tile_fov", [("csa_slice_norm.dcm", 32, "96"),
                                                    ("0.dcm", 48, "64.7")])
def test_siemens_mosaic_fov_is_one_tiles(name, images, tile_fov):
    """Real Siemens MOSAIC files shipped with nibabel: 384 px of 1.5 mm hold 6 x 6 tiles of
    64 px (96 mm, not 576 mm); the image count comes from the CSA header, checked against
    nibabel's own CSA reader."""
    from nibabel.nicom import csareader

    from iap_jax.core.iaps import extract_iaps
    from iap_jax.core.siemens_csa import csa_images_in_mosaic

    ds = pydicom.dcmread(os.path.join(NIBABEL_DATA, name), stop_before_pixels=True)
    assert csa_images_in_mosaic(ds) == images == csareader.get_n_mosaic(csareader.get_csa_header(ds))
    assert extract_iaps(ds)["FOV"].value == tile_fov
    # Without the CSA header the acquisition matrix gives the tiles (a 64-step matrix: 6 x 64).
    if name == "csa_slice_norm.dcm":
        del ds[ds.private_block(0x0029, "SIEMENS CSA HEADER").get_tag(0x10)]
        assert csa_images_in_mosaic(ds) is None and extract_iaps(ds)["FOV"].value == "96"
    plain = pydicom.dcmread(os.path.join(NIBABEL_DATA, "decimal_rescale.dcm"), stop_before_pixels=True)
    assert csa_images_in_mosaic(plain) is None
    assert extract_iaps(plain)["FOV"].value == "144"  # 128 x 1.125 mm, not a mosaic


def test_real_non_mr_files_are_skipped_by_modality_or_sop_class():
    """Real files from the deid-data package (pydicom/deid's test data): CT, ultrasound,
    radiography and secondary captures without a Modality."""
    import deid_data

    root = os.path.join(os.path.dirname(deid_data.__file__), "data")
    cases = {"humans/ctbrain1.dcm": "Modality CT", "ultrasounds/GREYSCALE_IMAGE.dcm": "Modality US",
             "animals/cat.dcm": "Modality DX", "dicom-cookies/image1.dcm": "Secondary Capture"}
    for name, detail in cases.items():
        with pytest.raises(DicomError) as err:
            read_instance_header(os.path.join(root, name))
        assert err.value.reason == "not_mr" and detail in err.value.detail, name


def test_raw_data_storage_is_skipped_naming_its_sop_class(tmp_path):
    # Philips exports keep their raw k-space as Raw Data Storage objects beside the images.
    ds = _instance(**prep_series.SIEMENS)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.RawDataStorage
    path = str(tmp_path / "raw.dcm")
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError) as err:
        read_instance_header(path)
    assert err.value.reason == "non_image"
    assert "Raw Data Storage (1.2.840.10008.5.1.4.1.1.66)" in err.value.detail


def test_gzip_compressed_files_are_read_in_discovery_and_decoding(tmp_path):
    import gzip
    from pydicom.data import get_testdata_file
    from iap_jax.io.series import discover

    # A classic slice and an Enhanced MR multi-frame file, each gzip-compressed (.dcm.gz).
    classic = str(tmp_path / "plain" / "slice.dcm")
    os.makedirs(os.path.dirname(classic))
    _instance(**prep_series.SIEMENS).save_as(classic, enforce_file_format=True)
    enhanced = get_testdata_file("emri_small.dcm")
    archive = tmp_path / "archive"
    archive.mkdir()
    for source, name in ((classic, "slice.dcm.gz"), (enhanced, "enhanced.dcm.gz")):
        (archive / name).write_bytes(gzip.compress(open(source, "rb").read()))
        header = read_instance_header(str(archive / name))
        assert header.frames == read_instance_header(source).frames
        for frame in (0, len(header.frames) - 1):
            np.testing.assert_array_equal(read_frame(str(archive / name), frame),
                                          read_frame(source, frame))
    # What cannot be used says that it was gzip-compressed.
    whole = gzip.compress(open(classic, "rb").read())
    (archive / "cut.dcm.gz").write_bytes(whole[:len(whole) // 2])
    (archive / "notes.txt.gz").write_bytes(gzip.compress(b"exported by PACS\n"))
    found = discover(str(archive), progress=False)
    assert sorted(f for s in found.series for f in s.files) == ["enhanced.dcm.gz", "slice.dcm.gz"]
    skips = {s.path: s for s in found.skips}
    assert set(skips) == {"cut.dcm.gz", "notes.txt.gz"}
    assert all("gzip-compressed" in s.detail for s in skips.values())
    assert skips["notes.txt.gz"].reason == "not_dicom"
