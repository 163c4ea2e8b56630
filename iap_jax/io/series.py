"""An archive -> series: discovery (any folder layout -> series of ordered slices, plus every
skipped file) and selection (which series and slices are used). Shared by the prep stage and
the predictor on DICOM folders.

Discovery: headers are read without pixels, in parallel. Instances are grouped by SeriesInstanceUID
(and TemporalPositionIdentifier, for vendors that keep all DCE phases in one series), never
by folder; slices are ordered along the slice normal. Files that cannot be used are
skipped with a reason: unreadable, not DICOM, non-image objects, malformed values,
duplicate SOPInstanceUIDs, copies of frames held by another representation of the series
(a classic and an enhanced multi-frame copy of one acquisition; see _drop_copied_frames),
sizes that differ from the rest of their series.

A series without PatientID is given to the patient named by (PatientName,
PatientBirthDate), else to its study, so that one patient's studies stay together where
the headers allow it; such series are counted in the report.

The archive fingerprint (a hash of every file's relative path, size and mtime) tells a
rerun whether the archive changed since a dataset was written.

Selection, by default (the paper's choice on Duke-Breast-Cancer-MRI): the fat-saturated DCE series, of
which `phases="pre"` keeps the pre-contrast one and `phases="all"` keeps every phase.
A DCE series is recognised by its SeriesDescription (Siemens `ax dyn pre`,
`ax dyn 1st pass`; GE `ax 3d dyn`, `ax 3d dyn MP`, `Ax Vibrant MultiPhase`, `ax dynamic`,
each post-contrast phase prefixed `PhN/`); the non-fat-sat T1 (`ax t1`,
`Ax 3D T1 NON FS`) is not one. A custom `series_filter` regex (searched, case-insensitive,
in SeriesDescription) replaces that pattern; the phase rule still applies, and a series
with no phase information counts as phase 0.

Phase: "PhN/" prefix or "Nth pass" -> N; "pre" -> 0; else TemporalPositionIdentifier - 1
(it counts from 1), except in a time series; else 0.

Time series: a series recognised as fMRI, diffusion or ASL (by a word of its
SeriesDescription, ProtocolName or ImageType such as `ep2d_bold`, `fmri`, `dti`, `dwi`,
`diff`, `pcasl`, or `perfusion` without a contrast agent; or a DiffusionBValue in its header)
and not as DCE (the DCE pattern, or `dce`) has time points, not contrast phases: its
TemporalPositionIdentifier gives no phase, and only its first time point (1, or none) is
selected, whatever `phases` says, since the later ones repeat the same slices; they are left
out as "later time point of a time series (fMRI, diffusion, ASL/perfusion)". Any other series
with temporal positions (DCE by name or not) follows the phase rule, as the DCE series of
vendors that number their phases only by TemporalPositionIdentifier need. A contrast agent in
the header does not by itself make a series DCE (the tag names the study's agent, also on
series acquired before the injection); it only tells a contrast perfusion series (DCE, DSC:
phase rule) from an ASL one named "perfusion".
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
from typing import Callable, Iterable, Sequence

from etils import epath

from iap_jax.core.iaps import IAP_NAMES, LabelState
from iap_jax.core.progress import Progress
from iap_jax.core.workers import worker_pool
from iap_jax.io.dicom import DicomError, InstanceHeader, iap_origin_counts, order_frames, read_instance_header
from iap_jax.io.salt import salted_hash
from iap_jax.io.storage import files_under, is_remote, relative


@dataclasses.dataclass(frozen=True)
class Skip:
    path: str  # relative to the DICOM root; outputs name the file by its key instead
    reason: str
    detail: str = ""
    same_as: str = ""  # the file (relative path) this one duplicates, named by key in outputs

    def keyed(self, key_of: Callable[[str], str]) -> tuple[str, str, str]:
        """(file key, reason, detail) as outputs give it: files named by their keys only."""
        detail = f"{self.detail} (file {key_of(self.same_as)})" if self.same_as else self.detail
        return key_of(self.path), self.reason, detail


@dataclasses.dataclass(frozen=True)
class SliceRef:
    path: str  # absolute, for reading pixels
    frame: int
    iaps: tuple[tuple[int, str, float], ...]


@dataclasses.dataclass(frozen=True)
class Series:
    series_uid: str
    temporal_position: int | None
    patient_id: str  # the patient key (see patient_key); never written out raw
    description: str
    rows: int
    columns: int
    slices: tuple[SliceRef, ...]  # ordered along the slice normal
    files: tuple[str, ...]  # relative paths of the files used
    patient_key_source: str = "patient_id"  # or one of PATIENT_KEY_FALLBACKS
    time_series: bool = False  # fMRI, diffusion, ASL/perfusion: see is_time_series

    @property
    def key(self) -> str:
        """Identifies the series (and phase) before hashing."""
        phase = "" if self.temporal_position is None else f"#{self.temporal_position}"
        return self.series_uid + phase


@dataclasses.dataclass
class Discovery:
    series: list[Series]
    skips: list[Skip]
    num_files: int
    fingerprint: str  # of the archive's file list, sizes and mtimes
    notes: dict[str, str] = dataclasses.field(default_factory=dict)  # relative path -> note
    # IAP -> vendor-private origin -> files whose value came from there (dicom.iap_origin_counts)
    iap_origins: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)


_AGENT = IAP_NAMES.index("ContrastBolusAgent")
PATIENT_KEY_FALLBACKS = ("name_birth_date", "study_uid", "series_uid")


def patient_key(header: InstanceHeader) -> tuple[str, str]:
    """(key, source): PatientID, else a hash of (PatientName, PatientBirthDate) when both
    are present, else the study, else the series."""
    if header.patient_id:
        return header.patient_id, "patient_id"
    if header.patient_name and header.patient_birth_date:
        text = f"{header.patient_name}\0{header.patient_birth_date}"
        return "name+birth:" + hashlib.sha256(text.encode()).hexdigest(), "name_birth_date"
    if header.study_uid:
        return f"study:{header.study_uid}", "study_uid"
    return f"series:{header.series_uid}", "series_uid"


def archive_fingerprint(root: str, relative_paths: Sequence[str]) -> str:
    """Hash of the sorted relative paths with their sizes and modification times."""
    digest = hashlib.sha256()
    for relative in sorted(relative_paths):
        path = os.path.join(root, relative)
        try:
            if is_remote(path):
                stat = epath.Path(path).stat()
                entry = f"{relative}\0{stat.length}\0{stat.mtime}\n"
            else:
                stat = os.stat(path)
                entry = f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        except OSError:  # vanished or unreadable: still part of the listing
            entry = f"{relative}\0?\n"
        digest.update(entry.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def list_files(root: str) -> list[str]:
    """Every file under root (a local folder or a bucket's prefix), sorted, relative to root
    (storage.files_under: linked directories followed once each)."""
    if not epath.Path(root).is_dir():
        raise FileNotFoundError(f"{root}: DICOM root is not a directory")
    return files_under(root)


def _read_one(path: str) -> InstanceHeader | DicomError:
    try:
        return read_instance_header(path)
    except DicomError as err:
        return err


def read_headers(root: str, relative_paths: Sequence[str], workers: int = 1,
                 progress: Progress | None = None) -> tuple[list[InstanceHeader], list[Skip]]:
    """Headers of every file (in parallel when workers > 1) and the files that failed."""
    paths = [os.path.join(root, p) for p in relative_paths]
    headers, skips = [], []

    def consume(results: Iterable[InstanceHeader | DicomError]):
        for relative, result in zip(relative_paths, results):
            if isinstance(result, DicomError):
                skips.append(Skip(relative, result.reason, result.detail))
            else:
                headers.append(result)
            if progress:
                progress.advance()

    if workers > 1 and len(paths) > 1:
        chunk = max(1, min(64, len(paths) // (workers * 8)))
        with worker_pool(workers) as pool:
            consume(pool.imap(_read_one, paths, chunksize=chunk))
    else:
        consume(map(_read_one, paths))
    return headers, skips


def _relative(root: str, path: str) -> str:
    return relative(path, root)


def _drop_duplicates(root: str, headers: list[InstanceHeader]) -> tuple[list[InstanceHeader], list[Skip]]:
    """Keep the first file (by path) of each SOPInstanceUID."""
    seen: dict[str, str] = {}
    kept, skips = [], []
    for header in sorted(headers, key=lambda h: h.path):
        uid = header.sop_instance_uid
        if uid and uid in seen:
            skips.append(Skip(_relative(root, header.path), "duplicate_sop_instance",
                              "same SOPInstanceUID as the file kept", same_as=seen[uid]))
            continue
        if uid:
            seen[uid] = _relative(root, header.path)
        kept.append(header)
    return kept, skips


def _drop_copied_frames(root: str, headers: list[InstanceHeader]) -> tuple[list[InstanceHeader], list[Skip]]:
    """One representation of an acquisition stored both as classic files and as enhanced
    multi-frame files under one SeriesInstanceUID (Canon and Philips exports).

    Within a SeriesInstanceUID (across temporal positions: a classic file carries its
    TemporalPositionIdentifier at the top level, an enhanced frame in its functional groups),
    a classic frame and an enhanced frame with the same identity (dicom.frame_identity:
    position, orientation, temporal position, echo time, b-value) are copies. Where the two
    representations share a frame, the one covering more distinct frames is kept; a tie goes to
    the classic files (a file that fails at decode then costs one slice, not the series, and
    they are what the classic archives the model learns from are made of). A file of the
    other representation whose frames are all copies is skipped as `duplicate_frame`; one
    with frames of its own is kept with those frames only. Frames of one representation are
    never copies of each other (repeats, diffusion directions, time points without a
    temporal position), and a frame without geometry is never a copy."""
    kinds = collections.defaultdict(lambda: ([], []))  # series uid -> (classic, enhanced) headers
    for header in headers:
        kinds[header.series_uid][header.enhanced].append(header)
    keep: dict[str, tuple[bool, set]] = {}  # series uid -> (keep enhanced?, identities kept)
    for uid, members in kinds.items():
        covered = [{f.identity for h in group for f in h.frames if f.identity is not None}
                   for group in members]
        if covered[0] & covered[1]:
            rank = [(len(covered[i]), sum(len(h.frames) for h in members[i]), i == 0) for i in (0, 1)]
            enhanced = rank[1] > rank[0]
            keep[uid] = enhanced, covered[enhanced]
    kept, skips = [], []
    for header in headers:
        if header.series_uid not in keep or keep[header.series_uid][0] == header.enhanced:
            kept.append(header)
            continue
        enhanced, identities = keep[header.series_uid]
        own = tuple(f for f in header.frames if f.identity is None or f.identity not in identities)
        if own:
            kept.append(header if len(own) == len(header.frames) else dataclasses.replace(header, frames=own))
            continue
        representation = "enhanced multi-frame" if enhanced else "classic"
        count = "its frame is a copy" if len(header.frames) == 1 else \
            f"all {len(header.frames)} of its frames are copies"
        skips.append(Skip(_relative(root, header.path), "duplicate_frame",
                          f"{count} of the series' {representation} files, which are used"))
    return kept, skips


def _build_series(root: str, members: list[InstanceHeader]) -> tuple[Series, list[Skip]]:
    sizes = collections.Counter((h.rows, h.columns) for h in members)
    # The most common size wins; ties go to the larger image.
    size = max(sizes, key=lambda s: (sizes[s], s))
    kept = [h for h in members if (h.rows, h.columns) == size]
    skips = [Skip(_relative(root, h.path), "mixed_sizes",
                  f"{h.rows}x{h.columns} in a series of {size[0]}x{size[1]}")
             for h in members if (h.rows, h.columns) != size]
    ordered = order_frames(kept)
    first = ordered[0][0]
    patient, source = patient_key(first)
    slices = tuple(SliceRef(h.path, f.frame, f.iaps) for h, f in ordered)
    files = tuple(sorted(_relative(root, h.path) for h in kept))
    contrast = first.frames[0].iaps[_AGENT][0] == LabelState.PRESENT
    time_series = any(is_time_series((h.series_description, h.protocol_name, h.image_type),
                                     h.diffusion, contrast) for h in kept)
    series = Series(first.series_uid, first.temporal_position, patient, first.series_description,
                    size[0], size[1], slices, files, source, time_series)
    return series, skips


def group_series(root: str, headers: list[InstanceHeader]) -> tuple[list[Series], list[Skip]]:
    """Group instances into series ordered by key, dropping duplicates, copies and odd sizes."""
    headers, skips = _drop_duplicates(root, headers)
    headers, copies = _drop_copied_frames(root, headers)
    skips.extend(copies)
    groups: dict[tuple[str, int | None], list[InstanceHeader]] = collections.defaultdict(list)
    for header in headers:
        groups[(header.series_uid, header.temporal_position)].append(header)
    series = []
    for key in sorted(groups, key=lambda k: (k[0], -1 if k[1] is None else k[1])):
        built, dropped = _build_series(root, groups[key])
        series.append(built)
        skips.extend(dropped)
    return series, skips


def discover(root: str, workers: int = 1, progress: bool = True,
             relative_paths: Sequence[str] | None = None) -> Discovery:
    """Every usable series under root and every file skipped, with its reason.
    relative_paths: root's listing (list_files) where the caller has it already."""
    relative_paths = list_files(root) if relative_paths is None else list(relative_paths)
    meter = Progress("headers", len(relative_paths), unit="files") if progress else None
    headers, skips = read_headers(root, relative_paths, workers, meter)
    if meter:
        meter.close()
    series, group_skips = group_series(root, headers)
    notes = {_relative(root, h.path): h.note for h in headers if h.note}
    return Discovery(series, sorted(skips + group_skips, key=lambda s: s.path), len(relative_paths),
                     archive_fingerprint(root, relative_paths), dict(sorted(notes.items())),
                     iap_origin_counts(headers))


# --- selection ---------------------------------------------------------------------


PHASE_CHOICES = ("pre", "all")
DCE_PATTERN = r"dyn|vibrant|multiphase"
NON_FAT_SAT_PATTERN = r"non[\s_-]*fs|non[\s_-]*fat"
_PHASE_PREFIX = re.compile(r"^\s*ph(\d+)\s*/", re.IGNORECASE)
_PASS = re.compile(r"(\d+)\s*(?:st|nd|rd|th)\s+pass", re.IGNORECASE)
_PRE = re.compile(r"\bpre\b", re.IGNORECASE)
# Words (between non-letters) that name a dynamic contrast series, and those that name a time
# series whose temporal positions are repeats of the same slices, not contrast phases.
_DCE_WORDS = re.compile(DCE_PATTERN + r"|(?<![a-z])dce(?![a-z])", re.IGNORECASE)
_TIME_SERIES_WORDS = re.compile(
    r"(?<![a-z])(?:(?:rs)?fmri|bold|dti|dwi|diff|diffusion|tensor|p?c?asl)(?![a-z])", re.IGNORECASE)
_PERFUSION_WORDS = re.compile(r"(?<![a-z])perf(?:usion)?(?![a-z])", re.IGNORECASE)
LATER_TIME_POINT = "later time point of a time series (fMRI, diffusion, ASL/perfusion)"


def is_time_series(texts: Iterable[str], diffusion: bool = False, contrast: bool = False) -> bool:
    """Whether a series is recognised as fMRI, diffusion or ASL by its texts
    (SeriesDescription, ProtocolName, ImageType) or a DiffusionBValue in its header. One
    whose texts name a DCE series (DCE_PATTERN, or "dce") never is; "perfusion" counts only
    without a contrast agent in the header (with one it is a dynamic contrast series)."""
    text = "\n".join(texts)
    if _DCE_WORDS.search(text):
        return False
    if diffusion or _TIME_SERIES_WORDS.search(text):
        return True
    return not contrast and bool(_PERFUSION_WORDS.search(text))


def phase_of(series: Series) -> int:
    """The contrast phase: see the module docstring."""
    description = series.description
    for pattern in (_PHASE_PREFIX, _PASS):
        match = pattern.search(description)
        if match:
            return int(match.group(1))
    if _PRE.search(description):
        return 0
    if series.temporal_position is not None and not series.time_series:
        return max(series.temporal_position - 1, 0)
    return 0


@dataclasses.dataclass(frozen=True)
class SeriesSelection:
    series_filter: str | None = None
    phases: str = "pre"

    def __post_init__(self):
        if self.phases not in PHASE_CHOICES:
            raise ValueError(f"phases {self.phases!r} is not one of {PHASE_CHOICES}")
        if self.series_filter is not None:
            try:
                re.compile(self.series_filter)
            except re.error as err:
                raise ValueError(f"series filter {self.series_filter!r} is not a regex: {err}") from None

    def rejection(self, series: Series) -> str | None:
        """Why the series is left out, or None if it is selected."""
        description = series.description
        if self.series_filter is not None:
            if not re.search(self.series_filter, description, re.IGNORECASE):
                return "description does not match the series filter"
        else:
            if not re.search(DCE_PATTERN, description, re.IGNORECASE):
                return "not a DCE series"
            if re.search(NON_FAT_SAT_PATTERN, description, re.IGNORECASE):
                return "not fat-saturated"
        if series.time_series and series.temporal_position is not None and series.temporal_position > 1:
            return LATER_TIME_POINT
        if self.phases == "pre" and phase_of(series) != 0:
            return "post-contrast phase"
        return None


def parse_slices(spec: str) -> tuple[str, float]:
    """'all' | 'central:F' (the central fraction F of each series) | 'stride:K'."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "all" and not arg:
            return "all", 1.0
        if kind == "central" and 0 < float(arg) <= 1:
            return "central", float(arg)
        if kind == "stride" and int(arg) >= 1:
            return "stride", int(arg)
    except ValueError:
        pass
    raise ValueError(f"slices {spec!r}: expected all, central:F with 0<F<=1, or stride:K with K>=1")


def select_slices(num_slices: int, spec: str) -> list[int]:
    """Indices (into the ordered series) of the slices to keep."""
    kind, arg = parse_slices(spec)
    if kind == "central":
        count = max(1, round(num_slices * arg))
        start = (num_slices - count) // 2
        return list(range(start, start + count))
    if kind == "stride":
        return list(range(0, num_slices, int(arg)))
    return list(range(num_slices))


@dataclasses.dataclass(frozen=True)
class SelectedSeries:
    """A series the selection kept, with the keys every stage writes for it."""

    series: Series
    series_hash: str  # salted hash of Series.key: the records' `series`, the predictions' key
    patient_hash: str  # salted hash of the patient key
    phase: int
    indices: tuple[int, ...]  # the selected slices, into series.slices


def select(discovery: Discovery, selection: SeriesSelection, slices: str, salt: str
           ) -> tuple[list[SelectedSeries], dict[str, int]]:
    """The selected series of a discovery with their salted keys and slice indices, and the
    count of series left out per reason: the prep stage and the predictor both plan from it,
    so a slice gets the same series key and slice index either way."""
    kept, rejected = [], collections.Counter()
    for series in discovery.series:
        reason = selection.rejection(series)
        if reason:
            rejected[reason] += 1
            continue
        kept.append(SelectedSeries(series, salted_hash(salt, "series", series.key),
                                   salted_hash(salt, "patient", series.patient_id),
                                   phase_of(series),
                                   tuple(select_slices(len(series.slices), slices))))
    return kept, dict(rejected)
