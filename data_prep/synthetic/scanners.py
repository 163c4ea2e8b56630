"""Protocol catalog: the eight scanner models of the Duke breast DCE-MRI cohort.

Cohort weights, field strengths as written, ScanOptions vocabularies, contrast agents,
acquisition matrices, slice thicknesses, flip angles, Rows/Columns and median slice
counts follow the reference facts. Which model used which option, matrix, agent and era
is not public: the assignments below are assumptions chosen so that every value of the
paper's label vocabularies occurs, each site has a small number of protocol versions
that change with the year (as a real site's protocol does), and the contrast agent
depends on site and year only.

Vendor conventions (assumptions where noted):
- GE writes AcquisitionMatrix as 0\\FREQ\\PHASE\\0 (frequency along the row, phase
  encoded top to bottom, A-P), ReconstructionDiameter, RescaleIntercept/Slope 0/1 and
  signed 16-bit pixels; it reconstructs to 512 (ZIP512) or 320 and overlaps slices
  two-fold (ZIP2: spacing half the thickness).
- Siemens writes FREQ\\0\\0\\PHASE (phase encoded left-right), no ReconstructionDiameter
  and no rescale, 12-bit unsigned pixels, and contiguous slices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GE = "GE MEDICAL SYSTEMS"
SIEMENS = "SIEMENS"

SIEMENS_DESCRIPTIONS = ("ax dyn pre", "ax dyn 1st pass", "ax dyn 2nd pass",
                        "ax dyn 3rd pass", "ax dyn 4th pass")


def ge_descriptions(base: str) -> tuple[str, ...]:
    return (base,) + tuple(f"Ph{k}/{base}" for k in range(1, 5))


@dataclass(frozen=True)
class ProtocolVariant:
    """One version of a site's DCE protocol, in use during `years` (inclusive)."""
    years: tuple[int, int]
    scan_options: str
    acquisition_matrix: tuple[int, int]  # (frequency, phase)
    recon_size: int
    slice_thickness_mm: float
    flip_angle: int
    te_ms: float
    tr_ms: float
    description: str  # GE series-description family; Siemens uses SIEMENS_DESCRIPTIONS
    weight: float = 1.0


@dataclass(frozen=True)
class AgentEra:
    """Contrast agent labels a site wrote during `years`: label -> weight.

    Label None means the tag is absent, "" means present but empty."""
    years: tuple[int, int]
    labels: dict


@dataclass(frozen=True)
class ScannerModel:
    manufacturer: str
    model: str
    field_written: float
    weight: float
    variants: tuple[ProtocolVariant, ...]
    agents: tuple[AgentEra, ...]
    median_slices: int
    ffp_probability: float
    fov_range_mm: tuple[int, int]
    coil_elements: int
    coil_depth_mm: float  # how fast receive sensitivity falls away from the coil
    intensity_correction: float  # fraction of coil shading a vendor filter removes
    b1_asymmetry: float  # left-right transmit (flip angle) gradient across the FOV
    shim_ppm: float  # off-resonance spread at the breast periphery
    recon_filter: tuple[float, float]  # Fermi k-space filter (radius, width), k=1 at edge
    pixel_bandwidth_hz: float
    phase_interval_s: float
    software_versions: str
    t1_description: str = ""

    @property
    def key(self) -> str:
        return f"{self.model} {field_label(self.field_written)}"

    @property
    def is_ge(self) -> bool:
        return self.manufacturer == GE


def field_label(field_tesla: float) -> str:
    return "3T" if field_tesla > 2.2 else "1.5T"


def _ge(model, field_written, weight, variants, agents, median_slices, **kw):
    t1 = "Ax 3D T1 NON FS"
    defaults = dict(ffp_probability=0.3, fov_range_mm=(300, 400), coil_elements=8,
                    coil_depth_mm=90.0, intensity_correction=0.3, pixel_bandwidth_hz=325.0,
                    phase_interval_s=100.0, software_versions="14\\LX\\MR Software release:14.0",
                    recon_filter=(0.9, 0.05), t1_description=t1,
                    b1_asymmetry=0.04, shim_ppm=0.8)
    defaults.update(kw)
    return ScannerModel(GE, model, field_written, weight, tuple(variants), tuple(agents),
                        median_slices, **defaults)


def _siemens(model, field_written, weight, variants, agents, median_slices, **kw):
    defaults = dict(ffp_probability=0.8, fov_range_mm=(300, 380), coil_elements=4,
                    coil_depth_mm=80.0, intensity_correction=0.5, pixel_bandwidth_hz=400.0,
                    phase_interval_s=75.0, software_versions="syngo MR B17",
                    recon_filter=(1.5, 0.05), t1_description="ax t1",
                    b1_asymmetry=0.04, shim_ppm=0.8)
    defaults.update(kw)
    return ScannerModel(SIEMENS, model, field_written, weight, tuple(variants), tuple(agents),
                        median_slices, **defaults)


V = ProtocolVariant
VIBRANT = "FAST_GEMS\\SAT_GEMS\\ACC_GEMS\\PFP\\FS"
VIBRANT_MP = "FAST_GEMS\\SAT_GEMS\\MP_GEMS\\ACC_GEMS\\PFP\\FS"
VIBRANT_MP_NOACC = "FAST_GEMS\\SAT_GEMS\\MP_GEMS\\PFP\\FS"
FGRE_FS = "FAST_GEMS\\SAT_GEMS\\PFP\\FS"

CATALOG: tuple[ScannerModel, ...] = (
    _ge("SIGNA HDx", 1.5, 170, [
        V((2005, 2009), FGRE_FS, (350, 350), 512, 2.2, 10, 2.5, 5.6, "ax 3d dyn"),
        V((2008, 2014), VIBRANT, (384, 384), 512, 2.0, 10, 2.4, 5.2, "Ax Vibrant MultiPhase"),
        V((2010, 2014), "SAT_GEMS\\PFP\\FS", (360, 360), 512, 1.8, 12, 2.6, 6.1, "ax dynamic"),
    ], [AgentEra((2005, 2009), {"MAGNEVIST": 0.5, None: 0.5}),
        AgentEra((2010, 2014), {"MULTIHANCE": 0.4, "GADAVIST": 0.3, "": 0.3})],
        166, software_versions="14\\LX\\MR Software release:14.0_M5_0737.f"),
    _ge("SIGNA HDx", 3.0, 102, [
        V((2007, 2011), VIBRANT, (350, 350), 512, 2.2, 10, 1.9, 4.3, "Ax Vibrant MultiPhase"),
        V((2010, 2014), FGRE_FS, (320, 320), 512, 2.4, 7, 2.1, 4.8, "ax 3d dyn"),
    ], [AgentEra((2007, 2014), {"MULTIHANCE": 0.5, "GADAVIST": 0.2, None: 0.3})],
        166, coil_elements=8, b1_asymmetry=0.16, shim_ppm=0.9,
        software_versions="14\\LX\\MR Software release:14.0_M5A_0828.b"),
    _ge("Signa HDxt", 1.5, 180, [
        V((2009, 2012), VIBRANT_MP, (340, 340), 512, 2.0, 10, 2.4, 5.0, "ax 3d dyn MP"),
        V((2011, 2014), VIBRANT_MP_NOACC, (384, 384), 512, 1.6, 10, 2.5, 5.4, "ax 3d dyn MP"),
        V((2009, 2014), VIBRANT_MP, (320, 320), 320, 2.5, 12, 2.6, 5.9, "Ax Vibrant MultiPhase",
          weight=0.5),
    ], [AgentEra((2009, 2014), {"GADAVIST": 0.4, "MULTIHANCE": 0.3, "": 0.3})],
        180, coil_elements=8, shim_ppm=0.8,
        software_versions="HD16.0_V02_1131.a"),
    _ge("Signa HDxt", 3.0, 68, [
        V((2010, 2014), VIBRANT_MP, (350, 350), 512, 2.0, 8, 2.0, 4.4, "Ax Vibrant MultiPhase"),
        V((2011, 2014), VIBRANT_MP, (384, 360), 512, 1.4, 10, 1.8, 4.1, "ax 3d dyn MP"),
    ], [AgentEra((2010, 2014), {"GADAVIST": 0.5, "": 0.5})],
        180, coil_elements=8, b1_asymmetry=0.15, shim_ppm=0.8,
        software_versions="HD16.0_V03_1138.a"),
    _ge("Optima MR450w", 1.5, 98, [
        V((2011, 2014), VIBRANT, (448, 448), 512, 2.2, 10, 2.2, 4.7, "Ax Vibrant MultiPhase"),
        V((2012, 2014), VIBRANT, (448, 251), 512, 1.2, 12, 2.3, 4.9, "ax dynamic"),
    ], [AgentEra((2011, 2014), {"GADAVIST": 0.6, "MULTIHANCE": 0.2, "": 0.2})],
        176, coil_elements=16, coil_depth_mm=70.0, intensity_correction=0.7, shim_ppm=0.6,
        recon_filter=(0.95, 0.04), phase_interval_s=90.0,
        software_versions="DV23.1_V02_1317.c"),
    _ge("SIGNA EXCITE", 1.5, 10, [
        V((2003, 2007), FGRE_FS, (320, 320), 512, 2.5, 12, 2.7, 6.6, "ax 3d dyn"),
    ], [AgentEra((2003, 2007), {None: 0.7, "MAGNEVIST": 0.3})],
        96, coil_elements=4, coil_depth_mm=100.0, intensity_correction=0.0, shim_ppm=1.2,
        recon_filter=(0.85, 0.06), phase_interval_s=120.0,
        software_versions="11\\LX\\MR Software release:11.0_M4_0544.a"),
    _siemens("Avanto", 1.494, 179, [
        V((2006, 2010), "PFP\\FS", (448, 381), 448, 1.1, 10, 2.45, 5.0, ""),
        V((2008, 2014), "FS", (448, 430), 448, 1.0, 10, 2.6, 5.5, ""),
        V((2011, 2014), "PFP\\FS", (384, 360), 448, 1.2, 12, 2.4, 4.9, ""),
    ], [AgentEra((2006, 2009), {"MAGNEVIST": 0.6, None: 0.4}),
        AgentEra((2010, 2014), {"GADAVIST": 0.45, "MAGNEVIST": 0.2, "": 0.35})],
        160, coil_elements=7, shim_ppm=0.7, b1_asymmetry=0.04),
    _siemens("TrioTim", 2.8936, 57, [
        V((2008, 2011), "PFP\\FS", (448, 381), 448, 1.0, 10, 1.5, 4.2, ""),
        V((2010, 2014), "PFP\\SFS", (512, 358), 512, 0.9, 8, 1.4, 3.9, ""),
    ], [AgentEra((2008, 2010), {"MMAGNEVIST": 0.5, "MAGNEVIST": 0.5}),
        AgentEra((2011, 2014), {"GADAVIST": 0.6, "": 0.4})],
        160, coil_elements=4, b1_asymmetry=0.25, shim_ppm=0.9,
        software_versions="syngo MR B17"),
    _siemens("Skyra", 2.8936, 56, [
        V((2012, 2014), "SFS", (448, 448), 448, 1.0, 10, 1.7, 4.4, ""),
        V((2012, 2014), "PFP\\SFS", (448, 430), 448, 1.04, 8, 1.6, 4.1, ""),
    ], [AgentEra((2012, 2014), {"GADAVIST": 0.5, "MULTIHANCE": 0.3, "": 0.2})],
        208, coil_elements=16, coil_depth_mm=65.0, intensity_correction=0.8,
        b1_asymmetry=0.12, shim_ppm=0.6, recon_filter=(1.0, 0.1),
        software_versions="syngo MR D13"),
    _siemens("Trio", 2.8936, 1, [
        V((2004, 2007), "FS", (448, 381), 448, 1.2, 10, 1.7, 4.5, ""),
    ], [AgentEra((2004, 2007), {None: 1.0})],
        160, b1_asymmetry=0.25, shim_ppm=1.0, software_versions="syngo MR A35"),
)

N_POST_PHASE_PROBS = {2: 8 / 917, 3: 479 / 917, 4: 430 / 917}
PARTIAL_FOURIER = {GE: 0.7, SIEMENS: 0.75}  # sampled fraction of phase lines with PFP


@dataclass(frozen=True)
class SeriesProtocol:
    """Everything the simulator and the DICOM writer need for one series."""
    scanner: ScannerModel
    role: str  # "t1_nonfs" | "dce"
    phase: int  # 0 pre-contrast, 1..4 post
    n_phases: int  # DCE phases including the pre-contrast one
    series_number: int
    series_description: str
    scan_options: str
    acquisition_matrix: tuple[int, int]  # (frequency, phase), canonical label values
    recon_size: int  # Rows = Columns at the real size
    fov_mm: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    n_slices: int  # slices of the real series
    flip_angle: float
    te_ms: float
    tr_ms: float
    patient_position: str
    contrast_label: str | None  # None = tag absent
    agent_used: str  # the agent physically injected
    minutes_after_injection: float
    year: int

    @property
    def scan_option_tokens(self) -> tuple[str, ...]:
        return tuple(t for t in self.scan_options.split("\\") if t)

    @property
    def fat_sat(self) -> str:
        tokens = self.scan_option_tokens
        return "SFS" if "SFS" in tokens else ("FS" if "FS" in tokens else "none")

    @property
    def partial_fourier(self) -> float:
        return PARTIAL_FOURIER[self.scanner.manufacturer] if "PFP" in self.scan_option_tokens else 1.0

    @property
    def acceleration(self) -> int:
        return 2 if "ACC_GEMS" in self.scan_option_tokens else 1

    @property
    def contrast_state(self) -> str:
        if self.contrast_label is None:
            return "absent"
        return "empty" if self.contrast_label == "" else "present"


def scanner_weights() -> np.ndarray:
    w = np.array([m.weight for m in CATALOG], dtype=float)
    return w / w.sum()


def _pick(rng: np.random.Generator, options: dict):
    keys = list(options)
    probs = np.array([options[k] for k in keys], dtype=float)
    return keys[rng.choice(len(keys), p=probs / probs.sum())]


def _year_range(scanner: ScannerModel) -> tuple[int, int]:
    return (min(v.years[0] for v in scanner.variants), max(v.years[1] for v in scanner.variants))


def _physical_agent(label: str | None, year: int) -> str:
    if label in ("MAGNEVIST", "MMAGNEVIST"):
        return "MAGNEVIST"
    if label in ("GADAVIST", "MULTIHANCE"):
        return label
    return "MAGNEVIST" if year < 2010 else "GADAVIST"


def _format_time(value: float, vendor: str) -> float:
    return round(value, 3 if vendor == GE else 2)


def _non_fat_sat_options(scan_options: str) -> str:
    return "\\".join(t for t in scan_options.split("\\") if t not in ("FS", "SFS", "MP_GEMS"))


def plan_patient_series(scanner: ScannerModel, rng: np.random.Generator, body_width_mm: float,
                        variant_index: int | None = None) -> list[SeriesProtocol]:
    """A patient's exam on `scanner`: a non-fat-sat T1 and a pre + 2-4 post DCE series.

    The exam year picks the protocol version in use; variant_index forces one instead.
    """
    lo, hi = _year_range(scanner)
    year = int(rng.integers(lo, hi + 1))
    variants = [v for v in scanner.variants if v.years[0] <= year <= v.years[1]]
    variant = variants[rng.choice(len(variants), p=_normalised([v.weight for v in variants]))]
    if variant_index is not None:
        variant = scanner.variants[variant_index]
        year = int(np.clip(year, *variant.years))
    era = next(e for e in scanner.agents if e.years[0] <= year <= e.years[1])
    contrast_label = _pick(rng, era.labels)
    position = "FFP" if rng.random() < scanner.ffp_probability else "HFP"
    n_post = _pick(rng, N_POST_PHASE_PROBS)

    # FOV follows the body: the chest width plus a margin, in 10 mm steps.
    fov_lo, fov_hi = scanner.fov_range_mm
    fov = float(np.clip(10 * round((body_width_mm + 25 + rng.normal(0, 8)) / 10), fov_lo, fov_hi))
    # Minimum TE/TR shift with FOV, bandwidth and gradient heating: jitter within a protocol.
    te = variant.te_ms * (1 + rng.normal(0, 0.02))
    tr = variant.tr_ms * (1 + rng.normal(0, 0.03))
    overlap = 2 if scanner.is_ge else 1
    spacing = variant.slice_thickness_mm / overlap
    n_slices = int(round(scanner.median_slices * rng.uniform(0.9, 1.1)))
    vendor = scanner.manufacturer
    common = dict(scanner=scanner, n_phases=1 + n_post, acquisition_matrix=variant.acquisition_matrix,
                  recon_size=variant.recon_size, fov_mm=fov,
                  slice_thickness_mm=variant.slice_thickness_mm, slice_spacing_mm=spacing,
                  n_slices=n_slices, flip_angle=float(variant.flip_angle),
                  patient_position=position, contrast_label=contrast_label,
                  agent_used=_physical_agent(contrast_label, year), year=year)
    series = [SeriesProtocol(
        role="t1_nonfs", phase=0, series_number=3 if scanner.is_ge else 4,
        series_description=scanner.t1_description,
        scan_options=_non_fat_sat_options(variant.scan_options),
        te_ms=_format_time(te, vendor), tr_ms=_format_time(tr * 0.92, vendor),
        minutes_after_injection=0.0, **common)]
    descriptions = (SIEMENS_DESCRIPTIONS if vendor == SIEMENS
                    else ge_descriptions(variant.description))
    interval_min = scanner.phase_interval_s * rng.uniform(0.95, 1.05) / 60.0
    first_series = 5 if scanner.is_ge else 6
    for phase in range(1 + n_post):
        series.append(SeriesProtocol(
            role="dce", phase=phase, series_number=first_series + phase,
            series_description=descriptions[phase], scan_options=variant.scan_options,
            te_ms=_format_time(te, vendor), tr_ms=_format_time(tr, vendor),
            # k-space centre of post phase k is acquired mid-way through its interval.
            minutes_after_injection=(phase - 0.5) * interval_min if phase else 0.0,
            **common))
    return series


def _normalised(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def variant_pairs() -> list[tuple[int, int]]:
    """(catalog index, variant index) of every protocol version in the catalog."""
    return [(i, j) for i, m in enumerate(CATALOG) for j in range(len(m.variants))]
