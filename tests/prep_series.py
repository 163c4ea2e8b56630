"""Small DICOM series written with pydicom, for the prep tests (Duke-like headers)."""
from __future__ import annotations

import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, RLELossless,
                        generate_uid)

SIEMENS = dict(Manufacturer="SIEMENS", ManufacturerModelName="Avanto", MagneticFieldStrength="1.494",
               ScanOptions="PFP\\FS", RepetitionTime="5.53", EchoTime="2.81", FlipAngle="10",
               AcquisitionMatrix=[448, 0, 0, 251], SliceThickness="1.1", ReconstructionDiameter="340",
               ContrastBolusAgent="MAGNEVIST", PatientPosition="FFP")
GE = dict(Manufacturer="GE MEDICAL SYSTEMS", ManufacturerModelName="SIGNA HDx", MagneticFieldStrength="1.5",
          ScanOptions="FAST_GEMS\\SAT_GEMS\\PFP\\FS", RepetitionTime="6.1", EchoTime="2.4", FlipAngle="12",
          AcquisitionMatrix=[0, 384, 384, 0], SliceThickness="2", ReconstructionDiameter="360",
          PatientPosition="HFP")


def make_instance(*, patient_id: str, patient_name: str, birth_date: str, study_uid: str,
                  series_uid: str, description: str, index: int, position: float, rows: int = 24,
                  columns: int = 24, tags: dict | None = None, seed: int = 0,
                  temporal_position: int | None = None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, patient_name, birth_date
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesDescription = description
    ds.InstanceNumber = index + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100.0, -100.0, float(position)]
    ds.PixelSpacing = [1.0, 1.0]
    if temporal_position is not None:
        ds.TemporalPositionIdentifier = temporal_position
    for keyword, value in (tags or {}).items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(seed * 1000 + index)
    ds.PixelData = rng.integers(0, 4000, (rows, columns), dtype=np.uint16).tobytes()
    return ds


def write_series(folder: str, *, patient_id: str, description: str, num_slices: int = 4,
                 tags: dict | None = None, rows: int = 24, columns: int = 24, seed: int = 0,
                 rle: bool = False, temporal_position: int | None = None,
                 study_uid: str | None = None, shuffle_names: bool = True,
                 patient_name: str | None = None, birth_date: str = "19700101") -> list[str]:
    """One series in `folder`, files named so that name order is not slice order."""
    os.makedirs(folder, exist_ok=True)
    series_uid, study_uid = generate_uid(), study_uid or generate_uid()
    paths = []
    for index in range(num_slices):
        ds = make_instance(patient_id=patient_id,
                           patient_name=f"Doe^{patient_id}" if patient_name is None else patient_name,
                           birth_date=birth_date, study_uid=study_uid, series_uid=series_uid,
                           description=description, index=index, position=2.0 * index, rows=rows,
                           columns=columns, tags=tags, seed=seed, temporal_position=temporal_position)
        if rle:
            ds.compress(RLELossless)
        name = f"{num_slices - 1 - index if shuffle_names else index:04d}.dcm"
        path = os.path.join(folder, name)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


SIEMENS_SERIES = ("ax t1", "ax dyn pre", "ax dyn 1st pass", "ax dyn 2nd pass")
GE_SERIES = ("Ax 3D T1 NON FS", "ax 3d dyn", "Ph1/ax 3d dyn", "Ph2/ax 3d dyn")


def write_duke_cohort(root: str, num_patients: int, num_slices: int = 4, first: int = 0) -> dict:
    """Patients laid out as <PatientID>/<study>/<series>/, Siemens (even) and GE (odd), each
    with a non-fat-sat T1, a pre-contrast DCE series and two post-contrast phases.
    Returns {PatientID: (vendor tags, [series folder per description])}."""
    cohort = {}
    for number in range(first, first + num_patients):
        patient_id = f"Breast_MRI_{number:03d}"
        vendor, descriptions = (SIEMENS, SIEMENS_SERIES) if number % 2 == 0 else (GE, GE_SERIES)
        study_uid = generate_uid()
        folders = []
        for position, description in enumerate(descriptions):
            folder = os.path.join(root, patient_id, "study", f"{position}-{description.replace('/', '_')}")
            temporal = position if vendor is GE and position > 0 else None
            tags = dict(vendor)
            if position == 0:
                tags["ScanOptions"] = "PFP"
            write_series(folder, patient_id=patient_id, description=description, num_slices=num_slices,
                         tags=tags, seed=number * 10 + position, temporal_position=temporal,
                         study_uid=study_uid, rle=(number % 3 == 0 and position == 1))
            folders.append(folder)
        cohort[patient_id] = (vendor, folders)
    return cohort


def corrupt_pixels(path: str) -> None:
    """A corrupt JPEG 2000 stream in place of the file's pixels: it fails at decode only."""
    ds = pydicom.dcmread(path)
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path)
