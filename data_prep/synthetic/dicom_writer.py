"""DICOM headers and files for the synthetic series, with each vendor's conventions.

One file per slice, MR Image Storage, Implicit VR Little Endian (as in the Duke cohort),
valid file meta; or one file per series, Enhanced MR Image Storage, Explicit VR Little
Endian, as current Siemens, Philips and Canon scanners write (EnhancedSeriesEncoder: the
same pixels and header IAPs, the acquisition parameters in the functional groups). UIDs are pydicom `generate_uid` hashes of the cohort seed, the patient's
index and ID, and the series/slice, so a rerun writes identical files and no two
patients of a cohort share a UID.
"""
from __future__ import annotations

import copy
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (EnhancedMRImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage, generate_uid)

from data_prep.synthetic.scanners import SeriesProtocol
from data_prep.synthetic.tissues import GYROMAGNETIC_MHZ_PER_T

from iap_jax.core import iaps


def format_number(value: float) -> str:
    """Canonical spelling: no trailing zeros, at most 6 decimals (1.5, 3, 2.8936)."""
    return iaps.format_number(value, 6)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters."""
    for digits in (12, 10, 8, 6):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot encode {value} as DS")


def acquisition_matrix_tag(protocol: SeriesProtocol) -> list[int]:
    """The four AcquisitionMatrix values in the order the vendor fills them."""
    freq, phase = protocol.acquisition_matrix
    return [0, freq, phase, 0] if protocol.scanner.is_ge else [freq, 0, 0, phase]


@dataclass(frozen=True)
class PatientIdentity:
    patient_id: str
    patient_index: int  # in the cohort; part of every UID's entropy
    patient_name: str
    birth_date: str
    age: int
    weight_kg: int
    study_date: str
    study_time: str
    accession_number: str
    institution: str


@dataclass(frozen=True)
class SliceGeometry:
    """Stored grid of a series: Rows = Columns = size; positions per slice."""
    size: int
    pixel_spacing_mm: float
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    first_pixel_xy: tuple[float, float]
    slice_z: tuple[float, ...]


def _patient_entropy(seed: int, identity: PatientIdentity) -> list[str]:
    return [str(seed), str(identity.patient_index), identity.patient_id]


def series_uid(seed: int, identity: PatientIdentity, series_number: int) -> str:
    return generate_uid(entropy_srcs=_patient_entropy(seed, identity) + ["series", str(series_number)])


def study_uid(seed: int, identity: PatientIdentity) -> str:
    return generate_uid(entropy_srcs=_patient_entropy(seed, identity) + ["study"])


def _time_plus(hhmmss: str, seconds: float) -> str:
    total = int(hhmmss[:2]) * 3600 + int(hhmmss[2:4]) * 60 + int(hhmmss[4:6]) + int(seconds)
    total %= 24 * 3600
    return f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"


def series_template(protocol: SeriesProtocol, identity: PatientIdentity, geometry: SliceGeometry,
                    seed: int, window: tuple[float, float]) -> Dataset:
    """Every tag of the series except the per-slice ones."""
    scanner = protocol.scanner
    ge = scanner.is_ge
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"] if ge else ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
    ds.SOPClassUID = MRImageStorage
    seconds = protocol.minutes_after_injection * 60 + (300 if protocol.role == "dce" else 0)
    series_time = _time_plus(identity.study_time, 120 + seconds)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = identity.study_date
    ds.StudyTime = identity.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
    ds.AccessionNumber = identity.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = scanner.manufacturer
    ds.InstitutionName = identity.institution
    ds.ReferringPhysicianName = "REFERRING^PHYSICIAN"
    ds.StationName = ("GEMR" if ge else "MRC") + str(zlib.crc32(scanner.key.encode()) % 90000 + 10000)
    ds.StudyDescription = "MRI BREAST BILATERAL W WO CONTRAST" if ge else "BREAST^BILATERAL"
    ds.SeriesDescription = protocol.series_description
    ds.ManufacturerModelName = scanner.model
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = "F"
    ds.PatientAge = f"{identity.age:03d}Y"
    ds.PatientWeight = str(identity.weight_kg)
    if protocol.contrast_label is not None:
        ds.ContrastBolusAgent = protocol.contrast_label
    ds.BodyPartExamined = "BREAST"
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SS", "SP"] if ge else ["SP", "OSP"]
    ds.ScanOptions = list(protocol.scan_option_tokens) if protocol.scan_option_tokens else ""
    ds.MRAcquisitionType = "3D"
    ds.SequenceName = "efgre3d" if ge else "*fl3d1"
    ds.SliceThickness = format_number(protocol.slice_thickness_mm)
    ds.RepetitionTime = format_number(protocol.tr_ms)
    ds.EchoTime = format_number(protocol.te_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _ds(GYROMAGNETIC_MHZ_PER_T * scanner.field_written)
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = format_number(scanner.field_written)
    ds.SpacingBetweenSlices = format_number(protocol.slice_spacing_mm)
    freq, phase = protocol.acquisition_matrix
    ds.NumberOfPhaseEncodingSteps = str(int(round(phase * protocol.partial_fourier)))
    ds.EchoTrainLength = "1"
    ds.PercentSampling = format_number(100 * protocol.partial_fourier)
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = format_number(scanner.pixel_bandwidth_hz)
    ds.DeviceSerialNumber = str(zlib.crc32(scanner.key.encode()) % 900000 + 100000)
    ds.SoftwareVersions = scanner.software_versions
    ds.ProtocolName = "BREAST DCE" if protocol.role == "dce" else "BREAST T1"
    if ge:
        ds.ReconstructionDiameter = format_number(protocol.fov_mm)
    ds.ReceiveCoilName = f"{scanner.coil_elements}Ch Breast" if ge else "BreastMatrix"
    ds.AcquisitionMatrix = acquisition_matrix_tag(protocol)
    ds.InPlanePhaseEncodingDirection = "COL" if ge else "ROW"
    ds.FlipAngle = format_number(protocol.flip_angle)
    ds.VariableFlipAngleFlag = "N"
    ds.PatientPosition = protocol.patient_position
    ds.StudyInstanceUID = study_uid(seed, identity)
    ds.SeriesInstanceUID = series_uid(seed, identity, protocol.series_number)
    ds.StudyID = identity.accession_number[-4:]
    ds.SeriesNumber = str(protocol.series_number)
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = [format_number(v) for v in
                                  geometry.row_direction + geometry.column_direction]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=_patient_entropy(seed, identity) + ["frame"])
    ds.PositionReferenceIndicator = ""
    if protocol.role == "dce":
        ds.TemporalPositionIdentifier = str(protocol.phase + 1)
        ds.NumberOfTemporalPositions = str(protocol.n_phases)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = geometry.size
    ds.PixelSpacing = [_ds(geometry.pixel_spacing_mm)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if ge else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if ge else 0
    ds.WindowCenter = format_number(round(window[0]))
    ds.WindowWidth = format_number(round(window[1]))
    if ge:
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "IAPJAX_SYNTH"
    return ds


def pixel_dtype(protocol: SeriesProtocol) -> np.dtype:
    return np.dtype("<i2") if protocol.scanner.is_ge else np.dtype("<u2")


def max_stored_value(protocol: SeriesProtocol) -> int:
    return 32767 if protocol.scanner.is_ge else 4095


# Tags that change from slice to slice; everything else is encoded once per series.
_PER_SLICE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


def _element(tag: int, value: bytes, pad: bytes) -> bytes:
    """One Implicit VR Little Endian data element."""
    if len(value) % 2:
        value += pad
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _explicit_element(tag: int, vr: str, value: bytes, pad: bytes = b"\0") -> bytes:
    """One Explicit VR Little Endian data element (file meta group)."""
    if len(value) % 2:
        value += pad
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in ("OB", "OW", "UN", "SQ", "UT"):
        return head + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + struct.pack("<H", len(value)) + value


class SeriesEncoder:
    """Encodes the files of one series fast: the constant elements are encoded once by
    pydicom, the per-slice ones (UIDs, positions, pixels) are spliced in as bytes."""

    def __init__(self, template: Dataset, geometry: SliceGeometry, seed: int):
        self.geometry = geometry
        self.seed = seed
        self.series_uid = str(template.SeriesInstanceUID)
        constant = Dataset()
        for elem in template:
            if elem.tag not in _PER_SLICE_TAGS:
                constant.add(elem)
        bounds = (0,) + _PER_SLICE_TAGS + (0xFFFFFFFF,)
        self.segments = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = Dataset()
            for elem in constant:
                if lo <= elem.tag < hi:
                    part.add(elem)
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, True
            write_dataset(fp, part)
            self.segments.append(fp.getvalue())
        self.meta = template.file_meta

    def instance_uid(self, index: int) -> str:
        return generate_uid(entropy_srcs=[str(self.seed), self.series_uid, str(index)])

    def _file_meta(self, sop_uid: bytes) -> bytes:
        body = (_explicit_element(0x00020001, "OB", b"\0\1")
                + _explicit_element(0x00020002, "UI", str(self.meta.MediaStorageSOPClassUID).encode())
                + _explicit_element(0x00020003, "UI", sop_uid)
                + _explicit_element(0x00020010, "UI", str(self.meta.TransferSyntaxUID).encode())
                + _explicit_element(0x00020012, "UI", str(self.meta.ImplementationClassUID).encode())
                + _explicit_element(0x00020013, "SH", self.meta.ImplementationVersionName.encode(), b" "))
        length = _explicit_element(0x00020000, "UL", struct.pack("<I", len(body)))
        return b"\0" * 128 + b"DICM" + length + body

    def encode(self, index: int, pixels: np.ndarray) -> bytes:
        z = self.geometry.slice_z[index]
        x0, y0 = self.geometry.first_pixel_xy
        uid = self.instance_uid(index).encode()
        position = "\\".join(_ds(v) for v in (x0, y0, z)).encode()
        varying = (
            _element(0x00080018, uid, b"\0"),
            _element(0x00200013, str(index + 1).encode(), b" "),
            _element(0x00200032, position, b" "),
            _element(0x00201041, _ds(z).encode(), b" "),
            _element(0x7FE00010, np.ascontiguousarray(pixels).tobytes(), b"\0"),
        )
        parts = [self._file_meta(uid), self.segments[0]]
        for element, segment in zip(varying, self.segments[1:]):
            parts += [element, segment]
        return b"".join(parts)

    def write(self, index: int, pixels: np.ndarray, path: Path) -> None:
        path.write_bytes(self.encode(index, pixels))

    def close(self) -> None:
        pass


# The name of an enhanced series' one file in its folder.
ENHANCED_FILE = "0001.dcm"


def _item(**elements) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _pop(ds: Dataset, keyword: str, default=None):
    value = ds.get(keyword, default)
    if keyword in ds:
        del ds[keyword]
    return value


def enhanced_header(template: Dataset, geometry: SliceGeometry, seed: int) -> Dataset:
    """The classic series template as an Enhanced MR Image header for all slices: geometry,
    pixel measures, rescale, timing, echo and FOV geometry in the shared functional groups,
    each frame's position in its own; the values (and so the IAPs read from them) are the
    classic files'."""
    ds = copy.deepcopy(template)
    series = str(ds.SeriesInstanceUID)
    frames = len(geometry.slice_z)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), series, "enhanced"])
    ds.InstanceNumber = "1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.NumberOfFrames = str(frames)
    matrix = [int(v) for v in _pop(ds, "AcquisitionMatrix")]
    freq, phase = (matrix[1], matrix[2]) if matrix[0] == 0 else (matrix[0], matrix[3])
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(
            PixelSpacing=_pop(ds, "PixelSpacing"), SliceThickness=_pop(ds, "SliceThickness"),
            SpacingBetweenSlices=_pop(ds, "SpacingBetweenSlices"))]),
        PlaneOrientationSequence=Sequence([_item(
            ImageOrientationPatient=_pop(ds, "ImageOrientationPatient"))]),
        PixelValueTransformationSequence=Sequence([_item(
            RescaleIntercept=_pop(ds, "RescaleIntercept", "0"), RescaleSlope=_pop(ds, "RescaleSlope", "1"),
            RescaleType=_pop(ds, "RescaleType", "US"))]),
        FrameVOILUTSequence=Sequence([_item(
            WindowCenter=_pop(ds, "WindowCenter"), WindowWidth=_pop(ds, "WindowWidth"))]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(
            RepetitionTime=float(_pop(ds, "RepetitionTime")), FlipAngle=_pop(ds, "FlipAngle"),
            EchoTrainLength=_pop(ds, "EchoTrainLength"))]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=float(_pop(ds, "EchoTime")))]),
        MRFOVGeometrySequence=Sequence([_item(
            InPlanePhaseEncodingDirection=_pop(ds, "InPlanePhaseEncodingDirection"),
            MRAcquisitionFrequencyEncodingSteps=freq, MRAcquisitionPhaseEncodingStepsInPlane=phase,
            PercentSampling=_pop(ds, "PercentSampling"),
            PercentPhaseFieldOfView=_pop(ds, "PercentPhaseFieldOfView"))]),
        MRAveragesSequence=Sequence([_item(NumberOfAverages=_pop(ds, "NumberOfAverages"))]),
        MRReceiveCoilSequence=Sequence([_item(ReceiveCoilName=_pop(ds, "ReceiveCoilName"))]),
        MRImageFrameTypeSequence=Sequence([_item(
            FrameType=list(ds.ImageType), PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T1")]),
    )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    x0, y0 = geometry.first_pixel_xy
    ds.PerFrameFunctionalGroupsSequence = Sequence([_item(
        FrameContentSequence=Sequence([_item(InStackPositionNumber=k + 1, StackID="1")]),
        PlanePositionSequence=Sequence([_item(ImagePositionPatient=[_ds(v) for v in (x0, y0, z)])]),
    ) for k, z in enumerate(geometry.slice_z)])
    ds.file_meta = copy.deepcopy(template.file_meta)
    ds.file_meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class EnhancedSeriesEncoder:
    """Writes a series as one Enhanced MR multi-frame file, slice by slice as the classic
    SeriesEncoder is called (index 0, 1, ... in order): the header and the PixelData element's
    head are written first, then each slice's pixels are appended, so that no more than one
    slice is held."""

    def __init__(self, template: Dataset, geometry: SliceGeometry, seed: int):
        self.geometry = geometry
        self.header = enhanced_header(template, geometry, seed)
        self._file = None
        self._written = 0

    def write(self, index: int, pixels: np.ndarray, path: Path) -> None:
        """Appends slice `index` to ENHANCED_FILE in path's folder (path names the classic file)."""
        if index != self._written:
            raise ValueError(f"slices of an enhanced series are written in order: got {index}, "
                             f"expected {self._written}")
        data = np.ascontiguousarray(pixels).tobytes()
        if self._file is None:
            self._file = open(path.parent / ENHANCED_FILE, "wb")
            fp = DicomBytesIO()
            pydicom.dcmwrite(fp, self.header, enforce_file_format=True)
            length = len(data) * len(self.geometry.slice_z)
            self._file.write(fp.getvalue() + _explicit_element(0x7FE00010, "OW", b"")[:-4]
                             + struct.pack("<I", length + length % 2))
        self._file.write(data)
        self._written += 1
        if self._written == len(self.geometry.slice_z):
            if len(data) * self._written % 2:
                self._file.write(b"\0")
            self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
