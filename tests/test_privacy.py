"""Issue 18 item 1: no name taken from the input in any output but paths.local.json.

A copy of the synthetic cohort is renamed as real exports name their files: each folder
after the patient's ID and study UID, each file `<PATIENT NAME>.MR.<series UID>.<instance
UID>.IMA` (a Siemens export) or by its SOPInstanceUID (an XA export), with a truncated file
and a second copy of one file among them. Prep, prediction, the sort manifest with its links
and the evaluation report are then searched, byte for byte, for every name, ID and UID.
"""
import csv
import json
import os
import shutil

import pyarrow.parquet as pq
import pydicom
import pytest

from data_prep.cli import main as prep_main
from predict_data import SALT

from iap_jax.analysis import evaluate, sort, sort_cli
from iap_jax.analysis import report as report_lib
from iap_jax.io import local_paths
from iap_jax.prediction.predict_cli import main as predict_main


def _rename_like_real_exports(source: str, target: str) -> set[str]:
    """The cohort under names that hold identifiers; returns those identifiers."""
    secrets = set()
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(source) for n in names
                   if n.endswith(".dcm"))
    for index, path in enumerate(files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name, patient = str(ds.PatientName), str(ds.PatientID)
        series, study, instance = ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPInstanceUID
        secrets |= {name, patient, series, study, instance, name.replace("^", " ")}
        folder = os.path.join(target, f"{patient}_{name}", study)
        file = (f"{name}.MR.{series}.{instance}.IMA" if index % 2 else f"{instance}.dcm")
        os.makedirs(folder, exist_ok=True)
        shutil.copy(path, os.path.join(folder, file))
    # A truncated file and a second copy of the last file: skips that name files.
    data = open(path, "rb").read()
    open(os.path.join(folder, f"{name}.MR.{series}.broken.IMA"), "wb").write(data[:len(data) // 3])
    shutil.copy(path, os.path.join(target, f"{patient}_{name}", f"copy of {file}"))
    return {s for s in secrets if len(s) >= 4}


def _leaks(folder, secrets: set[str], allowed=(local_paths.FILE_NAME,)) -> list[tuple[str, str]]:
    """(output, identifier) for every identifier found in a file or file name under folder
    (Parquet tables are searched as their values, not only their bytes)."""
    found = []
    for parent, dirs, names in os.walk(folder):
        for name in dirs + names:
            found += [(os.path.join(parent, name), s) for s in secrets if s in name]
        for name in names:
            if name in allowed:
                continue
            path = os.path.join(parent, name)
            if os.path.islink(path):
                continue  # a link's target is the input folder it was asked to point at
            data = open(path, "rb").read()
            if name.endswith(".parquet") and data[:4] == b"PAR1":
                data += json.dumps(pq.read_table(path).to_pylist(), default=str).encode()
            found += [(path, s) for s in secrets if s.encode() in data]
    return found


@pytest.fixture(scope="module")
def named_archive(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    secrets = _rename_like_real_exports(trained_run.dicom_root, str(root / "archive"))
    return str(root / "archive"), secrets


def test_prep_outputs_name_files_by_key_and_paths_only_in_the_local_file(named_archive, tmp_path, capsys):
    archive, secrets = named_archive
    data_dir = tmp_path / "data"
    assert prep_main(["--dicom-root", archive, "--data-dir", str(data_dir), "--image-size", "16",
                      "--salt", SALT, "--workers", "1"]) == 0
    console = capsys.readouterr()
    assert not [s for s in secrets if s in console.out + console.err]
    assert not _leaks(data_dir, secrets)
    report = json.load(open(data_dir / "prep_report.json"))
    kept = local_paths.read(str(data_dir))
    assert kept["root"] == os.path.abspath(archive) and "Personal data" in kept["notice"]
    skipped = {kept["files"][s["file"]]: s for s in report["skipped"]}
    reasons = {os.path.basename(p): s["reason"] for p, s in skipped.items()}
    assert sorted(reasons.values()) == ["duplicate_sop_instance", "truncated"]
    duplicate = next(s for s in skipped.values() if s["reason"] == "duplicate_sop_instance")
    original = duplicate["detail"].rsplit("file ", 1)[1].rstrip(")")
    assert os.path.basename(kept["files"][original]) == next(
        p for p in reasons if p.startswith("copy of")).removeprefix("copy of ")
    # The local file is the only one with the names, and it maps every key the report names.
    assert _leaks(data_dir, secrets, allowed=())
    assert set(kept["files"]) == {s["file"] for s in report["skipped"]} | {original}

    quiet = tmp_path / "quiet"
    assert prep_main(["--dicom-root", archive, "--data-dir", str(quiet), "--image-size", "16",
                      "--salt", SALT, "--workers", "1", "--no-local-paths"]) == 0
    assert not (quiet / local_paths.FILE_NAME).exists() and not _leaks(quiet, secrets, allowed=())
    assert json.load(open(quiet / "prep_report.json"))["skipped"] == report["skipped"]


def test_prediction_sort_and_report_name_no_input(named_archive, trained_run, tmp_path, capsys):
    archive, secrets = named_archive
    out = tmp_path / "pred"
    common = ["--workdir", trained_run.workdir, "--input", archive, "--salt", SALT, "--quiet",
              "--workers", "1"]
    assert predict_main([*common, "--out", str(out), "--csv"]) == 0
    links = tmp_path / "links"
    assert sort_cli.main(["--predictions", str(out), "--out", str(tmp_path / "manifest.csv"),
                      "--min-confidence", "0", "--link-into", str(links)]) == 0
    files = report_lib.write_report(evaluate.evaluate(str(out), resamples=20), str(tmp_path / "report"),
                                      str(out))
    assert files and not [s for s in secrets if s in "".join(capsys.readouterr())]
    assert not _leaks(tmp_path, secrets)
    report = json.load(open(out / "predict_report.json"))
    assert report["outputs"]["local_paths"] == local_paths.FILE_NAME
    assert {s["reason"] for s in report["skipped"]} == {"duplicate_sop_instance", "truncated"}
    # Through the local file, each row and skip leads back to its file, each link to its
    # series' folder.
    kept = local_paths.read(str(out))
    rows = pq.read_table(out / "slices.parquet").to_pylist()
    for row in rows:
        ds = pydicom.dcmread(os.path.join(kept["root"], kept["files"][row["file_key"]]),
                             stop_before_pixels=True)
        assert row["Manufacturer_header"] == ds.Manufacturer and row["frame"] == 0
    manifest = list(csv.DictReader(open(tmp_path / "manifest.csv")))
    assert len(manifest) == len({r["series_key"] for r in rows}) and "folder" not in manifest[0]
    targets = [os.readlink(links / d / n) for d in os.listdir(links) for n in os.listdir(links / d)]
    assert len(targets) == len(manifest) and all(t.startswith(archive) for t in targets)

    # Without the local file: the same tables, no file names the input, and what needs the
    # paths says so.
    quiet = tmp_path / "quiet"
    assert predict_main([*common, "--out", str(quiet), "--no-local-paths"]) == 0
    assert not (quiet / local_paths.FILE_NAME).exists() and not _leaks(quiet, secrets, allowed=())
    assert pq.read_table(quiet / "slices.parquet").equals(pq.read_table(out / "slices.parquet"))
    with pytest.raises(ValueError, match="no-local-paths"):
        sort.sort_series(str(quiet), None, str(tmp_path / "m.csv"), 0.0, str(tmp_path / "l2"))
