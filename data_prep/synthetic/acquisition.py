"""MR signal, k-space acquisition and reconstruction of one slice.

The chain for a slice: tissue fractions -> complex transverse magnetisation from the
spoiled gradient echo equation (per tissue water and fat compartments, fat chemical
shift at TE, fat suppression residual, flip angle scaled by the B1+ map) -> receive
coil sensitivity and cardiac ghosts -> 2D FFT -> keep the acquired part of k-space
(acquisition matrix; partial Fourier) -> complex Gaussian noise -> vendor k-space
filter -> zero-fill to the reconstructed size -> inverse FFT -> magnitude (Rician
noise) with the parallel-imaging g-factor -> vendor intensity correction.

Assumptions (besides those in tissues.py):
- Coil arrays are combined by root-sum-of-squares; the noise after combination is
  treated as Rician (single effective channel) rather than non-central chi.
- SNR is proportional to B0**0.9 (about 1.9x from 1.5 to 3 T), the acquired voxel
  volume and sqrt(phase lines sampled * partitions / (R * pixel bandwidth)); parallel
  imaging multiplies noise by the g-factor map, which peaks where folded pixels overlap.
- Fat saturation: FS is a spectrally selective 90-degree pulse whose residual fat
  signal is |cos(90 deg * B1)| plus loss of selectivity off resonance; SFS is an
  adiabatic spectral inversion (B1 insensitive) with a small constant residual. Both
  recover a little between the saturation pulse and the centre of k-space.
- Partial Fourier: Siemens zero-fills the missing lines, GE uses conjugate synthesis.
- Chemical-shift displacement along the readout and flow effects are not modelled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import functools

import numpy as np
import scipy.fft

from data_prep.synthetic import tissues
from data_prep.synthetic.tissues import TISSUE_INDEX

B1_POLY_DEGREE = 3
FS_RECOVERY = {"FS": 0.08, "SFS": 0.04}  # fat regrowth before the k-space centre


def spgr_signal(proton_density, r1_per_ms, t2star_ms, flip_deg, tr_ms, te_ms):
    """Spoiled gradient echo steady state: PD sin(a)(1-E1)/(1-cos(a)E1) exp(-TE/T2*)."""
    alpha = np.deg2rad(flip_deg)
    e1 = np.exp(-np.asarray(tr_ms) * np.asarray(r1_per_ms))
    return (proton_density * np.sin(alpha) * (1 - e1) / (1 - np.cos(alpha) * e1)
            * np.exp(-np.asarray(te_ms) / np.asarray(t2star_ms)))


def r1_from_signal(signal, proton_density, t2star_ms, flip_deg, tr_ms, te_ms):
    """Invert spgr_signal for R1 (1/ms) given everything else."""
    alpha = np.deg2rad(flip_deg)
    s = signal / (proton_density * np.sin(alpha) * np.exp(-te_ms / t2star_ms))
    e1 = (1 - s) / (1 - s * np.cos(alpha))
    return -np.log(e1) / tr_ms


@dataclass(frozen=True)
class SignalModel:
    """Per-tissue signal as a polynomial in (B1 - 1), water and fat parts separated."""
    water_poly: np.ndarray  # (degree + 1, n_tissues), highest power first
    fat_density: np.ndarray  # (n_tissues,) fat fraction * proton density
    fat_poly: np.ndarray  # (degree + 1,)
    fat_saturable: complex  # fat peaks reached by spectral fat saturation
    fat_unsaturable: complex


def signal_model(field_tesla: float, flip_deg: float, tr_ms: float, te_ms: float,
                 r1_agent: float = 0.0, conc: np.ndarray | None = None) -> SignalModel:
    tab = tissues.relaxation_tables(field_tesla, r1_agent, conc)
    b1 = np.linspace(0.4, 1.6, 25)
    water = spgr_signal(tab["proton_density"][None] * (1 - tab["fat_fraction"][None]),
                        tab["r1_per_ms"][None], tab["t2star_ms"][None],
                        flip_deg * b1[:, None], tr_ms, te_ms)  # (n_b1, n_tissues)
    water_poly = np.polyfit(b1 - 1, water, B1_POLY_DEGREE)
    fat_r1, fat_t2s = tissues.fat_compartment(field_tesla)
    fat = spgr_signal(1.0, fat_r1, fat_t2s, flip_deg * b1, tr_ms, te_ms)
    fat_poly = np.polyfit(b1 - 1, fat, B1_POLY_DEGREE)
    saturable, unsaturable = tissues.fat_phasors(te_ms, field_tesla)
    return SignalModel(water_poly.astype(np.float32),
                       (tab["proton_density"] * tab["fat_fraction"]).astype(np.float32),
                       fat_poly.astype(np.float32), saturable, unsaturable)


@dataclass(frozen=True)
class FieldMaps:
    """Smooth maps in the scanner (image) frame, shape (rows, columns)."""
    b1: np.ndarray  # transmit flip-angle scale
    coil: np.ndarray  # receive sensitivity (root-sum-of-squares)
    off_resonance_ppm: np.ndarray
    g_factor: np.ndarray  # noise amplification with parallel imaging (R=2)
    ghost_source: float  # cardiac ghost amplitude for this patient
    _corrections: dict = field(default_factory=dict, repr=False, compare=False)  # derived maps

    def intensity_correction(self, strength: float) -> np.ndarray:
        """Vendor shading correction: divides by the coil sensitivity to a power."""
        if strength not in self._corrections:
            self._corrections[strength] = (1.0 / np.maximum(self.coil, 0.05) ** strength).astype(np.float32)
        return self._corrections[strength]


def fat_residual(maps: FieldMaps, fat_sat: str) -> np.ndarray | float:
    """Fraction of saturable fat signal left after fat suppression."""
    if fat_sat == "none":
        return 1.0
    key = ("fat_residual", fat_sat)
    if key not in maps._corrections:
        maps._corrections[key] = _fat_residual(maps, fat_sat)
    return maps._corrections[key]


def _fat_residual(maps: FieldMaps, fat_sat: str) -> np.ndarray:
    selectivity = np.exp(-(maps.off_resonance_ppm / 1.5) ** 2)
    if fat_sat == "FS":
        pulse = np.abs(np.cos(0.5 * np.pi * maps.b1))
    else:
        pulse = 0.03 + 0.15 * np.abs(maps.b1 - 1.0)
    residual = 1.0 - (1.0 - pulse) * selectivity
    return (FS_RECOVERY[fat_sat] + (1 - FS_RECOVERY[fat_sat]) * residual).astype(np.float32)


def transverse_magnetisation(fractions: np.ndarray, model: SignalModel, b1: np.ndarray,
                             residual) -> np.ndarray:
    """Complex object (rows, columns) from tissue fractions (n_tissues, rows, columns)."""
    n, rows, cols = fractions.shape
    flat = fractions.reshape(n, -1)
    coeffs = np.concatenate([model.water_poly, model.fat_density[None]], axis=0)
    # einsum's own loop: BLAS threads gain nothing on this memory-bound product.
    mixed = np.einsum("kt,tp->kp", coeffs, flat)  # (degree + 2, pixels)
    delta = (b1.reshape(-1) - 1.0).astype(np.float32)
    water = mixed[0].copy()
    fat_signal = np.full_like(delta, model.fat_poly[0])
    for k in range(1, B1_POLY_DEGREE + 1):
        water = water * delta + mixed[k]
        fat_signal = fat_signal * delta + model.fat_poly[k]
    fat = (fat_signal * mixed[-1]).reshape(rows, cols)
    residual = np.asarray(residual, dtype=np.float32)
    obj = water.reshape(rows, cols).astype(np.complex64)
    obj += fat * (residual * np.complex64(model.fat_saturable) + np.complex64(model.fat_unsaturable))
    return obj


@dataclass(frozen=True)
class Acquisition:
    """Sampling and reconstruction of one series on the simulated grid."""
    recon_size: int
    acq_frequency: int
    acq_phase: int
    phase_axis: int  # 0: phase encoded along rows (top to bottom), 1: along columns
    partial_fourier: float
    conjugate_synthesis: bool
    acceleration: int
    filter_radius: float
    filter_width: float
    noise_sigma: float  # per-component image noise at g = 1, in signal units
    intensity_correction: float

    def kspace_filter(self) -> np.ndarray:
        return _kspace_filter(self.acq_phase, self.acq_frequency, self.phase_axis,
                              self.filter_radius, self.filter_width)


@functools.lru_cache(maxsize=32)
def _kspace_filter(acq_phase, acq_frequency, phase_axis, filter_radius, filter_width) -> np.ndarray:
    """Fermi window over the acquired k-space, k = 1 at its edge along each axis."""
    shape = [0, 0]
    shape[phase_axis] = acq_phase
    shape[1 - phase_axis] = acq_frequency
    k0 = (np.arange(shape[0]) - shape[0] // 2) / (shape[0] / 2)
    k1 = (np.arange(shape[1]) - shape[1] // 2) / (shape[1] / 2)
    radius = np.sqrt(k0[:, None] ** 2 + k1[None, :] ** 2)
    return (1.0 / (1.0 + np.exp((radius - filter_radius) / filter_width))).astype(np.float32)


def relative_snr(field_tesla: float, voxel_mm3: float, phase_lines: float, partitions: int,
                 acceleration: int, pixel_bandwidth_hz: float, coil_elements: int) -> float:
    """SNR relative to a 1 mm^3, 1.5 T, single-line reference (see module docstring)."""
    return float((field_tesla / 1.5) ** 0.9 * voxel_mm3
                 * np.sqrt(phase_lines * partitions / (acceleration * pixel_bandwidth_hz))
                 * (coil_elements / 8) ** 0.25)


def _centre_offsets(full: tuple[int, int], part: tuple[int, int]) -> tuple[int, int]:
    """Offset of a centred sub-array, so that the k-space centre stays at full//2."""
    return tuple((f - p) // 2 for f, p in zip(full, part))


def _centre_crop(kspace: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    s0, s1 = _centre_offsets(kspace.shape, shape)
    return kspace[s0:s0 + shape[0], s1:s1 + shape[1]]


def _zero_pad(kspace: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.complex64)
    a0, a1 = _centre_offsets((size, size), kspace.shape)
    out[a0:a0 + kspace.shape[0], a1:a1 + kspace.shape[1]] = kspace
    return out


def _hermitian_mirror(kspace: np.ndarray, full_size: int) -> np.ndarray:
    """K(-k) conjugated, for a centred crop of a full_size x full_size fftshifted array."""
    offsets = _centre_offsets((full_size, full_size), kspace.shape)
    # Centre index c of each axis; the mirror of index i is 2c - i = (M-1-i) + roll.
    rolls = tuple(2 * (full_size // 2 - o) - m + 1 for o, m in zip(offsets, kspace.shape))
    return np.conj(np.roll(np.flip(kspace, axis=(0, 1)), rolls, axis=(0, 1)))


def reconstruct(obj: np.ndarray, acq: Acquisition, maps: FieldMaps,
                rng: np.random.Generator | None) -> np.ndarray:
    """Sample obj in k-space as `acq` says and reconstruct the magnitude image.

    rng None gives the noise-free reconstruction.
    """
    n = acq.recon_size
    kspace = scipy.fft.fftshift(scipy.fft.fft2(obj, norm="ortho"))
    shape = [0, 0]
    shape[acq.phase_axis] = acq.acq_phase
    shape[1 - acq.phase_axis] = acq.acq_frequency
    kc = _centre_crop(kspace, tuple(shape)).copy()

    sampled = np.ones(acq.acq_phase, dtype=bool)
    if acq.partial_fourier < 1.0:
        sampled[: int(round((1.0 - acq.partial_fourier) * acq.acq_phase))] = False
    line_mask = sampled[:, None] if acq.phase_axis == 0 else sampled[None, :]

    noise = None
    if rng is not None and acq.noise_sigma > 0:
        sigma_k = acq.noise_sigma * n / np.sqrt(kc.size)
        noise = rng.standard_normal(kc.shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]
        noise *= np.float32(sigma_k)
    amplified = acq.acceleration > 1 and noise is not None
    if noise is not None and not amplified:
        kc += noise
        noise = None
    if acq.partial_fourier < 1.0:
        kc *= line_mask
        if acq.conjugate_synthesis:
            kc = np.where(line_mask, kc, _hermitian_mirror(kc, n))
    filt = acq.kspace_filter()
    image = scipy.fft.ifft2(scipy.fft.ifftshift(_zero_pad(kc * filt, n)), norm="ortho")
    if amplified:
        noise_image = scipy.fft.ifft2(scipy.fft.ifftshift(_zero_pad(noise * line_mask * filt, n)),
                                      norm="ortho")
        image = image + noise_image * maps.g_factor
    magnitude = np.abs(image).astype(np.float32)
    if acq.intensity_correction > 0:
        magnitude *= maps.intensity_correction(acq.intensity_correction)
    return magnitude


def add_cardiac_ghosts(obj: np.ndarray, fractions: np.ndarray, phase_axis: int,
                       amplitude: float) -> np.ndarray:
    """Replicas of the beating heart along the phase-encoding direction."""
    if amplitude <= 0:
        return obj
    heart = fractions[TISSUE_INDEX["myocardium"]] + fractions[TISSUE_INDEX["blood"]]
    source = obj * heart
    n = obj.shape[phase_axis]
    out = obj.copy()
    shift = int(round(n / 7))
    out += amplitude * np.roll(source, shift, axis=phase_axis)
    out += (0.6 * amplitude) * np.roll(source, -shift, axis=phase_axis)
    return out


def add_unfolding_ghost(obj: np.ndarray, phase_axis: int, amplitude: float = 0.03) -> np.ndarray:
    """Residual aliasing of a parallel-imaging (R=2) reconstruction at half the FOV."""
    return obj + amplitude * np.roll(obj, obj.shape[phase_axis] // 2, axis=phase_axis)


def simulate_slice(fractions: np.ndarray, model: SignalModel, acq: Acquisition, maps: FieldMaps,
                   fat_sat: str, rng: np.random.Generator | None) -> np.ndarray:
    """Magnitude image (float32, signal units) of one slice."""
    obj = transverse_magnetisation(fractions, model, maps.b1, fat_residual(maps, fat_sat))
    obj = add_cardiac_ghosts(obj, fractions, acq.phase_axis, maps.ghost_source)
    if acq.acceleration > 1:
        obj = add_unfolding_ghost(obj, acq.phase_axis)
    obj *= maps.coil
    return reconstruct(obj, acq, maps, rng)


def field_maps(rows_mm: np.ndarray, cols_mm: np.ndarray, field_tesla: float, b1_asymmetry: float,
               coil_elements: int, coil_depth_mm: float, shim_ppm: float, accelerated_axis: int,
               rng: np.random.Generator) -> FieldMaps:
    """Scanner-frame maps; rows_mm/cols_mm are pixel offsets from the image centre.

    The breast coil's wells sit in the anterior (top) part of the image, one per side.
    """
    Y, X = rows_mm[:, None].astype(np.float32), cols_mm[None, :].astype(np.float32)
    half = float(max(abs(cols_mm).max(), 1.0))
    xn, yn = X / half, Y / half
    # B1+: a left-right gradient and a central brightening, stronger at 3 T.
    strength = b1_asymmetry * rng.uniform(0.7, 1.3)
    central = (0.05 if field_tesla > 2.2 else 0.02) * rng.uniform(0.5, 1.5)
    b1 = 1.0 - strength * xn + central * (1 - xn ** 2 - yn ** 2)
    # Receive: loop elements ringed around each breast well, root-sum-of-squares.
    well_y = -0.35 * half
    n_side = max(coil_elements // 2, 2)
    coil_sq = np.zeros_like(X * Y)
    for side in (-1.0, 1.0):
        for k in range(n_side):
            ang = 2 * np.pi * (k + 0.5 * (side > 0)) / n_side
            ex = side * 0.45 * half + 0.35 * half * np.cos(ang)
            ey = well_y + 0.3 * half * np.sin(ang) - 0.1 * half
            gain = rng.uniform(0.85, 1.15)
            d2 = ((X - ex) ** 2 + (Y - ey) ** 2) / coil_depth_mm ** 2
            coil_sq += (gain / (1 + d2) ** 1.5) ** 2
    coil = np.sqrt(coil_sq)
    coil /= np.percentile(coil, 90)
    # Off-resonance grows towards the periphery (air-tissue interfaces, imperfect shim).
    phase = rng.uniform(0, 2 * np.pi)
    off = shim_ppm * ((xn ** 2 + 0.6 * (yn + 0.3) ** 2) * 0.55 * rng.uniform(0.7, 1.3)
                      + 0.2 * np.sin(2.5 * xn + phase) * np.cos(1.7 * yn))
    # g-factor for R=2: folded partners overlap most around the FOV centre line.
    pos = yn if accelerated_axis == 0 else xn
    across = xn if accelerated_axis == 0 else yn
    g = 1.0 + 0.35 * np.exp(-(pos / 0.45) ** 2) * (1 + 0.2 * np.cos(2 * across))
    ghost = float(rng.uniform(0.01, 0.05))
    return FieldMaps(b1.astype(np.float32), coil.astype(np.float32), off.astype(np.float32),
                     g.astype(np.float32), ghost)

