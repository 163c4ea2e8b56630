"""Tissue relaxation, proton density, fat content and contrast uptake.

Every number here is either a literature value collected in the project's reference
facts (breast MRI at 1.5 T and 3 T) or a stated assumption. Assumptions:

- T2* at 1.5 T is not in the facts for most tissues; we use values a little below T2
  (fat 45 ms, fibroglandular 30 ms, muscle 30 ms, skin 35 ms, lesion 40 ms) and at 3 T
  the facts' values where given (fat 36, fibroglandular 22) and roughly 0.7x the 1.5 T
  value otherwise. At breast DCE echo times (1.4-2.8 ms) T2* changes the signal by a
  few percent only.
- Relative proton density (no source): fat 0.9, fibroglandular 0.8, muscle 0.75,
  blood 0.85, myocardium 0.78, skin 0.8, lesion 0.85, lung 0.2, marrow 0.8,
  cortical bone 0.05, CSF 1.0.
- Native T1 of myocardium 950/1200 ms, lung 1200/1300 ms, marrow 500/600 ms,
  CSF 4000/4300 ms, cortical bone 250 ms (assumptions in the usual literature ranges);
  invasive carcinoma at 1.5 T 1300 ms (the facts give 1200-1400).
- Every tissue is a mix of a water and a fat compartment (fat_fraction); the fat
  compartment of every tissue relaxes like adipose fat. Adipose tissue is 90 % fat
  signal, red/yellow marrow 60 %.
- Fat has a multi-peak spectrum (relative amplitudes and ppm offsets from water
  rounded from the commonly used six-peak liver-fat model); the chemical shift makes
  fat and water add in or out of phase depending on TE and field strength.
- Contrast shortens T1 only: R1 = 1/T1 + r1 * C. T2* shortening by gadolinium is
  ignored (it changes the signal by < 2 % at these echo times and concentrations).
- Tissue concentration curves C(t) = A * (1 - exp(-t/tau_in)) * exp(-t/tau_out),
  t in minutes after injection, A in mmol/L at the standard dose (0.1 mmol/kg, which
  all four agents share: gadobutrol 1.0 M at 0.1 mL/kg, the others 0.5 M at
  0.2 mL/kg). Lesion kinetics follow the three clinical curve types (persistent,
  plateau, washout); fibroglandular enhancement is slow background enhancement.
- Inflow and flow voids of blood are ignored (3D spoiled GRE with spatial saturation).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TISSUES = (
    "air", "fat", "fibroglandular", "skin", "muscle", "myocardium", "blood", "lung",
    "marrow", "cortical_bone", "csf", "lesion", "lesion_core",
)
TISSUE_INDEX = {name: i for i, name in enumerate(TISSUES)}
N_TISSUES = len(TISSUES)

GYROMAGNETIC_MHZ_PER_T = 42.577


@dataclass(frozen=True)
class TissueProperties:
    t1_ms: tuple[float, float]  # (1.5 T, 3 T)
    t2star_ms: tuple[float, float]
    proton_density: float
    fat_fraction: float = 0.0


# Values of the water compartment (fat compartments use FAT_COMPARTMENT).
TISSUE_PROPERTIES = {
    "air": TissueProperties((1000.0, 1000.0), (1.0, 1.0), 0.0),
    "fat": TissueProperties((296.0, 423.0), (45.0, 36.0), 0.9, fat_fraction=0.9),
    "fibroglandular": TissueProperties((1266.0, 1680.0), (30.0, 22.0), 0.8),
    "skin": TissueProperties((342.0, 377.0), (35.0, 25.0), 0.8),
    "muscle": TissueProperties((1008.0, 1412.0), (30.0, 21.0), 0.75),
    "myocardium": TissueProperties((950.0, 1200.0), (30.0, 22.0), 0.78),
    "blood": TissueProperties((1441.0, 1630.0), (100.0, 60.0), 0.85),
    "lung": TissueProperties((1200.0, 1300.0), (2.0, 1.0), 0.2),
    "marrow": TissueProperties((500.0, 600.0), (10.0, 6.0), 0.8, fat_fraction=0.6),
    "cortical_bone": TissueProperties((250.0, 250.0), (0.5, 0.3), 0.05),
    "csf": TissueProperties((4000.0, 4300.0), (200.0, 150.0), 1.0),
    "lesion": TissueProperties((1300.0, 1612.0), (40.0, 30.0), 0.85),
    "lesion_core": TissueProperties((1400.0, 1700.0), (45.0, 32.0), 0.9),
}
FAT_COMPARTMENT = TissueProperties((296.0, 423.0), (45.0, 36.0), 1.0)

# Fat spectrum: (ppm offset from water, relative amplitude).
FAT_PEAKS = ((-3.80, 0.087), (-3.40, 0.693), (-2.60, 0.128), (-1.94, 0.004),
             (-0.39, 0.039), (0.60, 0.049))
# Peaks a spectral fat-saturation pulse centred on the main methylene peak reaches.
FAT_SAT_PEAK_LIMIT_PPM = -1.5


@dataclass(frozen=True)
class ContrastAgent:
    name: str
    r1_per_mm_s: tuple[float, float]  # (1.5 T, 3 T), L/mmol/s in plasma at 37 C


AGENTS = {
    "MAGNEVIST": ContrastAgent("gadopentetate", (4.1, 3.7)),
    "GADAVIST": ContrastAgent("gadobutrol", (5.2, 5.0)),
    "MULTIHANCE": ContrastAgent("gadobenate", (6.3, 5.5)),
}


@dataclass(frozen=True)
class UptakeCurve:
    peak_mm: float
    tau_in_min: float
    tau_out_min: float

    def concentration(self, minutes: float) -> float:
        if minutes <= 0:
            return 0.0
        return float(self.peak_mm * (1 - np.exp(-minutes / self.tau_in_min))
                     * np.exp(-minutes / self.tau_out_min))


UPTAKE = {
    "blood": UptakeCurve(1.3, 0.15, 12.0),
    "myocardium": UptakeCurve(0.55, 0.25, 10.0),
    "muscle": UptakeCurve(0.25, 1.5, 30.0),
    "skin": UptakeCurve(0.3, 1.5, 30.0),
    "marrow": UptakeCurve(0.3, 0.8, 20.0),
    "fibroglandular": UptakeCurve(0.12, 5.0, 60.0),
    "lung": UptakeCurve(0.1, 0.3, 10.0),
}
LESION_UPTAKE = {
    "persistent": UptakeCurve(0.9, 2.5, 1e6),
    "plateau": UptakeCurve(0.9, 0.8, 40.0),
    "washout": UptakeCurve(1.1, 0.5, 6.0),
}
LESION_CORE_FRACTION = 0.25  # necrotic or fibrotic core takes up a quarter as much


def field_index(field_tesla: float) -> int:
    """0 for 1.5 T systems, 1 for 3 T systems (1.494 and 2.8936 included)."""
    return 0 if field_tesla < 2.2 else 1


def concentrations(minutes: float, lesion_kinetics: str, fgt_enhancement: float) -> np.ndarray:
    """Contrast concentration (mmol/L) of every tissue, in TISSUES order."""
    conc = np.zeros(N_TISSUES)
    for name, curve in UPTAKE.items():
        conc[TISSUE_INDEX[name]] = curve.concentration(minutes)
    conc[TISSUE_INDEX["fibroglandular"]] *= fgt_enhancement
    lesion = LESION_UPTAKE[lesion_kinetics].concentration(minutes)
    conc[TISSUE_INDEX["lesion"]] = lesion
    conc[TISSUE_INDEX["lesion_core"]] = lesion * LESION_CORE_FRACTION
    return conc


def relaxation_tables(field_tesla: float, r1: float = 0.0,
                      conc: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-tissue arrays (TISSUES order) of water R1 (1/ms), T2* (ms), PD and fat fraction.

    r1 in L/mmol/s and conc in mmol/L add r1 * C to the water compartment's R1.
    """
    fi = field_index(field_tesla)
    props = [TISSUE_PROPERTIES[name] for name in TISSUES]
    r1_water = np.array([1.0 / p.t1_ms[fi] for p in props])
    if conc is not None:
        r1_water = r1_water + r1 * np.asarray(conc) / 1000.0
    return {
        "r1_per_ms": r1_water,
        "t2star_ms": np.array([p.t2star_ms[fi] for p in props]),
        "proton_density": np.array([p.proton_density for p in props]),
        "fat_fraction": np.array([p.fat_fraction for p in props]),
    }


def fat_compartment(field_tesla: float) -> tuple[float, float]:
    """(R1 in 1/ms, T2* in ms) of the fat compartment at this field."""
    fi = field_index(field_tesla)
    return 1.0 / FAT_COMPARTMENT.t1_ms[fi], FAT_COMPARTMENT.t2star_ms[fi]


def fat_phasors(te_ms: float, field_tesla: float) -> tuple[complex, complex]:
    """Complex fat signal relative to water at echo time te_ms (chemical shift).

    Returned as (peaks a spectral fat-saturation pulse reaches, peaks it leaves), so a
    caller can scale the first by the local saturation residual.
    """
    saturable, unsaturable = 0j, 0j
    for ppm, amplitude in FAT_PEAKS:
        freq_khz = GYROMAGNETIC_MHZ_PER_T * field_tesla * ppm * 1e-3
        phasor = amplitude * np.exp(2j * np.pi * freq_khz * te_ms)
        if ppm < FAT_SAT_PEAK_LIMIT_PPM:
            saturable += phasor
        else:
            unsaturable += phasor
    return complex(saturable), complex(unsaturable)
