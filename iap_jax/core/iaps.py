"""The IAP schema: one declarative table of the image acquisition parameters.

Every stage (synthetic cohort, prep, label encoding, prediction) reads IAPs through
this table, so one real header value has exactly one canonical spelling everywhere.

A header value ends in one of four states, kept apart because they mean different
things: the tag is ABSENT, present but EMPTY, PRESENT with a usable value, or INVALID
(present but unparseable or physically impossible, e.g. TR <= 0). The Duke contrast
agent classes need ABSENT and EMPTY as classes of their own ("tag absent", "agent name
not stated"); every other IAP treats anything but PRESENT as a masked label.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Callable, Mapping, Sequence

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from iap_jax.core.siemens_csa import mosaic_tiles_per_row


class LabelState(enum.IntEnum):
    ABSENT = 0
    EMPTY = 1
    PRESENT = 2
    INVALID = 3


class Kind(str, enum.Enum):
    CATEGORICAL = "categorical"
    CONTINUOUS = "continuous"


@dataclasses.dataclass(frozen=True)
class IapValue:
    """One IAP read from one header: its state, canonical spelling and number."""

    state: LabelState
    value: str = ""
    number: float = math.nan
    raw: str = ""
    origin: str = ""  # where a vendor-private fallback supplied it; "" for the standard element

    @property
    def present(self) -> bool:
        return self.state == LabelState.PRESENT


class _Missing:
    """Marker for a tag that is not in the header at all."""


MISSING = _Missing()


def format_number(x: float, decimals: int) -> str:
    """Canonical decimal spelling: rounded, no trailing zeros, no exponent."""
    text = f"{round(float(x), decimals):.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# --- readers: Dataset -> raw value (or MISSING) -------------------------------------

_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


def find_element_value(ds: Dataset, keyword: str, frame: int = 0, private: bool = True) -> Any:
    """A keyword's value from the top level, else from the Enhanced MR functional groups
    (shared first, then the given frame's), else MISSING. The standard macros of the groups
    are searched before any private sequence (Philips keeps its own per-frame copies of
    standard elements in (2005,140F), whose values may differ); private=False searches the
    standard ones only."""
    if keyword in ds:
        return ds[keyword].value
    for standard in (True, False) if private else (True,):
        for group_keyword in _FUNCTIONAL_GROUPS:
            if group_keyword not in ds or not ds[group_keyword].value:
                continue
            items = ds[group_keyword].value
            item = items[0] if group_keyword.startswith("Shared") else items[min(frame, len(items) - 1)]
            for macro in item:
                if macro.VR != "SQ" or not macro.value or macro.tag.is_private == standard:
                    continue
                if keyword in macro.value[0]:
                    return macro.value[0][keyword].value
    return MISSING


def _find_first(ds: Dataset, keywords, frame: int) -> Any:
    """The first keyword found in the standard places, else the first in private ones."""
    for private in (False, True):
        for keyword in keywords:
            value = find_element_value(ds, keyword, frame, private=private)
            if value is not MISSING:
                return value
    return MISSING


def _keyword_reader(*keywords: str) -> Callable[[Dataset, int], Any]:
    def read(ds: Dataset, frame: int) -> Any:
        return _find_first(ds, keywords, frame)

    return read


def _read_acquisition_matrix(ds: Dataset, frame: int) -> Any:
    for private in (False, True):  # standard macros win over private copies
        value = find_element_value(ds, "AcquisitionMatrix", frame, private=private)
        if value is not MISSING:
            return value
        freq = find_element_value(ds, "MRAcquisitionFrequencyEncodingSteps", frame, private=private)
        phase = find_element_value(ds, "MRAcquisitionPhaseEncodingStepsInPlane", frame, private=private)
        if freq is not MISSING and phase is not MISSING:
            return [freq, 0, 0, phase]
    return MISSING


def _read_fov(ds: Dataset, frame: int) -> Any:
    diameter = find_element_value(ds, "ReconstructionDiameter", frame)
    if diameter is not MISSING and not _is_empty(diameter):
        return diameter
    spacing = find_element_value(ds, "PixelSpacing", frame)
    columns = find_element_value(ds, "Columns", frame)
    if spacing is MISSING or columns is MISSING:
        return diameter
    if _is_empty(spacing) or _is_empty(columns):
        return ""
    try:
        # A MOSAIC's columns span every tile of a row: the FOV is one tile's.
        tiles = mosaic_tiles_per_row(ds)
        return float(spacing[1]) * (int(columns) // tiles if tiles else float(columns))
    except (TypeError, ValueError, IndexError):
        return f"{spacing!r}x{columns!r}"


# --- canonicalisers: raw value -> (canonical str, number) or ValueError -------------

def _is_empty(raw: Any) -> bool:
    if raw is None:
        return True
    if isinstance(raw, (str, bytes)):
        return not raw.strip()
    if isinstance(raw, (list, tuple, MultiValue)):
        return all(_is_empty(v) for v in raw)
    return False


def _canonical_text(raw: Any) -> tuple[str, float]:
    if isinstance(raw, (list, tuple, MultiValue)):
        raise ValueError("expected one value, got several")
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    return " ".join(str(raw).split()).upper(), math.nan


def _canonical_options(raw: Any) -> tuple[str, float]:
    values = list(raw) if isinstance(raw, (list, tuple, MultiValue)) else str(raw).split("\\")
    tokens = [" ".join(str(v).split()).upper() for v in values]
    return "\\".join(t for t in tokens if t), math.nan


def one_number(raw: Any) -> float:
    """A header value as one finite number; ValueError for text, NaN, infinity or a count of
    values other than one (the IAPs and the pixel rescale read numbers through this)."""
    if isinstance(raw, (list, tuple, MultiValue)):
        if len(raw) != 1:
            raise ValueError(f"expected one number, got {len(raw)}")
        raw = raw[0]
    try:
        number = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"not a number: {str(raw)[:32]!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"not a finite number: {str(raw)[:32]!r}")
    return number


def _number_canonicaliser(decimals: int, valid: Callable[[float], bool]):
    def canonical(raw: Any) -> tuple[str, float]:
        number = one_number(raw)
        if not valid(number):
            raise ValueError(f"impossible value {number!r}")
        number = round(number, decimals)
        return format_number(number, decimals), number

    return canonical


def _canonical_matrix(raw: Any) -> tuple[str, float]:
    values = [int(v) for v in raw]
    if len(values) != 4:
        raise ValueError(f"expected 4 numbers, got {len(values)}")
    freq = values[0] or values[1]
    phase = values[2] or values[3]
    if freq <= 0 or phase <= 0:
        raise ValueError(f"no frequency/phase size in {values}")
    return f"{freq}x{phase}", math.nan


# --- the table ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IapSpec:
    """How one IAP is found in a header and spelled canonically."""

    name: str
    source: str
    kind: Kind
    read: Callable[[Dataset, int], Any]
    canonicalise: Callable[[Any], tuple[str, float]]
    numeric: bool = False
    unit: str = ""
    # ABSENT and EMPTY are classes of their own (Duke's contrast agent labels).
    missing_is_class: bool = False

    def extract(self, ds: Dataset, frame: int = 0) -> IapValue:
        """The standard element(s) first; only where they are absent, the vendor-private
        fallbacks of PRIVATE_FALLBACKS in order (the value then names its origin)."""
        origin = ""
        try:
            raw = self.read(ds, frame)
            if raw is MISSING:
                raw, origin = read_private_fallback(ds, self.name, frame)
        except (TypeError, ValueError, OverflowError) as err:  # undecodable value in the header
            return IapValue(LabelState.INVALID, raw=str(err)[:64], origin=origin)
        if raw is MISSING:
            return IapValue(LabelState.ABSENT)
        if _is_empty(raw):
            return IapValue(LabelState.EMPTY, origin=origin)
        try:
            value, number = self.canonicalise(raw)
        except (TypeError, ValueError, OverflowError):
            return IapValue(LabelState.INVALID, raw=str(raw)[:64], origin=origin)
        if not value:
            return IapValue(LabelState.EMPTY, origin=origin)
        return IapValue(LabelState.PRESENT, value=value, number=number, raw=str(raw)[:64],
                        origin=origin)


def _text(name: str, **kw) -> IapSpec:
    return IapSpec(name, name, Kind.CATEGORICAL, _keyword_reader(name), _canonical_text, **kw)


def _number(name: str, kind: Kind, decimals: int, unit: str, valid, source=None, read=None) -> IapSpec:
    return IapSpec(name, source or name, kind, read or _keyword_reader(name),
                   _number_canonicaliser(decimals, valid), numeric=True, unit=unit)


IAPS: tuple[IapSpec, ...] = (
    _text("Manufacturer"),
    _text("ManufacturerModelName"),
    IapSpec("ScanOptions", "ScanOptions (multi-valued, joined by '\\')", Kind.CATEGORICAL,
            _keyword_reader("ScanOptions"), _canonical_options),
    _text("PatientPosition"),
    _number("MagneticFieldStrength", Kind.CATEGORICAL, 4, "T", lambda x: 0 < x <= 20),
    _text("ContrastBolusAgent", missing_is_class=True),
    IapSpec("AcquisitionMatrix",
            "AcquisitionMatrix as FREQxPHASE (Enhanced MR: MRFOVGeometry steps)",
            Kind.CATEGORICAL, _read_acquisition_matrix, _canonical_matrix),
    _number("SliceThickness", Kind.CATEGORICAL, 2, "mm", lambda x: 0 < x <= 50),
    _number("FlipAngle", Kind.CATEGORICAL, 2, "deg", lambda x: 0 < x <= 180),
    _number("FOV", Kind.CATEGORICAL, 1, "mm", lambda x: 0 < x <= 1000,
            source="ReconstructionDiameter, else PixelSpacing[1] x Columns", read=_read_fov),
    _number("EchoTime", Kind.CONTINUOUS, 3, "ms", lambda x: 0 < x <= 1000,
            read=_keyword_reader("EchoTime", "EffectiveEchoTime")),
    _number("RepetitionTime", Kind.CONTINUOUS, 3, "ms", lambda x: 0 < x <= 100000),
)

IAP_NAMES: tuple[str, ...] = tuple(spec.name for spec in IAPS)

# One scanner, several spellings across software versions: canonical value -> the class it
# joins when a run asks for aliases (config.labels.aliases; off by default). The records keep
# the header's own value; the label encoding applies this table and travels with the checkpoint.
ALIASES: Mapping[str, Mapping[str, str]] = {
    "Manufacturer": {
        "SIEMENS HEALTHINEERS": "SIEMENS",
        "SIEMENS HEALTHCARE GMBH": "SIEMENS",
        "GE HEALTHCARE": "GE MEDICAL SYSTEMS",
        "GE HEALTHCARE JAPAN CORPORATION": "GE MEDICAL SYSTEMS",
        "PHILIPS HEALTHCARE": "PHILIPS MEDICAL SYSTEMS",
        "PHILIPS": "PHILIPS MEDICAL SYSTEMS",
    },
    "ManufacturerModelName": {
        "MAGNETOM PRISMA FIT": "PRISMA_FIT",
        "MAGNETOM PRISMA": "PRISMA",
        "MAGNETOM SKYRA": "SKYRA",
        "MAGNETOM AVANTO": "AVANTO",
        "MAGNETOM TRIO": "TRIO",
        "MAGNETOM TRIO, A TIM SYSTEM": "TRIOTIM",
        "MAGNETOM VIDA": "VIDA",
    },
}


@dataclasses.dataclass(frozen=True)
class PrivateFallback:
    """Where a vendor keeps an IAP in its private elements instead of the standard one.

    A private element is named by its private creator, its (odd) group and its offset, the
    low byte of the element number: the block it sits in (the element's high byte) is
    wherever the file reserved that creator, so it is found through the creator, never by
    a bare tag number. `within` is the path of enclosing sequences, outermost first (the
    first item of each, the given frame's of PerFrameFunctionalGroupsSequence): a standard
    one by keyword, a private one as (group, creator, offset)."""

    creator: str
    group: int
    offset: int
    within: tuple[str | tuple[int, str, int], ...] = ()

    @property
    def origin(self) -> str:
        """A short description of the place, recorded with every value read from it."""
        def private(group: int, creator: str, offset: int) -> str:
            return f"{creator} ({group:04X},xx{offset:02X})"

        path = [step if isinstance(step, str) else private(*step) for step in self.within]
        where = private(self.group, self.creator, self.offset)
        return where + (" in " + " > ".join(path) if path else "")

    def read(self, ds: Dataset, frame: int = 0) -> Any:
        """The element's value, or MISSING where the creator, a sequence or the element is not there."""
        try:
            for step in self.within:
                if isinstance(step, str):
                    element = ds[step] if step in ds else None
                else:
                    element = _private_element(ds, *step)
                items = _sequence_items(element)
                if not items:
                    return MISSING
                ds = items[min(frame, len(items) - 1)] if step == _FUNCTIONAL_GROUPS[1] else items[0]
            element = _private_element(ds, self.group, self.creator, self.offset)
        except Exception:  # pydicom raises many kinds on a malformed private part: no value
            return MISSING
        if element is None:
            return MISSING
        value = element.value
        if isinstance(value, bytes):  # VR UN (an implicit VR file): the text as written
            value = value.decode("latin-1").rstrip("\0 ")
        return value


_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian


def _sequence_items(element) -> Any:
    """The items of a sequence element, None for any other. A private sequence read from an
    implicit VR file has no VR there and arrives as UN bytes: those are decoded as the
    standard says UN is encoded (implicit VR little endian)."""
    if element is None:
        return None
    if element.VR == "SQ":
        return element.value
    if element.VR == "UN" and isinstance(element.value, bytes) and element.value.startswith(_ITEM_TAG):
        from pydicom.values import convert_SQ

        return convert_SQ(element.value, True, True)
    return None


def _private_element(ds: Dataset, group: int, creator: str, offset: int):
    """The element at `offset` in the block `creator` reserved in `group`, else None."""
    try:
        block = ds.private_block(group, creator)
    except KeyError:  # the creator is not in this dataset
        return None
    return block[offset] if offset in block else None


_SIEMENS_SDS = "SIEMENS MR SDS 01"  # Siemens XA series-level shadow attributes

# Vendor-private places of an IAP, read in order only where the standard element is absent
# (never in place of a standard value, however empty or invalid). Siemens XA (syngo MR XA10
# and later) writes no ScanOptions (0018,0022) in Enhanced MR files; its scan options sit in
# the series shadow attributes, element xx5C of creator SIEMENS MR SDS 01 in group 0021,
# which Enhanced MR files keep in the private sequence xxFE of that creator inside the
# shared functional groups, and interoperability (classic) files at the top level. The
# other IAPs keep standard places in XA Enhanced MR files (Manufacturer, the model,
# MagneticFieldStrength and PatientPosition at the top level; FlipAngle, RepetitionTime,
# EffectiveEchoTime, the MRFOVGeometry steps, SliceThickness and PixelSpacing in the
# functional groups), so they have no fallback.
PRIVATE_FALLBACKS: Mapping[str, tuple[PrivateFallback, ...]] = {
    "ScanOptions": (
        PrivateFallback(_SIEMENS_SDS, 0x0021, 0x5C,
                        within=(_FUNCTIONAL_GROUPS[0], (0x0021, _SIEMENS_SDS, 0xFE))),
        PrivateFallback(_SIEMENS_SDS, 0x0021, 0x5C),
    ),
}


def read_private_fallback(ds: Dataset, name: str, frame: int = 0) -> tuple[Any, str]:
    """(value, origin) from the first of the IAP's private fallbacks that holds the
    element, else (MISSING, "")."""
    for fallback in PRIVATE_FALLBACKS.get(name, ()):
        value = fallback.read(ds, frame)
        if value is not MISSING:
            return value, fallback.origin
    return MISSING, ""


SPECS: Mapping[str, IapSpec] = {spec.name: spec for spec in IAPS}


def extract_iaps(ds: Dataset, frame: int = 0, names: Sequence[str] = IAP_NAMES) -> dict[str, IapValue]:
    """Every IAP of one header (a pydicom Dataset, pixels not needed)."""
    return {name: SPECS[name].extract(ds, frame) for name in names}


def read_iaps(path: str, frame: int = 0) -> dict[str, IapValue]:
    """IAPs of one DICOM file, read without its pixel data."""
    return extract_iaps(pydicom.dcmread(path, stop_before_pixels=True), frame)
