"""The synthetic cohort on disk: headers, files, determinism, reruns, contact sheet."""
import csv
import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, MRImageStorage

from data_prep.synthetic import cli, cohort, phantom
from data_prep.synthetic.contact_sheet import write_contact_sheet
from data_prep.synthetic.dicom_writer import PatientIdentity, series_uid, study_uid

from iap_jax.core.iaps import SPECS

SEED = 11
REQUIRED_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
    "Modality", "Manufacturer", "ManufacturerModelName", "PatientName", "PatientID",
    "PatientBirthDate", "StudyDate", "SeriesDescription", "SeriesNumber", "InstanceNumber",
    "ScanOptions", "PatientPosition", "MagneticFieldStrength", "AcquisitionMatrix",
    "SliceThickness", "FlipAngle", "EchoTime", "RepetitionTime", "Rows", "Columns",
    "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
    "PhotometricInterpretation", "WindowCenter", "WindowWidth", "PixelData")


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rows = cohort.generate_cohort(out, patients=3, seed=SEED, preset="small", phases="all")
    return out, rows


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_has_contract_columns_and_one_row_per_series(small_cohort):
    out, rows = small_cohort
    table = _read_csv(out / "cohort.csv")
    assert tuple(table[0].keys()) == cohort.CSV_COLUMNS
    assert len(table) == len(rows)
    series_dirs = {p.parent for p in out.rglob("*.dcm")}
    assert {out / r["series_dir"] for r in table} == series_dirs
    for r in table:
        assert r["ContrastBolusAgent_state"] in ("absent", "empty", "present")
        assert (r["ContrastBolusAgent"] != "") == (r["ContrastBolusAgent_state"] == "present")
        assert r["breast_density"] in phantom.DENSITY_CLASSES
        assert len(list((out / r["series_dir"]).glob("*.dcm"))) == int(r["n_slices"])
    # Each patient has a non-fat-sat T1, a pre-contrast and post-contrast DCE series.
    for pid in {r["patient_id"] for r in table}:
        mine = [r for r in table if r["patient_id"] == pid]
        assert {r["series_role"] for r in mine} == {"t1_nonfs", "dce"}
        phases = sorted(int(r["phase"]) for r in mine if r["series_role"] == "dce")
        assert phases[0] == 0 and phases[-1] >= 2


@pytest.fixture(scope="module")
def cohort_files(small_cohort):
    """(cohort.csv row, its series' files in order, each file read) per series, read once."""
    out, _ = small_cohort
    series = []
    for row in _read_csv(out / "cohort.csv"):
        files = sorted((out / row["series_dir"]).glob("*.dcm"))
        series.append((row, files, [pydicom.dcmread(path) for path in files]))
    return series


def test_files_are_mr_image_storage_with_every_required_tag(cohort_files):
    for row, files, datasets in cohort_files:
        for k, (path, ds) in enumerate(zip(files, datasets)):
            assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            missing = [t for t in REQUIRED_TAGS if t not in ds]
            assert not missing, f"{path}: missing {missing}"
            assert int(ds.InstanceNumber) == k + 1
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns) == (int(row["rows"]),) * 2
        assert len({ds.SOPInstanceUID for ds in datasets}) == len(files)


def test_headers_match_the_csv(cohort_files):
    for row, _, datasets in cohort_files:
        for ds in datasets:
            assert ds.PatientID == row["patient_id"]
            assert ds.Manufacturer == row["Manufacturer"]
            assert ds.ManufacturerModelName == row["ManufacturerModelName"]
            assert "\\".join(ds.ScanOptions if ds.ScanOptions else []) == row["ScanOptions"] or (
                str(ds.ScanOptions) == row["ScanOptions"])
            matrix, _ = SPECS["AcquisitionMatrix"].canonicalise(ds.AcquisitionMatrix)
            assert matrix == row["AcquisitionMatrix"]
            assert ds.PatientPosition == row["PatientPosition"]
            assert float(ds.MagneticFieldStrength) == float(row["MagneticFieldStrength"])
            assert float(ds.EchoTime) == float(row["EchoTime"])
            assert float(ds.RepetitionTime) == float(row["RepetitionTime"])
            assert float(ds.FlipAngle) == float(row["FlipAngle"])
            assert float(ds.SliceThickness) == float(row["SliceThickness"])
            fov = float(ds.get("ReconstructionDiameter", float(ds.PixelSpacing[1]) * ds.Columns))
            assert fov == pytest.approx(float(row["FOV"]), abs=1e-3)
            state = row["ContrastBolusAgent_state"]
            assert ("ContrastBolusAgent" in ds) == (state != "absent")
            if state != "absent":
                assert (ds.ContrastBolusAgent or "") == row["ContrastBolusAgent"]
            if row["series_role"] == "dce":
                assert int(ds.TemporalPositionIdentifier) == int(row["phase"]) + 1


def test_orientation_follows_the_patient_position(cohort_files):
    """Feet-first flips left-right; the slice location is the position along the bore."""
    for _, _, datasets in cohort_files:
        for ds in datasets:
            row_dir = [float(v) for v in ds.ImageOrientationPatient[:3]]
            assert row_dir == ([-1.0, 0.0, 0.0] if ds.PatientPosition == "FFP" else [1.0, 0.0, 0.0])
            assert float(ds.SliceLocation) == pytest.approx(float(ds.ImagePositionPatient[2]))


def test_dcmdump_reads_every_file(small_cohort):
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmdump (Debian package dcmtk) is not on PATH")
    out, _ = small_cohort
    files = sorted(out.rglob("*.dcm"))
    for start in range(0, len(files), 100):
        batch = [str(f) for f in files[start:start + 100]]
        result = subprocess.run(["dcmdump", "-q", *batch], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[:2000]
        assert "E:" not in result.stderr, result.stderr[:2000]


def _files(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.dcm"))}


def test_same_seed_identical_and_workers_do_not_matter(tmp_path):
    cohort.generate_cohort(tmp_path / "a", patients=2, seed=SEED, preset="small", workers=1)
    cohort.generate_cohort(tmp_path / "b", patients=2, seed=SEED, preset="small", workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a.keys() == b.keys() and a
    assert all(a[k] == b[k] for k in a)
    assert (tmp_path / "a" / "cohort.csv").read_text() == (tmp_path / "b" / "cohort.csv").read_text()


def test_patient_ids_and_uids_never_repeat_within_a_cohort(small_cohort):
    ids = [cohort.patient_id(SEED, i) for i in range(200_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 8 and i.isdigit() and i[0] != "0" for i in ids)
    assert cohort.patient_id(SEED, 0) != cohort.patient_id(SEED + 1, 0)
    with pytest.raises(ValueError, match="index"):
        cohort.patient_id(SEED, -1)
    # Two patients with the same ID (e.g. from two cohorts) still get distinct UIDs.
    a = PatientIdentity("12345678", 0, "A^B", "19700101", 50, 70, "20200101", "120000", "A1", "X")
    b = dataclasses.replace(a, patient_index=1)
    assert study_uid(SEED, a) != study_uid(SEED, b)
    assert series_uid(SEED, a, 3) != series_uid(SEED, b, 3)
    out, _ = small_cohort
    studies = {}
    for path in sorted(out.rglob("0001.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        studies.setdefault(ds.PatientID, set()).add(ds.StudyInstanceUID)
    assert len(studies) == 3 and all(len(uids) == 1 for uids in studies.values())
    assert len(set.union(*studies.values())) == 3


def test_cli_rejects_a_cohort_of_no_patients(tmp_path, capsys):
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["--out", str(tmp_path), "--patients", bad])
        assert exit_info.value.code == 2
        assert "--patients" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_different_seeds_give_different_anatomy():
    xs = ys = np.linspace(-150, 150, 96)
    maps = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        anatomy = phantom.Phantom(phantom.sample_params(rng), rng, 3.0)
        maps.append(anatomy.fractions(xs, ys - 60, 0.0, 2.0))
    assert np.abs(maps[0] - maps[1]).mean() > 0.02


def test_rerun_into_same_folder_leaves_no_duplicates(small_cohort, tmp_path):
    out = tmp_path / "rerun"
    cohort.generate_cohort(out, patients=2, seed=SEED, preset="small")
    before = _files(out)
    # A half-written series from a killed run and a removed series must both be repaired.
    series_dir = next(p for p in out.rglob("*.dcm")).parent
    stale = series_dir.parent / f".tmp-{series_dir.name}-99999"
    stale.mkdir()
    (stale / "0001.dcm").write_bytes(b"partial")
    shutil.rmtree(series_dir)
    rows = cohort.generate_cohort(out, patients=2, seed=SEED, preset="small")
    after = _files(out)
    assert after == before
    assert not any(p.name.startswith(".tmp") for p in series_dir.parent.iterdir())
    assert len(_read_csv(out / "cohort.csv")) == len(rows)
    assert len({r["series_dir"] for r in rows}) == len(rows)


def test_cli_writes_cohort_summary_and_contact_sheet(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["--out", str(out), "--patients", "1", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "slices/s" in printed and "total" in printed
    png = out / "contact_sheet.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_contact_sheet_names_missing_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="cohort.csv"):
        write_contact_sheet(tmp_path, tmp_path / "x.png")


def test_slices_option_spreads_few_slices_over_the_slab(small_cohort, tmp_path):
    out = tmp_path / "few"
    rows = cohort.generate_cohort(out, patients=1, seed=SEED, preset="small", slices=3)
    (full_row,) = [r for r in small_cohort[1] if r["series_role"] == "dce" and r["phase"] == 0][:1]
    for row in rows:
        files = sorted((out / row["series_dir"]).glob("*.dcm"))
        assert row["n_slices"] == len(files) == 3
    series = next(r for r in rows if r["series_role"] == "dce")
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation)
         for f in sorted((out / series["series_dir"]).glob("*.dcm"))]
    # The same patient's default series (20 slices) spans the same slab: first and last agree.
    full = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).SliceLocation)
                  for f in (small_cohort[0] / full_row["series_dir"]).glob("*.dcm"))
    assert len(full) == cohort.SMALL_SLICES
    assert sorted(z) == pytest.approx([full[0], sorted(z)[1], full[-1]])
    assert full[0] < sorted(z)[1] < full[-1]


def test_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "cohort"
    cohort.generate_cohort(out, patients=1, seed=SEED, preset="small", slices=2)
    with pytest.raises(ValueError, match=r"slices 2 -> 3"):
        cohort.generate_cohort(out, patients=1, seed=SEED, preset="small", slices=3)
    assert cli.main(["--out", str(out), "--patients", "1", "--seed", str(SEED + 1),
                     "--slices", "2"]) == 2
    assert "seed 11 -> 12" in capsys.readouterr().err
    # The same settings add patients to the cohort.
    rows = cohort.generate_cohort(out, patients=2, seed=SEED, preset="small", slices=2)
    assert len({r["patient_id"] for r in rows}) == 2


def test_rerun_into_the_same_folder_touches_no_file(tmp_path):
    out = tmp_path / "cohort"
    cohort.generate_cohort(out, 2, seed=4, preset="small", slices=2)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    cohort.generate_cohort(out, 2, seed=4, preset="small", slices=2)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before  # so iap-prep's archive fingerprint is unchanged
