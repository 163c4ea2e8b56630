"""PNG contact sheet of a synthetic cohort: a middle slice per scanner and phase."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom

from data_prep.synthetic.cohort import CSV_NAME


def _middle_slice(series_dir: Path) -> np.ndarray:
    files = sorted(series_dir.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"{series_dir}: no .dcm files")
    return pydicom.dcmread(files[len(files) // 2]).pixel_array.astype(np.float32)


def _column_label(row: dict) -> str:
    if row["series_role"] == "t1_nonfs":
        return "T1 non-FS"
    return "pre-contrast FS" if row["phase"] == "0" else f"post {row['phase']}"


def write_contact_sheet(cohort_dir, png_path) -> Path:
    """One row per scanner (model + field), one column per series kind of its first patient."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cohort_dir = Path(cohort_dir)
    csv_path = cohort_dir / CSV_NAME
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: cohort.csv not found (generate the cohort first)")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    first_patient: dict[str, str] = {}
    for row in rows:
        first_patient.setdefault(row["scanner"], row["patient_id"])
    scanners = sorted(first_patient)
    columns = ["T1 non-FS", "pre-contrast FS"] + [f"post {k}" for k in range(1, 5)]
    present = [c for c in columns if any(_column_label(r) == c for r in rows)]
    # Scanners side by side, several per figure row, so the sheet stays near square.
    per_row = max(1, 10 // len(present))
    grid_rows = -(-len(scanners) // per_row)
    fig, axes = plt.subplots(grid_rows, per_row * len(present),
                             figsize=(2.3 * per_row * len(present), 3.3 * grid_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, scanner in enumerate(scanners):
        series = {_column_label(r): r for r in rows
                  if r["scanner"] == scanner and r["patient_id"] == first_patient[scanner]}
        for j, column in enumerate(present):
            ax = axes[i // per_row, (i % per_row) * len(present) + j]
            row = series.get(column)
            if row is None:
                continue
            image = _middle_slice(cohort_dir / row["series_dir"])
            hi = np.percentile(image, 99.5) or 1.0
            ax.imshow(image, cmap="gray", vmin=0, vmax=hi, interpolation="bilinear")
            title = column
            if j == 0:
                title = (f"{row['ManufacturerModelName']} {row['MagneticFieldStrength']}T "
                         f"{row['PatientPosition']}\n{row['ScanOptions'] or '-'}\n"
                         f"{row['AcquisitionMatrix']} FA{row['FlipAngle']} TR{row['RepetitionTime']}"
                         f"\n{column}")
            ax.set_title(title, fontsize=6)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path
