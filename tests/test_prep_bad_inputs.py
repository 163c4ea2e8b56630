"""Every kind of bad input is skipped with its reason, through the iap-prep command."""
import json
import os
import shutil

import pydicom
import pytest
import tensorflow_datasets as tfds
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, generate_uid

import prep_series
from local_paths_view import by_path
from data_prep.builder import REPORT_FILE
from data_prep.cli import main


def pre_series_file(patients, patient_id):
    folder = patients[patient_id][1][1]
    return os.path.join(folder, sorted(os.listdir(folder))[0])


@pytest.fixture(scope="module")
def bad_archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad"))
    patients = prep_series.write_duke_cohort(root, 2, num_slices=4)
    good = pre_series_file(patients, "Breast_MRI_000")
    template = pydicom.dcmread(good)
    expected = {}

    def add(name, reason, content=None, dataset=None):
        path = os.path.join(root, "junk", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if dataset is not None:
            dataset.save_as(path, enforce_file_format=True)
        else:
            with open(path, "wb") as f:
                f.write(content)
        expected[os.path.relpath(path, root)] = reason
        return path

    add("empty.dcm", "zero_byte", b"")
    add("readme.txt", "not_dicom", b"exported by PACS\n")
    no_pixels = pydicom.dcmread(good)
    no_pixels.SOPInstanceUID = no_pixels.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del no_pixels.PixelData
    add("nopixels.dcm", "no_pixel_data", dataset=no_pixels)
    whole = open(good, "rb").read()
    add("truncated.dcm", "truncated", whole[:len(whole) - 300])
    add("copy_of_first.dcm", "duplicate_sop_instance", whole)
    add("DICOMDIR", "non_image", open(os.path.join(os.path.dirname(get_testdata_file("MR_small.dcm")),
                                                  "dicomdirtests", "DICOMDIR"), "rb").read())
    add("MR_truncated.dcm", "truncated", open(get_testdata_file("MR_truncated.dcm"), "rb").read())
    bigger = prep_series.make_instance(
        patient_id="Breast_MRI_000", patient_name="Doe^Breast_MRI_000", birth_date="19700101",
        study_uid=template.StudyInstanceUID, series_uid=template.SeriesInstanceUID,
        description=template.SeriesDescription, index=9, position=30.0, rows=32, columns=32,
        tags=prep_series.SIEMENS)
    add("bigger.dcm", "mixed_sizes", dataset=bigger)
    corrupt = prep_series.make_instance(
        patient_id="Breast_MRI_000", patient_name="Doe^Breast_MRI_000", birth_date="19700101",
        study_uid=template.StudyInstanceUID, series_uid=template.SeriesInstanceUID,
        description=template.SeriesDescription, index=10, position=40.0, tags=prep_series.SIEMENS)
    corrupt.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    corrupt.file_meta.TransferSyntaxUID = JPEG2000Lossless
    add("corrupt_j2k.dcm", "undecodable", dataset=corrupt)
    locked = os.path.join(root, "junk", "locked.dcm")
    shutil.copy(good, locked)
    ds = pydicom.dcmread(locked)  # a distinct instance, so not a duplicate
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [-100.0, -100.0, 50.0]
    ds.save_as(locked)
    expected[os.path.relpath(locked, root)] = "unreadable"
    return root, expected, locked


def test_bad_inputs_are_reported_and_good_slices_kept(bad_archive, tmp_path, capsys, monkeypatch):
    root, expected, locked = bad_archive
    real_dcmread = pydicom.dcmread

    def dcmread_without_permission(path, *args, **kwargs):
        # File modes do not stop root (CI containers), so the refusal is simulated.
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", dcmread_without_permission)
    data_dir = str(tmp_path / "out")
    # One worker: the patched reader must be the one that runs (workers are spawned).
    assert main(["--dicom-root", root, "--data-dir", data_dir, "--image-size", "16",
                 "--split", "1,0,0", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    dataset_dir = out.strip().splitlines()[-1]
    assert "skipped" in out and "used" in out
    with open(os.path.join(data_dir, REPORT_FILE)) as f:
        report = json.load(f)
    reasons = {path: s["reason"] for path, s in by_path(report["skipped"], data_dir).items()}
    assert reasons == expected
    assert report["skipped_by_reason"] == {r: list(expected.values()).count(r) for r in set(expected.values())}
    assert report["files"]["skipped"] == len(expected)
    assert all(s["detail"] or s["reason"] in ("zero_byte", "no_pixel_data") for s in report["skipped"])
    examples = list(tfds.as_numpy(tfds.builder_from_directory(dataset_dir).as_dataset(split="train")))
    # Two pre-contrast series of 4 slices; the locked file is not among them.
    assert len(examples) == 8


def test_command_line_errors_are_clear(tmp_path, capsys):
    assert main(["--dicom-root", str(tmp_path / "missing"), "--data-dir", str(tmp_path)]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["--dicom-root", str(tmp_path), "--data-dir", str(tmp_path / "o"), "--slices", "half"]) == 2
    assert "slices" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("x")
    assert main(["--dicom-root", str(tmp_path), "--data-dir", str(tmp_path / "o")]) == 2
    assert "no slices selected" in capsys.readouterr().err
    # An unusable data dir (here: below a regular file) is an OSError: a message, not a traceback.
    assert main(["--dicom-root", str(tmp_path), "--data-dir", str(tmp_path / "a.txt" / "o")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("iap-prep: error:") and "a.txt" in error
