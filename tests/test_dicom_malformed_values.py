"""A malformed value in any element the reader uses (text in a number, NaN or infinity, the
wrong number of values, an empty value) skips that file with a reason or makes that IAP
absent or invalid: it never stops prep or prediction."""
import json
import math
import os
import struct
import warnings

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

import prep_series
from local_paths_view import by_path

from iap_jax.core.iaps import SPECS, LabelState
from iap_jax.io.dicom import DicomError, FrameHeader, iap_values, read_prepared_frame
from iap_jax.io.series import discover

# Every element the reader takes a value from, with its VR. Those with a macro can also sit
# in an Enhanced MR functional group (found there when the top level lacks them).
ELEMENTS = {
    "Rows": ("US", None), "Columns": ("US", None), "BitsAllocated": ("US", None),
    "BitsStored": ("US", None), "PixelRepresentation": ("US", None), "SamplesPerPixel": ("US", None),
    "PhotometricInterpretation": ("CS", None), "NumberOfFrames": ("IS", None),
    "SOPClassUID": ("UI", None), "SOPInstanceUID": ("UI", None), "SeriesInstanceUID": ("UI", None),
    "Modality": ("CS", None), "ImageType": ("CS", None), "InstanceNumber": ("IS", None),
    "TemporalPositionIdentifier": ("IS", None), "PatientID": ("LO", None),
    "SeriesDescription": ("LO", None),
    "RescaleSlope": ("DS", "PixelValueTransformationSequence"),
    "RescaleIntercept": ("DS", "PixelValueTransformationSequence"),
    "ImageOrientationPatient": ("DS", "PlaneOrientationSequence"),
    "ImagePositionPatient": ("DS", "PlanePositionSequence"),
    "PixelSpacing": ("DS", "PixelMeasuresSequence"),
    "SliceThickness": ("DS", "PixelMeasuresSequence"),
    "RepetitionTime": ("DS", "MRTimingAndRelatedParametersSequence"),
    "FlipAngle": ("DS", "MRTimingAndRelatedParametersSequence"),
    "EchoTime": ("DS", None), "EffectiveEchoTime": ("FD", "MREchoSequence"),
    "MagneticFieldStrength": ("DS", None), "ReconstructionDiameter": ("DS", None),
    "AcquisitionMatrix": ("US", None),
    "MRAcquisitionFrequencyEncodingSteps": ("US", "MRFOVGeometrySequence"),
    "MRAcquisitionPhaseEncodingStepsInPlane": ("US", "MRFOVGeometrySequence"),
    "Manufacturer": ("LO", None), "ScanOptions": ("CS", None), "ContrastBolusAgent": ("LO", None),
    "ProtocolName": ("LO", None), "DiffusionBValue": ("FD", "MRDiffusionSequence"),
    "TemporalPositionIndex": ("UL", "FrameContentSequence"),
}

_TEXT_JUNK = [b"abc", b"nan", b"NaN", b"inf", b"-Infinity", b"1e999", b"-1e999", b"", b" ", b"0",
              b"-1", b"1.5", b"99999999999999999999", b"1e-400", b"\x00\x00", b"\xff\xfe", b"1,5",
              b"1\\2", b"1\\2\\3\\4\\5\\6\\7", b"\\", b"0\\0\\0\\0\\0\\0", b"MOSAIC",
              b"MONOCHROME1", b"RGB"]
text_junk = st.one_of(
    st.sampled_from(_TEXT_JUNK),
    st.lists(st.sampled_from(_TEXT_JUNK), min_size=2, max_size=7).map(b"\\".join),
    st.binary(max_size=20))
binary_junk = st.one_of(
    st.binary(max_size=17),  # any length: one value, several, or a broken one
    st.lists(st.integers(0, 65535), max_size=5).map(lambda v: struct.pack(f"<{len(v)}H", *v)),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3)
    .map(lambda v: struct.pack(f"<{len(v)}d", *v)))


# A valid value for the elements the template lacks, to be replaced by junk.
_PLACEHOLDERS = {"NumberOfFrames": "1", "TemporalPositionIdentifier": 1, "EffectiveEchoTime": 2.5,
                 "ImageType": ["ORIGINAL", "PRIMARY"], "MRAcquisitionFrequencyEncodingSteps": 250,
                 "MRAcquisitionPhaseEncodingStepsInPlane": 251, "ProtocolName": "t1_fl3d",
                 "DiffusionBValue": 0.0, "TemporalPositionIndex": 1}


# Read only where another element is absent: that one goes, so the junk is what is read.
_SHADOWED_BY = {"EffectiveEchoTime": "EchoTime", "PixelSpacing": "ReconstructionDiameter",
                "MRAcquisitionFrequencyEncodingSteps": "AcquisitionMatrix",
                "MRAcquisitionPhaseEncodingStepsInPlane": "AcquisitionMatrix"}


def _put_raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """The bytes land in the file as they are: pydicom writes a raw element without converting it."""
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


def _junk_file(path: str, keyword: str, junk: bytes, in_group: bool) -> None:
    """A file whose `keyword` holds the bytes `junk`, at the top level or in a shared
    functional group (the Enhanced MR layout, read when the top level lacks the element).
    The file is written with a valid value that is then replaced in the bytes, so that the
    junk is not checked, converted or fixed by pydicom's writer."""
    ds = prep_series.make_instance(
        patient_id="P", patient_name="Doe^P", birth_date="19700101", study_uid="1.2.3",
        series_uid="1.2.3.4", description="ax dyn pre", index=0, position=0.0,
        tags=dict(prep_series.SIEMENS, RescaleSlope="2", RescaleIntercept="-10"))
    vr, macro = ELEMENTS[keyword]
    shadow = _SHADOWED_BY.get(keyword)
    if shadow and shadow in ds:
        del ds[shadow]
    if keyword not in ds:
        setattr(ds, keyword, _PLACEHOLDERS[keyword])
    element = ds[keyword]
    if in_group and macro:
        del ds[keyword]
        item = Dataset()
        item.add(element)
        item.is_undefined_length_sequence_item = True  # so the item's length needs no fixing
        group = Dataset()
        group.is_undefined_length_sequence_item = True
        setattr(group, macro, [item])
        group[macro].is_undefined_length = True
        ds.SharedFunctionalGroupsSequence = [group]
        ds["SharedFunctionalGroupsSequence"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    # Explicit VR little endian: tag, VR, 2-byte length (every VR here), value.
    head = struct.pack("<HH", element.tag.group, element.tag.elem) + vr.encode()
    with open(path, "rb") as f:
        data = f.read()
    start = data.index(head, 132)
    length = struct.unpack_from("<H", data, start + 6)[0]
    data = data[:start + 6] + struct.pack("<H", len(junk)) + junk + data[start + 8 + length:]
    with open(path, "wb") as f:
        f.write(data)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(keyword=st.sampled_from(sorted(ELEMENTS)), data=st.data(), in_group=st.booleans())
def test_junk_in_any_element_is_read_or_skipped_with_a_reason(tmp_path, keyword, data, in_group):
    value = data.draw(binary_junk if ELEMENTS[keyword][0] in ("US", "FD", "UL") else text_junk)
    root = tmp_path / "archive"
    root.mkdir(exist_ok=True)
    for old in root.iterdir():
        old.unlink()
    _junk_file(str(root / "x.dcm"), keyword, value, in_group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value it reads
        found = discover(str(root), progress=False)  # the header stage of prep and prediction
        for skip in found.skips:
            assert skip.path == "x.dcm" and skip.reason
            assert skip.detail or skip.reason in ("zero_byte", "no_pixel_data")
        used = [s for series in found.series for s in series.slices]
        assert len(found.skips) + len({s.path for s in used}) == 1
        for ref in used:
            for name, iap in iap_values(FrameHeader(ref.frame, 0.0, ref.iaps)).items():
                if iap.state == LabelState.PRESENT and SPECS[name].numeric:
                    assert math.isfinite(iap.number), (name, iap)
            try:  # the decode stage of prep and prediction
                prepared = read_prepared_frame(ref.path, ref.frame, 16, "resize")
            except DicomError as err:
                assert err.reason and err.detail
            else:
                assert math.isfinite(prepared.scale) and math.isfinite(prepared.offset)


def test_text_in_rescale_slope_skips_that_file_and_prepares_the_rest(tmp_path):
    import tensorflow_datasets as tfds
    from data_prep.builder import REPORT_FILE, prepare
    from data_prep.synthetic.cohort import generate_cohort
    from iap_jax.io.series import SeriesSelection, select

    root = str(tmp_path / "dicom")
    generate_cohort(root, 2, seed=5, preset="small", slices=3, workers=1)
    kept, _ = select(discover(root, progress=False), SeriesSelection(), "all", "salt")
    slices = [ref for chosen in kept for ref in chosen.series.slices]
    bad_file = slices[0].path
    ds = pydicom.dcmread(bad_file)
    _put_raw(ds, "RescaleSlope", "DS", b"abc ")
    ds.save_as(bad_file)

    data_dir = str(tmp_path / "data")
    dataset_dir = prepare(root, data_dir, image_size=16, workers=1, salt="salt", progress=False,
                          split=(1, 0, 0))
    with open(os.path.join(data_dir, REPORT_FILE)) as f:
        report = json.load(f)
    skip = by_path(report["skipped"], data_dir)[os.path.relpath(bad_file, root)]
    assert skip["reason"] == "malformed"
    assert "RescaleSlope" in skip["detail"] and "abc" in skip["detail"]
    examples = tfds.builder_from_directory(dataset_dir).as_dataset(split="train")
    assert len(list(examples)) == len([s for s in slices if s.path != bad_file]) > 0


@pytest.mark.parametrize("in_group", [False, True])
def test_the_fuzzed_element_is_the_one_read(tmp_path, in_group):
    """The junk lands where the reader looks: a valid value is read, text is a skip naming it."""
    _junk_file(str(tmp_path / "x.dcm"), "RescaleSlope", b"3 ", in_group)
    (ref,) = discover(str(tmp_path), progress=False).series[0].slices
    assert read_prepared_frame(ref.path, 0, 16, "resize").scale > 0
    _junk_file(str(tmp_path / "x.dcm"), "RescaleSlope", b"abc ", in_group)
    (skip,) = discover(str(tmp_path), progress=False).skips
    assert skip.reason == "malformed" and skip.detail == "RescaleSlope: not a number: 'abc'"
