"""Patients -> series: the synthetic cohort, written in parallel, and cohort.csv.

Determinism: patient i draws everything from child i of numpy's SeedSequence(seed), so
its files do not depend on the worker count or on the other patients. Its PatientID is a
bijection of i (8 digits, offset by the seed), so PatientIDs, and the UIDs derived from
them and from i, never repeat within a cohort. Only the scanner
assignment looks at the cohort: when a cohort has at least as many patients as the
catalog has scanners, its first patients cover every scanner once (in a seeded order) so
that small demo cohorts show them all; the rest follow the Duke cohort weights.

Presets: `full` writes the real Rows/Columns and slice counts. `small` scales the
simulated grid by SMALL_SCALE in-plane (512 -> 128, 448 -> 112, 320 -> 80): the
acquired k-space matrix is scaled by the same factor, so the ratio of acquired to
reconstructed resolution (Gibbs ringing, zero-fill blur, partial Fourier) and the FOV
are kept; PixelSpacing = FOV / Columns stays consistent, while AcquisitionMatrix keeps
the catalog's real values as the label. Noise is set from the real protocol's SNR. The
small preset writes SMALL_SLICES slices spread evenly over the real slab.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from data_prep.synthetic import acquisition, phantom, scanners, tissues
from data_prep.synthetic.dicom_writer import (EnhancedSeriesEncoder, PatientIdentity,
                                              SliceGeometry, format_number, SeriesEncoder,
                                              max_stored_value, pixel_dtype, series_template)
from data_prep.synthetic.scanners import CATALOG, SeriesProtocol

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.core.progress import LOG_EVERY_S, is_terminal

SMALL_SCALE = 0.25
SMALL_SLICES = 20
CSV_NAME = "cohort.csv"
IAP_COLUMNS = IAP_NAMES
CSV_COLUMNS = (("patient_id", "series_dir", "series_description", "series_role", "phase",
                "fat_suppressed", "n_slices", "rows", "columns") + IAP_COLUMNS
               + ("ContrastBolusAgent_state", "scanner", "study_year", "agent_used",
                  "real_n_slices", "real_rows", "patient_age", "body_width_mm",
                  "breast_volume_ml", "breast_density", "fgt_target_fraction", "bpe",
                  "has_lesion", "lesion_side", "lesion_diameter_mm", "lesion_kinetics"))
# Pixel value the pre-contrast fat signal (no fat suppression) is scaled to, per vendor.
TARGET_FAT_VALUE = {scanners.GE: 1400.0, scanners.SIEMENS: 900.0}

FIRST_NAMES = ("MARY", "PATRICIA", "LINDA", "BARBARA", "ELIZABETH", "JENNIFER", "MARIA",
               "SUSAN", "MARGARET", "DOROTHY", "LISA", "NANCY", "KAREN", "BETTY", "HELEN",
               "SANDRA", "DONNA", "CAROL", "RUTH", "SHARON", "MICHELLE", "LAURA", "SARAH",
               "KIMBERLY", "DEBORAH", "JESSICA", "SHIRLEY", "CYNTHIA", "ANGELA", "MELISSA")
LAST_NAMES = ("SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS",
              "RODRIGUEZ", "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON",
              "THOMAS", "TAYLOR", "MOORE", "JACKSON", "MARTIN", "LEE", "PEREZ", "THOMPSON",
              "WHITE", "HARRIS", "SANCHEZ", "CLARK", "RAMIREZ", "LEWIS", "ROBINSON")
INSTITUTIONS = {scanners.GE: ("UNIVERSITY MEDICAL CENTER", "NORTH CAMPUS IMAGING"),
                scanners.SIEMENS: ("REGIONAL CANCER INSTITUTE", "WOMENS IMAGING CENTER")}


@dataclass(frozen=True)
class Preset:
    scale: float
    slices: int | None  # None: the real slice count
    field_grid_mm: float  # spacing of the coarse 3D texture fields


PRESETS = {"small": Preset(SMALL_SCALE, SMALL_SLICES, 2.5), "full": Preset(1.0, None, 1.25)}


@dataclass(frozen=True)
class PatientTask:
    out_dir: str
    index: int
    seed: int
    scanner_index: int
    preset: str
    phases: str
    variant_index: int | None = None  # force a protocol version (tests, benchmarks)
    max_slices: int | None = None  # write fewer slices than the preset (tests)
    slices: int | None = None  # slices per series spread over the slab (default: the preset's)
    enhanced: float = 0.0  # share of series written as one Enhanced MR multi-frame file


def is_enhanced(task: PatientTask, protocol: SeriesProtocol) -> bool:
    """Whether a series is written as an Enhanced MR multi-frame file: a seeded draw per
    series, independent of the worker count and of the other series."""
    if task.enhanced <= 0 or task.enhanced >= 1:
        return task.enhanced >= 1
    draw = zlib.crc32(f"enhanced:{task.seed}:{task.index}:{protocol.series_number}".encode())
    return draw / 2 ** 32 < task.enhanced


@dataclass
class PatientResult:
    rows: list
    slices_written: int
    seconds: float
    scanner_key: str


def assign_scanners(patients: int, seed: int) -> list[int]:
    """Catalog index per patient (see module docstring)."""
    rng = np.random.default_rng([seed, 7919])
    weights = scanners.scanner_weights()
    chosen = list(rng.choice(len(CATALOG), size=patients, p=weights))
    if patients >= len(CATALOG):
        chosen[: len(CATALOG)] = list(rng.permutation(len(CATALOG)))
    return [int(c) for c in chosen]


def patient_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed).spawn(index + 1)[index]


PATIENT_ID_SPAN = 9 * 10**7  # 8-digit IDs: 10000000 .. 99999999
PATIENT_ID_STEP = 48271  # coprime with PATIENT_ID_SPAN: index -> ID is one-to-one


def patient_id(seed: int, index: int) -> str:
    """An 8-digit PatientID, unique per cohort (a bijection of the index), that looks random."""
    if not 0 <= index < PATIENT_ID_SPAN:
        raise ValueError(f"patient index {index} outside 0..{PATIENT_ID_SPAN - 1}")
    offset = zlib.crc32(f"patient-id:{seed}".encode())
    return str(10**7 + (offset + index * PATIENT_ID_STEP) % PATIENT_ID_SPAN)


def _identity(rng: np.random.Generator, protocol: SeriesProtocol, age: int, seed: int,
              index: int) -> PatientIdentity:
    year = protocol.year
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    birth_year = year - age
    bmonth, bday = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    institution = INSTITUTIONS[protocol.scanner.manufacturer][int(rng.integers(0, 2))]
    return PatientIdentity(
        patient_id=patient_id(seed, index), patient_index=index,
        patient_name=f"{LAST_NAMES[rng.integers(len(LAST_NAMES))]}^{FIRST_NAMES[rng.integers(len(FIRST_NAMES))]}",
        birth_date=f"{birth_year:04d}{bmonth:02d}{bday:02d}", age=age,
        weight_kg=int(rng.normal(74, 14)), study_date=f"{year:04d}{month:02d}{day:02d}",
        study_time=f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
        accession_number=f"A{int(rng.integers(10**8, 10**9))}", institution=institution)


def _folder_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in " -_." else "" for c in text)
    return keep.strip() or "series"


def _slice_indices(n_real: int, preset: Preset) -> np.ndarray:
    if preset.slices is None or preset.slices >= n_real:
        return np.arange(n_real)
    if preset.slices == 1:
        return np.array([n_real // 2])
    return np.unique(np.round(np.linspace(0, n_real - 1, preset.slices)).astype(int))


def _geometry(protocol: SeriesProtocol, preset: Preset, anterior_y: float, z_offset: float,
              max_slices: int | None = None) -> tuple[SliceGeometry, np.ndarray, np.ndarray]:
    """Stored grid and the patient-frame x of each column / y of each row."""
    size = int(round(protocol.recon_size * preset.scale))
    spacing = protocol.fov_mm / size
    centred = (np.arange(size) + 0.5 - size / 2) * spacing
    feet_first = protocol.patient_position == "FFP"
    xs = -centred if feet_first else centred
    ys = anterior_y - 12.0 + (np.arange(size) + 0.5) * spacing
    n_real = protocol.n_slices
    real_z = (np.arange(n_real) - (n_real - 1) / 2) * protocol.slice_spacing_mm + z_offset
    if feet_first:
        real_z = real_z[::-1]
    z = real_z[_slice_indices(n_real, preset)]
    if max_slices is not None and len(z) > max_slices:
        middle = len(z) // 2
        z = z[middle - max_slices // 2: middle - max_slices // 2 + max_slices]
    geometry = SliceGeometry(
        size=size, pixel_spacing_mm=spacing,
        row_direction=(-1.0, 0.0, 0.0) if feet_first else (1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        first_pixel_xy=(float(xs[0]), float(ys[0])),
        slice_z=tuple(float(v) for v in z))
    return geometry, xs, ys


def _acquisition(protocol: SeriesProtocol, preset: Preset, size: int) -> acquisition.Acquisition:
    scanner = protocol.scanner
    freq, phase = protocol.acquisition_matrix
    voxel = (protocol.fov_mm / freq) * (protocol.fov_mm / phase) * protocol.slice_thickness_mm
    partitions = int(round(protocol.n_slices * protocol.slice_spacing_mm / protocol.slice_thickness_mm))
    snr = acquisition.relative_snr(scanner.field_written, voxel, phase * protocol.partial_fourier,
                                   partitions, protocol.acceleration, scanner.pixel_bandwidth_hz,
                                   scanner.coil_elements)
    # Reference noise: an Avanto VIBE pre-contrast series gives fibroglandular SNR ~ 15-20.
    noise_sigma = 0.008 / snr
    sim_freq = min(size, int(round(freq * preset.scale)))
    sim_phase = min(size, int(round(phase * preset.scale)))
    return acquisition.Acquisition(
        recon_size=size, acq_frequency=sim_freq, acq_phase=sim_phase,
        phase_axis=0 if scanner.is_ge else 1, partial_fourier=protocol.partial_fourier,
        conjugate_synthesis=scanner.is_ge, acceleration=protocol.acceleration,
        filter_radius=scanner.recon_filter[0], filter_width=scanner.recon_filter[1],
        noise_sigma=noise_sigma, intensity_correction=scanner.intensity_correction)


def _signal_model(protocol: SeriesProtocol, params: phantom.PhantomParams) -> acquisition.SignalModel:
    field = protocol.scanner.field_written
    r1 = tissues.AGENTS[protocol.agent_used].r1_per_mm_s[tissues.field_index(field)]
    conc = tissues.concentrations(protocol.minutes_after_injection,
                                  params.lesion_kinetics, phantom.BPE_LEVELS[params.bpe])
    return acquisition.signal_model(field, protocol.flip_angle, protocol.tr_ms, protocol.te_ms,
                                    r1_agent=r1, conc=conc)


def _fat_reference(protocol: SeriesProtocol) -> float:
    """Noise-free signal of adipose tissue without fat suppression at B1 = 1."""
    model = acquisition.signal_model(protocol.scanner.field_written, protocol.flip_angle,
                                     protocol.tr_ms, protocol.te_ms)
    fat = tissues.TISSUE_INDEX["fat"]
    return float(abs(model.water_poly[-1, fat] + model.fat_poly[-1] * model.fat_density[fat]
                     * (model.fat_saturable + model.fat_unsaturable)))


def series_dir_name(protocol: SeriesProtocol) -> str:
    return f"{protocol.series_number}.000000-{_folder_name(protocol.series_description)}"


def _row(protocol, identity, rel_dir, geometry, params, n_real_rows) -> dict:
    scanner = protocol.scanner
    freq, phase = protocol.acquisition_matrix
    row = {
        "patient_id": identity.patient_id, "series_dir": rel_dir,
        "series_description": protocol.series_description, "series_role": protocol.role,
        "phase": protocol.phase, "fat_suppressed": int(protocol.fat_sat != "none"),
        "n_slices": len(geometry.slice_z), "rows": geometry.size, "columns": geometry.size,
        "Manufacturer": scanner.manufacturer, "ManufacturerModelName": scanner.model,
        "ScanOptions": protocol.scan_options, "PatientPosition": protocol.patient_position,
        "MagneticFieldStrength": format_number(scanner.field_written),
        "ContrastBolusAgent": protocol.contrast_label or "",
        "AcquisitionMatrix": f"{freq}x{phase}",
        "SliceThickness": format_number(protocol.slice_thickness_mm),
        "FlipAngle": format_number(protocol.flip_angle), "FOV": format_number(protocol.fov_mm),
        "EchoTime": format_number(protocol.te_ms), "RepetitionTime": format_number(protocol.tr_ms),
        "ContrastBolusAgent_state": protocol.contrast_state, "scanner": scanner.key,
        "study_year": protocol.year, "agent_used": protocol.agent_used,
        "real_n_slices": protocol.n_slices, "real_rows": n_real_rows,
    }
    row.update(params.facts())
    return row


def generate_patient(task: PatientTask) -> PatientResult:
    """Simulate and write one patient's series; skips series already complete."""
    start = time.perf_counter()
    preset = PRESETS[task.preset]
    if task.slices is not None:
        preset = dataclasses.replace(preset, slices=task.slices)
    streams = patient_seed(task.seed, task.index).spawn(5)
    anatomy_rng, protocol_rng, maps_rng, identity_rng, noise_seq = (
        [np.random.default_rng(s) for s in streams[:4]] + [streams[4]])
    scanner = CATALOG[task.scanner_index]
    params = phantom.sample_params(anatomy_rng)
    plan = scanners.plan_patient_series(scanner, protocol_rng, params.body_width_mm,
                                        task.variant_index)
    if task.phases == "pre":
        plan = [p for p in plan if p.phase == 0]
    identity = _identity(identity_rng, plan[0], params.age, task.seed, task.index)
    z_offset = float(maps_rng.uniform(-8, 8))
    scale_jitter = float(maps_rng.uniform(0.8, 1.2))
    noise_seeds = noise_seq.spawn(len(plan))

    out = Path(task.out_dir)
    study_dir = Path(identity.patient_id) / f"{identity.study_date[4:6]}-{identity.study_date[6:]}-{identity.study_date[:4]}-BREAST MRI-{identity.accession_number[-5:]}"
    # Folders of a killed earlier run: its series are redone below.
    if (out / study_dir).is_dir():
        for stale in (out / study_dir).glob(".tmp-*"):
            shutil.rmtree(stale)
    anat = None
    geometry, xs, ys = None, None, None
    pending, rows = [], []
    for protocol, noise_seed in zip(plan, noise_seeds):
        if anat is None:
            anat = phantom.Phantom(params, anatomy_rng, preset.field_grid_mm)
            geometry, xs, ys = _geometry(protocol, preset, anat.anterior_extent_y(), z_offset,
                                         task.max_slices)
        rel_dir = study_dir / series_dir_name(protocol)
        rows.append(_row(protocol, identity, rel_dir.as_posix(), geometry, params, protocol.recon_size))
        if (out / rel_dir).is_dir():
            continue
        pending.append((protocol, rel_dir, np.random.default_rng(noise_seed)))

    written = 0
    if pending:
        size = geometry.size
        offsets = (np.arange(size) + 0.5 - size / 2) * geometry.pixel_spacing_mm
        maps = acquisition.field_maps(offsets, offsets, scanner.field_written, scanner.b1_asymmetry,
                                      scanner.coil_elements, scanner.coil_depth_mm, scanner.shim_ppm,
                                      0 if scanner.is_ge else 1, maps_rng)
        scale = {p.role: TARGET_FAT_VALUE[scanner.manufacturer] * scale_jitter / _fat_reference(p)
                 for p, _, _ in pending}
        jobs = []
        for protocol, rel_dir, rng in pending:
            tmp = out / rel_dir.parent / f".tmp-{rel_dir.name}-{os.getpid()}"
            tmp.mkdir(parents=True)
            level = TARGET_FAT_VALUE[scanner.manufacturer] * scale_jitter
            window = (0.5 * level, level) if protocol.fat_sat != "none" else (0.6 * level, 1.3 * level)
            jobs.append(dict(protocol=protocol, rel_dir=rel_dir, rng=rng, tmp=tmp,
                             model=_signal_model(protocol, params),
                             acq=_acquisition(protocol, preset, size),
                             encoder=(EnhancedSeriesEncoder if is_enhanced(task, protocol) else SeriesEncoder)(
                                 series_template(protocol, identity, geometry, task.seed, window),
                                 geometry, task.seed),
                             dtype=pixel_dtype(protocol), vmax=max_stored_value(protocol),
                             scale=scale[protocol.role]))
        thickness = plan[0].slice_thickness_mm
        for k, z in enumerate(geometry.slice_z):
            fractions = anat.fractions(xs, ys, z, thickness)
            for job in jobs:
                protocol = job["protocol"]
                image = acquisition.simulate_slice(fractions, job["model"], job["acq"], maps,
                                                   protocol.fat_sat, job["rng"])
                stored = np.clip(np.rint(image * job["scale"]), 0, job["vmax"]).astype(job["dtype"])
                job["encoder"].write(k, stored, job["tmp"] / f"{k + 1:04d}.dcm")
                written += 1
        for job in jobs:
            job["encoder"].close()
            final = out / job["rel_dir"]
            if final.exists():  # another run finished it meanwhile
                shutil.rmtree(job["tmp"])
            else:
                os.rename(job["tmp"], final)
    return PatientResult(rows, written, time.perf_counter() - start, scanner.key)


def write_csv(rows: list[dict], path: Path) -> None:
    """Writes cohort.csv, leaving an identical existing file untouched: its modification
    time is part of the archive fingerprint iap-prep checks on a rerun."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})
    if path.exists() and path.read_bytes() == tmp.read_bytes():
        tmp.unlink()
        return
    os.replace(tmp, path)


SETTINGS_NAME = "synth_settings.json"


def check_settings(out: Path, settings: dict) -> None:
    """Keeps the settings that decide every patient's files beside the cohort, and refuses
    to add to (or finish) a cohort that was written with different ones (a setting that
    is absent on one side counts as differing)."""
    path = out / SETTINGS_NAME
    if path.exists():
        kept = json.loads(path.read_text())
        changed = {k: (kept.get(k), settings.get(k)) for k in {**kept, **settings}
                   if kept.get(k) != settings.get(k)}
        if changed:
            described = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"{out} holds a cohort written with other settings ({described}); "
                             "choose another --out or delete it")
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_cohort(out_dir, patients: int, seed: int, preset: str = "small", phases: str = "pre",
               workers: int = 1, progress=None, slices: int | None = None, enhanced: float = 0.0,
               ) -> tuple[list[dict], list[PatientResult]]:
    """Generate the cohort; returns the cohort.csv rows and per-patient results.

    slices: slices per series, spread evenly over each patient's real slab (default: the
    preset's, 20 for small and every real slice for full). Many patients with few slices
    each teach a model more than few patients with many: neighbouring slices share anatomy.
    enhanced: the share of series (a seeded draw per series; 1: all) written as one Enhanced
    MR multi-frame file each instead of a file per slice, with the same pixels and IAPs.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if phases not in ("pre", "all"):
        raise ValueError(f"unknown phases {phases!r}; choose 'pre' or 'all'")
    if patients < 1:
        raise ValueError("patients must be at least 1")
    if slices is not None and slices < 1:
        raise ValueError("slices must be at least 1")
    if not 0 <= enhanced <= 1:
        raise ValueError(f"enhanced must be a share between 0 and 1, got {enhanced}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"seed": seed, "preset": preset, "slices": slices}
    if enhanced:  # (a cohort of classic files keeps the settings file it always had)
        settings["enhanced"] = enhanced
    check_settings(out, settings)
    tasks = [PatientTask(str(out), i, seed, s, preset, phases, slices=slices, enhanced=enhanced)
             for i, s in enumerate(assign_scanners(patients, seed))]
    results: list[PatientResult | None] = [None] * len(tasks)
    start = time.perf_counter()
    done_slices = 0

    def report(done: int):
        if progress is not None:
            progress(done, len(tasks), done_slices, time.perf_counter() - start)

    if workers <= 1:
        for i, task in enumerate(tasks):
            results[i] = generate_patient(task)
            done_slices += results[i].slices_written
            report(i + 1)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(generate_patient, t): i for i, t in enumerate(tasks)}
            for n, future in enumerate(as_completed(futures), start=1):
                result = future.result()
                results[futures[future]] = result
                done_slices += result.slices_written
                report(n)
    rows = [row for r in results for row in r.rows]
    write_csv(rows, out / CSV_NAME)
    return rows, results


def generate_cohort(out_dir, patients: int, seed: int, preset: str = "small", phases: str = "pre",
                    workers: int = 1, slices: int | None = None, enhanced: float = 0.0) -> list[dict]:
    """Write the cohort under out_dir; returns the rows of cohort.csv."""
    rows, _ = run_cohort(out_dir, patients, seed, preset, phases, workers, slices=slices,
                         enhanced=enhanced)
    return rows


class StderrProgress:
    """Patients done, slices/s and ETA: a rewritten line on a terminal, a new line every
    LOG_EVERY_S seconds in a log file."""

    def __init__(self):
        self.terminal = is_terminal(sys.stderr)
        self.every_s = 1.0 if self.terminal else LOG_EVERY_S
        self._last = -math.inf

    def __call__(self, done: int, total: int, slices: int, seconds: float) -> None:
        if done < total and seconds - self._last < self.every_s:
            return
        self._last = seconds
        rate = slices / seconds if seconds > 0 else 0.0
        eta = seconds / done * (total - done) if done else 0.0
        line = f"patients {done}/{total}  {rate:6.1f} slices/s  ETA {eta:5.0f}s"
        end = "\n" if done == total or not self.terminal else ""
        print(("\r" if self.terminal else "") + line, end=end, file=sys.stderr, flush=True)
