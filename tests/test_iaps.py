"""The IAP schema on real MR files that ship inside pydicom, pydicom-data and nibabel."""
import glob
import math
import os

import nibabel
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from iap_jax.core import iaps
from iap_jax.core.iaps import LabelState, extract_iaps, read_iaps

A, E, P, I = LabelState.ABSENT, LabelState.EMPTY, LabelState.PRESENT, LabelState.INVALID


def nibabel_file(name):
    return os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", name)


def philips_series():
    root = os.path.dirname(get_testdata_file("MR_small.dcm"))
    return sorted(glob.glob(os.path.join(root, "dicomdirtests", "98892003", "MR1", "*")))


EXPECTED = {
    # Siemens Avanto 1.5 T VIBE: field written as 1.4939999580383, FOV = 0.72314... x 484.
    "examples_overlay.dcm": {
        "Manufacturer": (P, "SIEMENS"), "ManufacturerModelName": (P, "AVANTO"),
        "ScanOptions": (P, "SAT2\\FS"), "PatientPosition": (P, "HFS"),
        "MagneticFieldStrength": (P, "1.494"), "ContrastBolusAgent": (P, "11 ML OMNISCAN"),
        "AcquisitionMatrix": (P, "256x134"), "SliceThickness": (P, "4"), "FlipAngle": (P, "10"),
        "FOV": (P, "350"), "EchoTime": (P, "2.81"), "RepetitionTime": (P, "5.53"),
    },
    # Toshiba spin echo: empty ScanOptions and agent, no field strength or matrix tag.
    "MR_small.dcm": {
        "Manufacturer": (P, "TOSHIBA_MEC"), "ManufacturerModelName": (P, "MRT50H1"),
        "ScanOptions": (E, ""), "PatientPosition": (P, "HFS"),
        "MagneticFieldStrength": (A, ""), "ContrastBolusAgent": (E, ""),
        "AcquisitionMatrix": (A, ""), "SliceThickness": (P, "0.8"), "FlipAngle": (P, "90"),
        "FOV": (P, "20"), "EchoTime": (P, "240"), "RepetitionTime": (P, "4000"),
    },
    # Philips 1.5 T, 1024x1024.
    "MR2_UNCI.dcm": {
        "Manufacturer": (P, "PHILIPS"), "ManufacturerModelName": (P, "T5"),
        "ScanOptions": (P, "FC"), "MagneticFieldStrength": (P, "1.5"),
        "ContrastBolusAgent": (A, ""), "AcquisitionMatrix": (A, ""), "SliceThickness": (P, "6"),
        "FlipAngle": (P, "90"), "FOV": (P, "200"), "EchoTime": (P, "27"), "RepetitionTime": (P, "350"),
    },
}


def check(values, expected):
    got = {name: (values[name].state, values[name].value) for name in expected}
    assert got == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_files_give_expected_values(name):
    check(read_iaps(get_testdata_file(name)), EXPECTED[name])


@pytest.mark.parametrize("variant", [
    "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_truncated.dcm",
])
def test_every_encoding_of_one_image_gives_the_same_labels(variant):
    check(read_iaps(get_testdata_file(variant)), EXPECTED["MR_small.dcm"])


def test_siemens_triotim_from_nibabel():
    values = read_iaps(nibabel_file("0.dcm"))
    check(values, {
        "Manufacturer": (P, "SIEMENS"), "ManufacturerModelName": (P, "TRIOTIM"),
        "ScanOptions": (P, "PFP\\FS"), "MagneticFieldStrength": (P, "3"),
        "ContrastBolusAgent": (A, ""), "AcquisitionMatrix": (P, "128x128"),
        "SliceThickness": (P, "2.5"), "FlipAngle": (P, "90"), "EchoTime": (P, "93"),
        "RepetitionTime": (P, "6600"),
    })
    assert values["RepetitionTime"].number == 6600.0
    assert read_iaps(nibabel_file("1.dcm")) == values


def test_philips_series_exponent_spellings_are_normalised():
    files = philips_series()
    assert len(files) >= 3
    values = read_iaps(files[0])
    # Header spells these '1.000000e+01' and '3.700000e+00'.
    check(values, {
        "Manufacturer": (P, "PHILIPS MEDICAL SYSTEMS, INC."), "ManufacturerModelName": (P, "ECLIPSE 1.5T"),
        "MagneticFieldStrength": (P, "1.5"), "AcquisitionMatrix": (P, "256x256"),
        "SliceThickness": (P, "10"), "EchoTime": (P, "3.7"), "FlipAngle": (P, "20"),
        "ContrastBolusAgent": (E, ""), "ScanOptions": (E, ""),
    })
    assert math.isclose(values["EchoTime"].number, 3.7)


def test_enhanced_multiframe_reads_functional_groups():
    values = read_iaps(get_testdata_file("emri_small.dcm"))
    # Parameters are stripped from this file except field strength and the FOV geometry.
    check(values, {"MagneticFieldStrength": (P, "3"), "AcquisitionMatrix": (P, "256x256"),
                   "RepetitionTime": (A, ""), "Manufacturer": (A, "")})


def make_dataset(**tags):
    ds = Dataset()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def test_enhanced_mr_timing_from_shared_and_per_frame_groups():
    timing = make_dataset(RepetitionTime=4.5, FlipAngle=12)
    echo = make_dataset(EffectiveEchoTime=2.2)
    shared = make_dataset(MRTimingAndRelatedParametersSequence=[timing])
    frames = [make_dataset(MREchoSequence=[echo])]
    ds = make_dataset(SharedFunctionalGroupsSequence=[shared], PerFrameFunctionalGroupsSequence=frames)
    values = extract_iaps(ds)
    check(values, {"RepetitionTime": (P, "4.5"), "FlipAngle": (P, "12"), "EchoTime": (P, "2.2")})


@pytest.mark.parametrize("raw,expected", [
    ([0, 384, 384, 0], "384x384"),   # GE fills the column slots
    ([448, 0, 0, 251], "448x251"),   # Siemens fills the row slots
    ([512, 0, 358, 0], "512x358"),
])
def test_acquisition_matrix_is_frequency_by_phase_whichever_slots(raw, expected):
    assert extract_iaps(make_dataset(AcquisitionMatrix=raw))["AcquisitionMatrix"].value == expected


def test_absent_empty_present_invalid_are_kept_apart():
    assert extract_iaps(make_dataset())["ContrastBolusAgent"].state == A
    assert extract_iaps(make_dataset(ContrastBolusAgent=""))["ContrastBolusAgent"].state == E
    assert extract_iaps(make_dataset(ContrastBolusAgent="  gadavist "))["ContrastBolusAgent"] \
        .value == "GADAVIST"
    bad = make_dataset(RepetitionTime=0, ReconstructionDiameter=0, AcquisitionMatrix=[0, 0, 0, 0])
    bad.add(DataElement(Tag("FlipAngle"), "LO", "abc"))
    bad = extract_iaps(bad)
    assert {n: bad[n].state for n in ("RepetitionTime", "FOV", "FlipAngle", "AcquisitionMatrix")} == \
        {"RepetitionTime": I, "FOV": I, "FlipAngle": I, "AcquisitionMatrix": I}


def test_one_real_value_has_one_spelling():
    spellings = [
        make_dataset(MagneticFieldStrength="2.8936", ScanOptions=["FAST_GEMS", "PFP ", "FS"],
                     Manufacturer="GE  MEDICAL SYSTEMS", EchoTime="2.2000"),
        make_dataset(MagneticFieldStrength="2.89360001", ScanOptions="FAST_GEMS\\PFP\\FS",
                     Manufacturer="ge medical systems ", EchoTime="2.2"),
    ]
    a, b = (extract_iaps(ds) for ds in spellings)
    for name in ("MagneticFieldStrength", "ScanOptions", "Manufacturer", "EchoTime"):
        assert (a[name].state, a[name].value) == (b[name].state, b[name].value), name
    assert a["ScanOptions"].value == "FAST_GEMS\\PFP\\FS"
    assert a["MagneticFieldStrength"].value == "2.8936"


def test_fov_prefers_reconstruction_diameter():
    ds = make_dataset(ReconstructionDiameter="340", PixelSpacing=[0.5, 0.5], Columns=512)
    assert extract_iaps(ds)["FOV"].value == "340"
    del ds.ReconstructionDiameter
    assert extract_iaps(ds)["FOV"].value == "256"


def test_schema_table_matches_the_paper():
    assert iaps.IAP_NAMES == (
        "Manufacturer", "ManufacturerModelName", "ScanOptions", "PatientPosition",
        "MagneticFieldStrength", "ContrastBolusAgent", "AcquisitionMatrix", "SliceThickness",
        "FlipAngle", "FOV", "EchoTime", "RepetitionTime")
    continuous = {s.name for s in iaps.IAPS if s.kind == iaps.Kind.CONTINUOUS}
    assert continuous == {"EchoTime", "RepetitionTime"}
    assert [s.name for s in iaps.IAPS if s.missing_is_class] == ["ContrastBolusAgent"]


def test_read_iaps_never_touches_pixels(tmp_path):
    source = get_testdata_file("MR_small.dcm")
    content = open(source, "rb").read()
    pixels_at = len(content) - len(pydicom.dcmread(source).PixelData)
    # Garbage in the pixel data, then the file cut off half way through it.
    corrupt = content[:pixels_at] + b"\xde\xad" * ((len(content) - pixels_at) // 4)
    path = tmp_path / "x.dcm"
    path.write_bytes(corrupt)
    with pytest.raises(Exception):
        pydicom.dcmread(str(path)).pixel_array
    values = read_iaps(str(path))
    assert values["EchoTime"].number == 240.0
    check(values, EXPECTED["MR_small.dcm"])
