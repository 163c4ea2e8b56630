"""One acquisition stored twice in one series (a classic and an enhanced copy): used once."""
import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import prep_series

from iap_jax.io.series import discover

ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


def classic_series(folder, num_slices=4, series_uid=None, echo_time="2.81", echo_number=1,
                   study_uid="1.2.3.4", description="ax t2 tse"):
    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for index in range(num_slices):
        ds = prep_series.make_instance(
            patient_id="P", patient_name="Doe^P", birth_date="19700101", study_uid=study_uid,
            series_uid=series_uid, description=description, index=index, position=2.0 * index,
            tags=dict(prep_series.SIEMENS, EchoTime=echo_time, EchoNumbers=echo_number))
        ds.save_as(os.path.join(folder, f"e{echo_number}_{index:04d}.dcm"), enforce_file_format=True)
    return series_uid


def enhanced_copy(path, series_uid, num_slices=4, study_uid="1.2.3.4", positions=None):
    """An Enhanced MR Image Storage file of the classic series: per-frame positions, shared
    orientation and pixel measures, the echo time per frame."""
    positions = [2.0 * i for i in range(num_slices)] if positions is None else positions
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENHANCED_MR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_MR, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Manufacturer = "MR", "SIEMENS"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = "P", "Doe^P", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesDescription = "ax t2 tse"
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [1.0, 1.0], "1.1"
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for position in positions:
        plane, echo, frame = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = [-100.0, -100.0, float(position)]
        echo.EffectiveEchoTime = 2.81
        frame.PlanePositionSequence = Sequence([plane])
        frame.MREchoSequence = Sequence([echo])
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(positions)
    ds.Rows = ds.Columns = 24
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.random.default_rng(0).integers(0, 4000, (len(positions), 24, 24), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_classic_and_enhanced_copy_count_once(tmp_path):
    uid = classic_series(str(tmp_path / "series"))
    enhanced_copy(str(tmp_path / "series" / "enhanced.dcm"), uid)
    found = discover(str(tmp_path), progress=False)
    assert len(found.series) == 1
    series = found.series[0]
    assert len(series.slices) == 4
    assert all(os.path.basename(ref.path).startswith("e1_") for ref in series.slices)
    assert "series/enhanced.dcm" not in series.files
    skips = [(s.path, s.reason) for s in found.skips]
    assert skips == [("series/enhanced.dcm", "duplicate_frame")]
    assert "classic" in found.skips[0].detail


def test_the_representation_with_more_frames_is_kept(tmp_path):
    # Two classic slices of four: the enhanced copy covers more and is kept.
    uid = classic_series(str(tmp_path / "series"), num_slices=2)
    enhanced_copy(str(tmp_path / "series" / "enhanced.dcm"), uid)
    found = discover(str(tmp_path), progress=False)
    assert len(found.series) == 1 and len(found.series[0].slices) == 4
    assert found.series[0].files == ("series/enhanced.dcm",)
    assert sorted(s.path for s in found.skips) == ["series/e1_0000.dcm", "series/e1_0001.dcm"]
    assert {s.reason for s in found.skips} == {"duplicate_frame"}
    assert all("enhanced" in s.detail for s in found.skips)


def test_a_partly_copied_file_keeps_its_other_frames(tmp_path):
    # Four classic slices at 0-6 mm; an enhanced file with three of them and one at 20 mm.
    # Both cover four frames: the classic copy is kept, and of the enhanced file only the
    # frame at 20 mm, which no classic file holds.
    uid = classic_series(str(tmp_path / "series"))
    enhanced_copy(str(tmp_path / "series" / "enhanced.dcm"), uid, positions=[0, 2, 4, 20])
    found = discover(str(tmp_path), progress=False)
    series = found.series[0]
    assert len(series.slices) == 5
    assert [ref.frame for ref in series.slices if ref.path.endswith("enhanced.dcm")] == [3]
    assert series.slices[-1].path.endswith("enhanced.dcm")  # ordered along the normal
    assert found.skips == []


def test_another_series_at_the_same_positions_is_kept(tmp_path):
    classic_series(str(tmp_path / "a"))
    classic_series(str(tmp_path / "b"))
    found = discover(str(tmp_path), progress=False)
    assert [len(s.slices) for s in found.series] == [4, 4] and found.skips == []


def test_two_echoes_at_one_position_are_not_copies(tmp_path):
    uid = classic_series(str(tmp_path / "s"), echo_time="10", echo_number=1)
    classic_series(str(tmp_path / "s"), series_uid=uid, echo_time="80", echo_number=2)
    enhanced_copy(str(tmp_path / "s" / "enhanced.dcm"), uid)  # echo 2.81: neither echo
    found = discover(str(tmp_path), progress=False)
    assert len(found.series) == 1 and len(found.series[0].slices) == 12
    assert found.skips == []


def test_frames_without_geometry_are_never_copies(tmp_path):
    uid = classic_series(str(tmp_path / "s"))
    enhanced_copy(str(tmp_path / "s" / "enhanced.dcm"), uid)
    for name in os.listdir(tmp_path / "s"):
        ds = pydicom.dcmread(tmp_path / "s" / name)
        if "SharedFunctionalGroupsSequence" in ds:
            del ds.SharedFunctionalGroupsSequence  # no orientation: no geometry
        else:
            del ds.ImagePositionPatient
        ds.save_as(tmp_path / "s" / name)
    found = discover(str(tmp_path), progress=False)
    assert len(found.series[0].slices) == 8 and found.skips == []
