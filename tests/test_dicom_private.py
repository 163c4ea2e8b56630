"""Vendor-private fallbacks (iaps.PRIVATE_FALLBACKS): Siemens XA Enhanced MR files keep their
scan options not in ScanOptions (0018,0022) but in the series shadow attributes (creator
SIEMENS MR SDS 01, element xx5C), inside the private sequence xxFE of the shared functional
groups. Such a value is read only where the standard element is absent, only through its
private creator, and its origin is recorded up to the prep report."""
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from data_prep import report as report_lib

from iap_jax.core.iaps import PRIVATE_FALLBACKS, LabelState, extract_iaps, read_iaps
from iap_jax.io.dicom import read_instance_header
from iap_jax.io.series import discover

SDS = "SIEMENS MR SDS 01"
SHARED_ORIGIN = f"{SDS} (0021,xx5C) in SharedFunctionalGroupsSequence > {SDS} (0021,xxFE)"
TOP_LEVEL_ORIGIN = f"{SDS} (0021,xx5C)"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CLASSIC_MR = "1.2.840.10008.5.1.4.1.1.4"
ROWS, COLUMNS, FRAMES = 8, 10, 2


def _item(**elements) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _private_sds(target: Dataset, options, creators=(SDS,), block_of=SDS) -> None:
    """The SDS sequence (xxFE) holding ScanOptions (xx5C) in `target`. The creators are
    reserved in (0021,0010), (0021,0011)... in the given order, in the dataset and in the
    sequence item alike; the two elements go into the block of `block_of`."""
    sds = Dataset()
    for dataset in (target, sds):
        for creator in creators:
            dataset.private_block(0x0021, creator, create=True)
    sds.private_block(0x0021, block_of).add_new(0x5C, "CS", options)
    target.private_block(0x0021, block_of).add_new(0xFE, "SQ", [sds])


def xa_enhanced(path, *, options=("PFP", "FS"), standard_options=None, creators=(SDS,),
                block_of=SDS, syntax=ExplicitVRLittleEndian) -> str:
    """An Enhanced MR file as Siemens XA writes it: the IAPs in their standard Enhanced MR
    places (top level and functional group macros), no (0018,0022), the scan options in the
    private SDS sequence of the shared functional groups (none where options is None)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = ENHANCED_MR, uid, "MR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    ds.PatientID, ds.SeriesDescription, ds.InstanceNumber = "XA1", "ax dyn pre", 1
    ds.Manufacturer, ds.ManufacturerModelName = "Siemens Healthineers", "MAGNETOM Vida"
    ds.MagneticFieldStrength, ds.PatientPosition = 3, "HFS"
    if standard_options is not None:
        ds.ScanOptions = standard_options
    ds.Rows, ds.Columns, ds.NumberOfFrames = ROWS, COLUMNS, FRAMES
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    shared = _item(
        PixelMeasuresSequence=[_item(PixelSpacing=[0.7, 0.7], SliceThickness=1.5)],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])],
        MRTimingAndRelatedParametersSequence=[_item(RepetitionTime=4.33, FlipAngle=9)],
        MREchoSequence=[_item(EffectiveEchoTime=1.81)],
        MRFOVGeometrySequence=[_item(MRAcquisitionFrequencyEncodingSteps=384,
                                     MRAcquisitionPhaseEncodingStepsInPlane=300)],
        PixelValueTransformationSequence=[_item(RescaleSlope=1, RescaleIntercept=0)])
    if options is not None:
        _private_sds(shared, list(options), creators, block_of)
    ds.SharedFunctionalGroupsSequence = [shared]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(PlanePositionSequence=[_item(ImagePositionPatient=[0, 0, 1.5 * frame])])
        for frame in range(FRAMES)]
    ds.PixelData = np.arange(FRAMES * ROWS * COLUMNS, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def test_xa_enhanced_scan_options_come_from_the_sds_sequence_with_their_origin(tmp_path):
    iaps = read_iaps(xa_enhanced(tmp_path / "xa.dcm"))
    options = iaps["ScanOptions"]
    assert (options.state, options.value, options.origin) == (LabelState.PRESENT, "PFP\\FS", SHARED_ORIGIN)
    # Every other IAP of an XA Enhanced MR file has its standard place: no fallback there.
    expected = {"Manufacturer": "SIEMENS HEALTHINEERS", "ManufacturerModelName": "MAGNETOM VIDA",
                "PatientPosition": "HFS", "MagneticFieldStrength": "3", "AcquisitionMatrix": "384x300",
                "SliceThickness": "1.5", "FlipAngle": "9", "FOV": "7", "EchoTime": "1.81",
                "RepetitionTime": "4.33"}
    assert {name: iaps[name].value for name in expected} == expected
    assert all(iaps[name].present and not iaps[name].origin for name in expected)
    # Enhanced MR names the agent by a code sequence, not (0018,0010): no private copy.
    assert iaps["ContrastBolusAgent"].state == LabelState.ABSENT
    assert set(PRIVATE_FALLBACKS) == {"ScanOptions"}


def test_instance_header_and_discovery_record_the_origin(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    path = xa_enhanced(root / "xa.dcm")
    xa_enhanced(root / "standard.dcm", options=None, standard_options=["SAT1"])
    header = read_instance_header(path)
    assert header.iap_origins == (("ScanOptions", SHARED_ORIGIN),)
    assert all(frame.iaps[2][:2] == (int(LabelState.PRESENT), "PFP\\FS") for frame in header.frames)
    assert read_instance_header(str(root / "standard.dcm")).iap_origins == ()
    found = discover(str(root), progress=False)
    assert found.iap_origins == {"ScanOptions": {SHARED_ORIGIN: 1}}
    report = report_lib.new_report(found, [], {}, [], {}, "c")
    assert report["iap_origins"] == {"ScanOptions": {SHARED_ORIGIN: 1}}


def test_standard_scan_options_win_over_the_private_ones(tmp_path):
    for standard, expected in ((["SAT1", "FS"], "SAT1\\FS"), ("", "")):
        options = read_iaps(xa_enhanced(tmp_path / "xa.dcm", standard_options=standard))["ScanOptions"]
        assert (options.value, options.origin) == (expected, "")
        # Present but empty is no absence: the private value does not replace it.
        assert options.state == (LabelState.PRESENT if expected else LabelState.EMPTY)


@pytest.mark.parametrize("creators, block_of", [
    (("SIEMENS MR SDI 02",), "SIEMENS MR SDI 02"),  # (0021,10FE) > (0021,105C) of another creator
    (("SIEMENS MR SDI 02", SDS), "SIEMENS MR SDI 02"),  # SDS reserved, at block 11, holding nothing
    (("GEMS_RELA_01",), "GEMS_RELA_01"),
])
def test_the_same_tag_numbers_under_another_creator_are_not_read(tmp_path, creators, block_of):
    path = xa_enhanced(tmp_path / "xa.dcm", creators=creators, block_of=block_of)
    ds = pydicom.dcmread(path)
    assert (0x0021, 0x10FE) in ds.SharedFunctionalGroupsSequence[0]  # the bare numbers are there
    options = extract_iaps(ds)["ScanOptions"]
    assert (options.state, options.origin) == (LabelState.ABSENT, "")
    assert read_instance_header(path).iap_origins == ()


def test_the_sds_creator_is_found_in_whatever_block_it_reserved(tmp_path):
    path = xa_enhanced(tmp_path / "xa.dcm", creators=("SIEMENS MR SDI 02", SDS), block_of=SDS)
    shared = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0]
    assert (0x0021, 0x11FE) in shared and (0x0021, 0x10FE) not in shared
    options = read_iaps(path)["ScanOptions"]
    assert (options.value, options.origin) == ("PFP\\FS", SHARED_ORIGIN)


def test_implicit_vr_file_reads_the_same(tmp_path):
    # Without explicit VRs the private elements arrive as UN: the sequence and the text are still read.
    options = read_iaps(xa_enhanced(tmp_path / "xa.dcm", syntax=ImplicitVRLittleEndian))["ScanOptions"]
    assert (options.state, options.value, options.origin) == (LabelState.PRESENT, "PFP\\FS", SHARED_ORIGIN)


def test_classic_xa_file_keeps_the_sds_elements_at_the_top_level(tmp_path):
    path = xa_enhanced(tmp_path / "xa.dcm", options=None)
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CLASSIC_MR
    ds.private_block(0x0021, "SIEMENS MR SDI 02", create=True)
    ds.private_block(0x0021, SDS, create=True).add_new(0x5C, "CS", ["IR", "WE"])
    ds.save_as(path, enforce_file_format=True)
    options = read_iaps(path)["ScanOptions"]
    assert (options.value, options.origin) == ("IR\\WE", TOP_LEVEL_ORIGIN)
