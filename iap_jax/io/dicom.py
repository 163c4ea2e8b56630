"""Robust reading of DICOM files: header IAPs and geometry first, pixels on demand.

Headers are read without pixel data (so an archive can be scanned quickly; a gzip-compressed
file is decompressed in memory first), checked for what would make the pixels unusable (no
pixel data, truncated, no decoder, a rescale or frame count that is no number), and summarised
into a small picklable `InstanceHeader`. Pixels are decoded one frame at a time into
float32 intensities: Rescale Slope/Intercept applied (also from Enhanced MR functional
groups), MONOCHROME1 inverted so that brighter always means more signal.

Every failure is a `DicomError` whose `reason` is a short stable code (for skip reports)
and whose message names the file: a malformed value never escapes as another exception, so
one file cannot stop a run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import logging
import math
import os
from typing import Iterator, Sequence

import numpy as np
import pydicom
from etils import epath
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import as_pixel_options, pixel_array
from pydicom.pixels.decoders.base import get_decoder

from iap_jax.core.iaps import (IAP_NAMES, MISSING, IapValue, LabelState, extract_iaps, find_element_value,
                               one_number)
from iap_jax.core.preprocess import PreparedSlice, preprocess_slice
from iap_jax.core.siemens_csa import Mosaic, MosaicError, cut_tile, mosaic_layout
from iap_jax.io.storage import is_remote

# SOP classes that carry no image to learn from (some, like SEG, still have pixel data).
_NON_IMAGE_SOP_PREFIXES = {
    "1.2.840.10008.1.3.10": "DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.88.": "structured report",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.66": "segmentation / registration / fiducials",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.4.2": "MR spectroscopy",
}
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", _DEFLATED}
# The IAPs are MR acquisition parameters: images of other modalities are skipped.
ACCEPTED_MODALITIES = ("MR",)
_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1."
_MR_STORAGE = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",
               "1.2.840.10008.5.1.4.1.1.4.3", "1.2.840.10008.5.1.4.1.1.4.4"}
# Enhanced MR, Enhanced MR Color and Legacy Converted Enhanced MR: one file, many frames.
_ENHANCED_MR_STORAGE = _MR_STORAGE - {"1.2.840.10008.5.1.4.1.1.4"}
_INTENSITY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_TAG = 0x7FE00010
_PIXEL_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # little, big endian
_UNDEFINED_LENGTH = 0xFFFFFFFF
_GZIP_MAGIC = b"\x1f\x8b"  # research archives often keep each file as .dcm.gz


class DicomError(Exception):
    """A file that cannot be used, with a short reason code for skip reports."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
        self.path = path
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # pickled across worker processes
        return DicomError, (self.path, self.reason, self.detail)


def _malformed(path: str, err: Exception) -> DicomError:
    """Any other exception met while reading a header value: pydicom and the conversions
    here raise many kinds on malformed values, and one file must never stop a run."""
    return DicomError(path, "malformed", f"{type(err).__name__}: {err}"[:200])


@dataclasses.dataclass(frozen=True)
class FrameHeader:
    """One image plane of an instance: its position along the slice normal and its IAPs."""

    frame: int  # in a Siemens MOSAIC, the tile (siemens_csa.py)
    position: float  # NaN where the geometry is missing
    iaps: tuple[tuple[int, str, float], ...]  # (LabelState, canonical value, number) per IAP_NAMES
    identity: tuple | None = None  # which plane of the acquisition it is (frame_identity)


@dataclasses.dataclass(frozen=True)
class InstanceHeader:
    """What the prep stage needs from one file's header (no pixels, small, picklable)."""

    path: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    patient_name: str  # with the birth date, keys a patient whose PatientID is empty
    patient_birth_date: str
    series_description: str
    temporal_position: int | None
    instance_number: int | None
    rows: int
    columns: int
    frames: tuple[FrameHeader, ...]
    note: str = ""  # a fact worth reporting that is no reason to skip the file
    # (IAP name, origin) of each value a vendor-private fallback supplied (iaps.PRIVATE_FALLBACKS),
    # distinct over the frames; empty where every IAP came from its standard element.
    iap_origins: tuple[tuple[str, str], ...] = ()
    enhanced: bool = False  # an Enhanced (or Legacy Converted Enhanced) MR multi-frame file
    protocol_name: str = ""
    image_type: str = ""  # ImageType's values joined by "\\"
    diffusion: bool = False  # a DiffusionBValue in the header (top level or first frame)


def iap_values(frame: FrameHeader) -> dict[str, IapValue]:
    return {name: IapValue(LabelState(state), value, number)
            for name, (state, value, number) in zip(IAP_NAMES, frame.iaps)}


def iap_origin_counts(headers: Sequence[InstanceHeader]) -> dict[str, dict[str, int]]:
    """IAP -> origin -> number of files whose header took that IAP from that vendor-private
    place (the IAPs every file gave through their standard elements are not listed)."""
    counts: dict[str, dict[str, int]] = {}
    for header in headers:
        for name, origin in header.iap_origins:
            by_origin = counts.setdefault(name, {})
            by_origin[origin] = by_origin.get(origin, 0) + 1
    return {name: dict(sorted(counts[name].items())) for name in sorted(counts)}


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _slice_normal(orientation) -> np.ndarray | None:
    try:
        values = [float(v) for v in orientation]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    normal = np.cross(values[:3], values[3:])
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def slice_position(ds: Dataset, frame: int = 0) -> float:
    """Projection of ImagePositionPatient on the slice normal (NaN if geometry is missing)."""
    orientation = find_element_value(ds, "ImageOrientationPatient", frame)
    position = find_element_value(ds, "ImagePositionPatient", frame)
    normal = None if orientation is MISSING else _slice_normal(orientation)
    if normal is None or position is MISSING:
        return math.nan
    try:
        point = np.array([float(v) for v in position])
    except (TypeError, ValueError):
        return math.nan
    along = float(point @ normal) if point.shape == (3,) else math.nan
    return along if math.isfinite(along) else math.nan  # an infinite coordinate is no geometry


def _rounded(value, decimals: int, count: int) -> tuple[float, ...] | None:
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(x) for x in numbers):
        return None
    return tuple(round(x, decimals) + 0.0 for x in numbers)  # + 0.0: no -0.0


def frame_identity(ds: Dataset, frame: int) -> tuple | None:
    """What makes one frame a plane of its acquisition, read the same way from a classic file
    and from an enhanced frame: ImagePositionPatient (to 0.01 mm) and ImageOrientationPatient
    (to 1e-4), the temporal position (TemporalPositionIdentifier, else the frame's
    TemporalPositionIndex; 1 where neither is given: both count from 1), the echo time
    (EchoTime, else the frame's EffectiveEchoTime, as the IAP reads it) and the diffusion
    b-value. Frames of one series with the same identity in a classic and an enhanced file are
    copies of one image (series.py). None where the geometry is missing or a value cannot be
    read: such a frame is never taken for a copy (and the file is not skipped for it)."""
    try:
        return _frame_identity(ds, frame)
    except Exception:  # a malformed value: no identity, no copy
        return None


def _frame_identity(ds: Dataset, frame: int) -> tuple | None:
    position = _rounded(find_element_value(ds, "ImagePositionPatient", frame), 2, 3)
    orientation = _rounded(find_element_value(ds, "ImageOrientationPatient", frame), 4, 6)
    if position is None or orientation is None:
        return None
    temporal = _int_or_none(find_element_value(ds, "TemporalPositionIdentifier", frame))
    if temporal is None:
        temporal = _int_or_none(find_element_value(ds, "TemporalPositionIndex", frame))
    if temporal is None:
        temporal = 1
    echo = extract_iaps(ds, frame, ("EchoTime",))["EchoTime"].value
    return position, orientation, temporal, echo, _joined(find_element_value(ds, "DiffusionBValue", frame))


def _has_b_value(ds: Dataset) -> bool:
    """Whether the header (top level, else the first frame) gives a DiffusionBValue."""
    try:
        return _joined(find_element_value(ds, "DiffusionBValue")) != ""
    except Exception:  # a malformed value still says it is a diffusion series
        return True


def _joined(value) -> str:
    """A header value as text, several values joined by a backslash ("" where absent)."""
    if value is MISSING or value is None:
        return ""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return str(value).strip()
    return "\\".join(str(v).strip() for v in value)


def _non_image_kind(sop_class: str) -> str | None:
    for prefix, kind in _NON_IMAGE_SOP_PREFIXES.items():
        if sop_class.startswith(prefix):
            return kind
    return None


def _sop_class_name(uid: str, fallback: str = "") -> str:
    """A SOP class as a user can look it up: its name (where pydicom knows it, else the
    fallback) and its UID."""
    name = pydicom.uid.UID(uid).name
    name = name if name and name != uid else fallback
    return f"{name} ({uid})" if name else uid


def _looks_like_dicom_without_preamble(start: bytes) -> bool:
    # A bare dataset starts with a group 0x0002 or 0x0008 tag, little endian.
    return start[:2] in (b"\x02\x00", b"\x08\x00")


def _in_memory(path: str) -> tuple[bytes | None, bool]:
    """(the bytes to read the file from, whether it was gzip-compressed): None for a local
    file that is read in place; a gzip-compressed file decompressed (gzip offers no random
    access) and an object in a bucket as downloaded, each held in memory whole."""
    if is_remote(path):
        data = epath.Path(path).read_bytes()
    else:
        with open(path, "rb") as f:
            if f.read(2) != _GZIP_MAGIC:
                return None, False
            f.seek(0)
            data = f.read()
    if data[:2] != _GZIP_MAGIC:
        return data, False
    try:
        return gzip.decompress(data), True
    except (EOFError, OSError, ValueError) as err:  # cut off or corrupt stream
        raise DicomError(path, "malformed", f"gzip-compressed file that does not decompress: "
                         f"{err}"[:200]) from None


def _with_inferred_syntax(ds: Dataset) -> Dataset:
    """A bare dataset (no file meta) gets the transfer syntax its encoding was read with, as
    pydicom's own reading inferred it, so that its pixels can be decoded."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return ds
    implicit, little = getattr(ds, "original_encoding", (True, True))
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                      pydicom.uid.ExplicitVRLittleEndian if little else
                                      pydicom.uid.ExplicitVRBigEndian)
    return ds


def _open(path: str, defer_size: int | None = 1024) -> tuple[Dataset, bytes | None]:
    """The dataset of one file, also when it lacks the 128-byte preamble and DICM prefix or
    is gzip-compressed; values larger than defer_size (pixels, private blobs) stay on disk
    until asked for. Also the file's decompressed bytes if it was compressed, else None."""
    try:
        if (os.path.getsize(path) if not is_remote(path) else epath.Path(path).stat().length) == 0:
            raise DicomError(path, "zero_byte")
        content, compressed = _in_memory(path)
        source = path if content is None else io.BytesIO(content)
        gzipped = "gzip-compressed, " if compressed else ""
        try:
            return pydicom.dcmread(source, defer_size=defer_size), content
        except InvalidDicomError:
            if content is None:
                with open(path, "rb") as f:
                    start = f.read(4)
            else:
                start = content[:4]
                source.seek(0)
            if not _looks_like_dicom_without_preamble(start):
                raise DicomError(path, "not_dicom", gzipped + "no DICM preamble") from None
            ds = pydicom.dcmread(source, defer_size=defer_size, force=True)
            return _with_inferred_syntax(ds), content
    except DicomError:
        raise
    except PermissionError as err:
        raise DicomError(path, "unreadable", err.strerror or "permission denied") from None
    except OSError as err:
        raise DicomError(path, "unreadable", err.strerror or str(err)) from None
    except Exception as err:  # pydicom raises many kinds on malformed files
        raise _malformed(path, err) from None


def _frame_count(path: str, ds: Dataset) -> int:
    """NumberOfFrames, 1 where it is absent, empty or 0 (as pydicom's decoders take it); any
    other value that is no positive whole number makes the file malformed (which frames
    there are cannot be known)."""
    raw = ds.get("NumberOfFrames")
    if raw is None or str(raw).strip() == "":
        return 1
    frames = _int_or_none(raw)
    if frames is None or frames < 0:
        raise DicomError(path, "malformed", f"NumberOfFrames {str(raw)[:32]!r}")
    return frames or 1


def _rescale(path: str, ds: Dataset, frame: int) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a frame (1 and 0 where absent or empty); one that
    is not a finite number makes the file malformed: its intensities cannot be known."""
    rescale = []
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = find_element_value(ds, keyword, frame)
        if raw is MISSING or raw is None or str(raw).strip() == "":
            rescale.append(default)
            continue
        try:
            rescale.append(one_number(raw))
        except ValueError as err:
            raise DicomError(path, "malformed", f"{keyword}: {err}") from None
    return rescale[0], rescale[1]


def _check_pixels(path: str, ds: Dataset, content: bytes | None) -> tuple[int, str]:
    """(number of frames, a note or ""); raises if the pixel data is absent, truncated or
    undecodable here. content: the decompressed bytes of a gzip-compressed file."""
    if _PIXEL_TAG not in ds._dict:
        # pydicom drops an element cut off by the end of the file: look for its tag.
        if content is None:
            with open(path, "rb") as f:
                content = f.read()
        cut_off = any(tag in content for tag in _PIXEL_TAG_BYTES)
        raise DicomError(path, "truncated" if cut_off else "no_pixel_data",
                         "pixel data cut off by the end of the file" if cut_off else "")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise DicomError(path, "malformed", "Rows/Columns/BitsAllocated missing") from None
    if rows <= 0 or columns <= 0:
        raise DicomError(path, "malformed", f"image size {rows}x{columns}")
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or (
            photometric and photometric not in _INTENSITY_PHOTOMETRICS):
        # Only MONOCHROME1/2 pixels are intensities (a palette index or a colour is not).
        raise DicomError(path, "not_monochrome", photometric)
    frames = _frame_count(path, ds)
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or
                 "1.2.840.10008.1.2")
    element = ds._dict[_PIXEL_TAG]
    length = getattr(element, "length", None)
    value_tell = getattr(element, "value_tell", None)
    if length == 0:  # written by some scanners for images without pixels: not cut off
        raise DicomError(path, "no_pixel_data", "empty PixelData element")
    if length is not None and length != _UNDEFINED_LENGTH and value_tell is not None:
        # In a deflated file the offset counts the inflated stream, not the file's bytes.
        size = os.path.getsize(path) if content is None else len(content)
        if syntax != _DEFLATED and value_tell + length > size:
            raise DicomError(path, "truncated", "pixel data runs past the end of the file")
        expected = rows * columns * frames * bits // 8
        if syntax in _NATIVE_SYNTAXES and length < expected:
            raise DicomError(path, "truncated", f"{length} bytes of pixel data, expected {expected}")
        frame_bytes = rows * columns * bits // 8
        if syntax in _NATIVE_SYNTAXES and syntax != _DEFLATED and length - expected >= frame_bytes:
            return frames, (f"pixel data holds {length // frame_bytes} frames, NumberOfFrames "
                            f"says {frames}: the first {frames} are used")
    if syntax not in _NATIVE_SYNTAXES:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise DicomError(path, "undecodable", f"no decoder for transfer syntax {syntax}") from None
        if not decoder.is_available:
            raise DicomError(path, "undecodable", f"no decoder plugin installed for {syntax}")
    return frames, ""


def _mosaic(path: str, ds: Dataset) -> Mosaic | None:
    """How a Siemens MOSAIC splits into slices, None for any other image; one whose slices
    cannot be told apart is skipped: a whole mosaic never goes on as one image."""
    try:
        return mosaic_layout(ds)
    except MosaicError as err:
        raise DicomError(path, "mosaic", str(err)) from None


def read_instance_header(path: str) -> InstanceHeader:
    """The header of one DICOM file, checked for usable pixels; raises DicomError."""
    ds, content = _open(path)
    try:
        sop_class = str(ds.get("SOPClassUID", "") or getattr(
            getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
        kind = _non_image_kind(sop_class)
        if kind:  # named by its SOP class, which a user can look up (a prefix covers many)
            raise DicomError(path, "non_image", _sop_class_name(sop_class, kind))
        modality = _text(ds, "Modality").upper()
        if modality and modality not in ACCEPTED_MODALITIES:
            raise DicomError(path, "not_mr", f"Modality {modality}")
        if sop_class.startswith(_IMAGE_STORAGE) and sop_class not in _MR_STORAGE:
            raise DicomError(path, "not_mr", f"SOP class {_sop_class_name(sop_class)}")
        frames, note = _check_pixels(path, ds, content)
        series_uid = _text(ds, "SeriesInstanceUID")
        if not series_uid:
            raise DicomError(path, "malformed", "no SeriesInstanceUID")
        for frame in range(frames):  # found here, the file is skipped before it is planned
            _rescale(path, ds, frame)
        mosaic = _mosaic(path, ds)
        frame_headers, origins = [], {}
        for frame in range(frames if mosaic is None else 1):
            values = extract_iaps(ds, frame)
            iaps = tuple((int(v.state), v.value, v.number) for v in values.values())
            origins.update(((name, v.origin), None) for name, v in values.items() if v.origin)
            if mosaic is None:
                frame_headers.append(FrameHeader(frame, slice_position(ds, frame), iaps,
                                                 frame_identity(ds, frame)))
            else:  # each tile a frame of its own, at its position along the slice normal
                frame_headers += [FrameHeader(tile, position, iaps)
                                  for tile, position in enumerate(mosaic.positions)]
        return InstanceHeader(
            path=path,
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            series_uid=series_uid,
            study_uid=_text(ds, "StudyInstanceUID"),
            patient_id=_text(ds, "PatientID"),
            patient_name=_text(ds, "PatientName"),
            patient_birth_date=_text(ds, "PatientBirthDate"),
            series_description=_text(ds, "SeriesDescription"),
            temporal_position=_int_or_none(find_element_value(ds, "TemporalPositionIdentifier")),
            instance_number=_int_or_none(ds.get("InstanceNumber")),
            rows=mosaic.tile_rows if mosaic else int(ds.Rows),
            columns=mosaic.tile_columns if mosaic else int(ds.Columns),
            frames=tuple(frame_headers),
            note=note,
            iap_origins=tuple(origins),
            enhanced=sop_class in _ENHANCED_MR_STORAGE or "PerFrameFunctionalGroupsSequence" in ds,
            protocol_name=_text(ds, "ProtocolName"),
            image_type=_joined(ds.get("ImageType")),
            diffusion=_has_b_value(ds),
        )
    except DicomError:
        raise
    except Exception as err:  # a malformed value deep in the header
        raise _malformed(path, err) from None


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom logs a failed decode with its traceback at ERROR level; the DicomError that
    follows says it in one line (and the skip report keeps it), so keep that out of the console."""
    logger = logging.getLogger("pydicom")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


class _StoredFrames:
    """The stored pixels of one opened file, a frame at a time, all from the one parsed
    header: a frame's bytes are read from the pixel data's place in the file (or in the
    decompressed bytes of a gzip-compressed file) and decoded alone, so reading many frames
    neither parses the file again nor holds more than one frame's pixels."""

    def __init__(self, path: str, ds: Dataset, content: bytes | None):
        self.path, self.ds, self.content = path, ds, content
        self._file = None
        self._options: dict | None = None
        self._last: tuple[int, np.ndarray] | None = None  # the tiles of a mosaic share its frame
        self._mosaic: tuple = ()
        element = ds._dict.get(_PIXEL_TAG)
        syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        self._value_tell = getattr(element, "value_tell", None)
        self._vr = getattr(element, "VR", None)
        # A deflated file's offsets count the inflated stream: its dataset holds the pixels.
        self._from_dataset = syntax == _DEFLATED or self._value_tell is None

    @property
    def mosaic(self) -> Mosaic | None:
        """The file's Siemens MOSAIC layout (None if it is no mosaic), worked out once."""
        if not self._mosaic:
            self._mosaic = (_mosaic(self.path, self.ds),)
        return self._mosaic[0]

    def stored(self, frame: int) -> np.ndarray:
        if self._last is not None and self._last[0] == frame:
            return self._last[1]
        if self._from_dataset:
            stored = pixel_array(self.ds, index=frame)
        else:
            if self._file is None:
                self._file = open(self.path, "rb") if self.content is None else io.BytesIO(self.content)
                self._options = self._decoding_options()
            self._file.seek(self._value_tell)
            stored, _ = get_decoder(self._options["transfer_syntax_uid"]).as_array(
                self._file, index=frame, validate=True, **self._options)
        self._last = (frame, stored)
        return stored

    def _decoding_options(self) -> dict:
        syntax = pydicom.uid.UID(str(self.ds.file_meta.TransferSyntaxUID))
        options = as_pixel_options(self.ds, transfer_syntax_uid=syntax, pixel_keyword="PixelData")
        if not syntax.is_implicit_VR and self._vr in ("OB", "OW"):
            options["pixel_vr"] = self._vr
        return options

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def iter_frames(path: str, frames: Sequence[int]) -> Iterator[np.ndarray | DicomError]:
    """The given frames of one file as float32 intensities [rows, columns], in the order
    asked, from one reading of the file; a frame that cannot be read comes as its
    DicomError (one for every frame when the file cannot be opened) and the others follow."""
    try:
        ds, content = _open(path)  # the same opener as the header stage
    except DicomError as err:
        for _ in frames:
            yield err
        return
    pixels = _StoredFrames(path, ds, content)
    try:
        for frame in frames:
            with _quiet_pydicom():
                try:
                    result = _decode_frame(path, ds, frame, pixels)
                except DicomError as err:
                    result = err
                except Exception as err:  # a value the header stage did not need (or a changed file)
                    result = _malformed(path, err)
            yield result
    finally:
        pixels.close()


def read_frame(path: str, frame: int = 0) -> np.ndarray:
    """One frame as float32 intensities [rows, columns]; raises DicomError."""
    return _raised(next(iter_frames(path, [frame])))


def _raised(result):
    if isinstance(result, DicomError):
        raise result
    return result


def _decode_frame(path: str, ds: Dataset, frame: int, source: _StoredFrames | None = None) -> np.ndarray:
    """One frame of an opened file; source: the file's stored frames (one per file, so that
    its frames share one open file and one set of decoding options)."""
    _frame_count(path, ds)
    source = source or _StoredFrames(path, ds, None)
    mosaic = source.mosaic
    try:
        stored = source.stored(0 if mosaic else frame)
    except Exception as err:  # decoders raise many kinds on corrupt streams
        raise DicomError(path, "undecodable", f"{type(err).__name__}: {err}"[:200]) from None
    if mosaic is not None:  # frame: a tile of the mosaic's one frame
        stored = cut_tile(stored[0] if stored.ndim == 3 else stored, mosaic, frame)
    if stored.ndim == 3 and stored.shape[1:] == (int(ds.Rows), int(ds.Columns)):
        # More frames of pixels than NumberOfFrames says (reported by the header stage).
        stored = stored[frame]
    if stored.ndim != 2:
        raise DicomError(path, "not_monochrome", f"pixel array of shape {stored.shape}")
    slope, intercept = _rescale(path, ds, frame)
    pixels = stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        low = -(2 ** (bits - 1)) if int(ds.get("PixelRepresentation", 0)) else 0
        high = low + 2 ** bits - 1
        pixels = np.float32(slope * (low + high) + 2 * intercept) - pixels
    if not np.all(np.isfinite(pixels)):
        raise DicomError(path, "undecodable", "non-finite intensities")
    return pixels


def iter_prepared_frames(path: str, frames: Sequence[int], image_size: int,
                         resize_mode: str) -> Iterator[PreparedSlice | DicomError]:
    """The given frames of one file as stored model-ready images (preprocess.preprocess_slice),
    from one reading of the file: what the prep stage writes and what the predictor makes
    from the same file. A frame that cannot be used comes as its DicomError, in its place."""
    for pixels in iter_frames(path, frames):
        if isinstance(pixels, DicomError):
            yield pixels
            continue
        try:
            yield preprocess_slice(pixels, image_size, resize_mode)
        except ValueError as err:
            yield DicomError(path, "undecodable", str(err))


def read_prepared_frames(path: str, frames: Sequence[int], image_size: int,
                         resize_mode: str) -> list[PreparedSlice | DicomError]:
    """iter_prepared_frames as a list (prepared slices are small: uint16 at the stored size)."""
    return list(iter_prepared_frames(path, frames, image_size, resize_mode))


def read_prepared_frame(path: str, frame: int, image_size: int, resize_mode: str) -> PreparedSlice:
    """One frame as the stored model-ready image; raises DicomError."""
    return _raised(next(iter_prepared_frames(path, [frame], image_size, resize_mode)))


# A file's frames read by one worker from one parse: with several workers a file of more
# frames than this may be split into a group per worker (each parses the file once).
FRAMES_PER_READ = 32


def group_by_file(paths: Sequence[str], workers: int = 1,
                  min_frames: int = FRAMES_PER_READ) -> list[list[int]]:
    """The positions in `paths` (a path per frame to read) grouped by file, files in the order
    they first appear: a group is read from one parse of its file (iter_frames). With several
    workers a file of many frames is split into at most `workers` groups of at least
    min_frames, so that a large file is not left to one worker."""
    by_file: dict[str, list[int]] = {}
    for position, path in enumerate(paths):
        by_file.setdefault(path, []).append(position)
    groups = []
    for positions in by_file.values():
        size = max(min_frames, math.ceil(len(positions) / max(1, workers)))
        groups.extend(positions[i:i + size] for i in range(0, len(positions), size))
    return groups


def order_frames(headers: Sequence[InstanceHeader]) -> list[tuple[InstanceHeader, FrameHeader]]:
    """Every frame of a series, ordered along the slice normal (then InstanceNumber, path)."""
    frames = [(h, f) for h in headers for f in h.frames]
    have_geometry = all(math.isfinite(f.position) for _, f in frames)

    def key(item):
        header, frame = item
        position = frame.position if have_geometry else 0.0
        number = header.instance_number if header.instance_number is not None else 0
        return (position, number, header.path, frame.frame)

    return sorted(frames, key=key)


def read_series(paths: Sequence[str]) -> list[tuple[np.ndarray, dict[str, IapValue]]]:
    """All slices of one series (files given in any order): pixels and IAPs, ordered along
    the slice normal. Raises DicomError on the first unusable file."""
    ordered = order_frames([read_instance_header(p) for p in paths])
    return [(read_frame(h.path, f.frame), iap_values(f)) for h, f in ordered]
