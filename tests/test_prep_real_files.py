"""iap-prep end to end on the real MR files shipped in pydicom, pydicom-data and nibabel."""
import collections
import glob
import json
import os
import shutil

import nibabel
import numpy as np
import pytest
import tensorflow_datasets as tfds
from pydicom.data import get_testdata_file

from data_prep.builder import REPORT_FILE, prepare
from local_paths_view import by_path

# One image in every encoding; the copies get distinct instance and series UIDs (below).
MR_SMALL_VARIANTS = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                     "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm")
MR_SMALL_UID_TAIL = b"20040826185059.5457"  # ends its SOP Instance and Series UIDs


def philips_series():
    root = os.path.dirname(get_testdata_file("MR_small.dcm"))
    return sorted(glob.glob(os.path.join(root, "dicomdirtests", "98892003", "MR1", "*")))


def nibabel_file(name):
    return os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", name)


@pytest.fixture(scope="module")
def real_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    for number, name in enumerate(MR_SMALL_VARIANTS):
        content = open(get_testdata_file(name), "rb").read()
        assert content.count(MR_SMALL_UID_TAIL) >= 2
        # Same length, so no element length changes, in any transfer syntax.
        unique = MR_SMALL_UID_TAIL[:-4] + f"{5460 + number}".encode()
        (root / "toshiba" / name).parent.mkdir(exist_ok=True)
        (root / "toshiba" / name).write_bytes(content.replace(MR_SMALL_UID_TAIL, unique))
    (root / "broken").mkdir()
    shutil.copy(get_testdata_file("MR_truncated.dcm"), root / "broken" / "MR_truncated.dcm")
    (root / "enhanced").mkdir()
    shutil.copy(get_testdata_file("emri_small.dcm"), root / "enhanced" / "emri_small.dcm")
    (root / "philips").mkdir()
    for path in philips_series():
        shutil.copy(path, root / "philips" / os.path.basename(path))
    (root / "siemens").mkdir()
    for name in ("0.dcm", "1.dcm"):
        shutil.copy(nibabel_file(name), root / "siemens" / name)
    data_dir = tmp_path_factory.mktemp("real_data")
    dataset_dir = prepare(str(root), str(data_dir), series_filter=".*", phases="all", image_size=32,
                          split=(1, 0, 0), salt="real-files", progress=False)
    return root, data_dir, dataset_dir


def by_manufacturer(dataset_dir):
    examples = tfds.as_numpy(tfds.builder_from_directory(dataset_dir).as_dataset(split="train"))
    groups = collections.defaultdict(list)
    for e in examples:
        groups[e["labels"]["Manufacturer"]["value"].decode()].append(e)
    return groups


def test_every_real_series_is_written_with_its_header_labels(real_archive):
    _, _, dataset_dir = real_archive
    groups = by_manufacturer(dataset_dir)
    # Toshiba MR_small in five encodings: five one-slice series, identical pixels.
    toshiba = groups.pop("TOSHIBA_MEC")
    assert len(toshiba) == len(MR_SMALL_VARIANTS) and len({e["series"] for e in toshiba}) == 5
    for e in toshiba:
        labels = e["labels"]
        assert labels["EchoTime"]["value"] == b"240" and labels["RepetitionTime"]["value"] == b"4000"
        np.testing.assert_array_equal(e["image"], toshiba[0]["image"])
        assert e["intensity_scale"] == toshiba[0]["intensity_scale"]
    # Enhanced MR multi-frame: ten frames, ten slices of one series, labels from functional groups.
    enhanced = groups.pop("")
    assert len(enhanced) == 10 and len({e["series"] for e in enhanced}) == 1
    assert sorted(int(e["slice_index"]) for e in enhanced) == list(range(10))
    assert {e["labels"]["MagneticFieldStrength"]["value"] for e in enhanced} == {b"3"}
    # The tiny Philips localizer: three files, each its own series.
    philips = groups.pop("PHILIPS MEDICAL SYSTEMS, INC.")
    assert len(philips) == len(philips_series()) == 3
    assert {e["labels"]["EchoTime"]["value"] for e in philips} == {b"3.7"}
    # nibabel's Siemens TrioTim pair are MOSAICs that cannot be split (see below): no examples.
    assert groups == {}
    assert {e["image"].shape for e in toshiba + enhanced + philips} == {(32, 32)}


def test_skipped_real_files_are_reported_with_their_reasons(real_archive):
    """The truncated file, and nibabel's Siemens TrioTim pair: MOSAICs of 48 images, whose
    7 x 7 tiles do not divide their 256 x 256 pixels (nibabel's test data replaced the
    pixels), so their slices cannot be told apart; never passed on as one image each."""
    _, data_dir, _ = real_archive
    with open(os.path.join(data_dir, REPORT_FILE)) as f:
        report = json.load(f)
    skipped = by_path(report["skipped"], data_dir)
    assert sorted((p, s["reason"]) for p, s in skipped.items()) == \
        [(os.path.join("broken", "MR_truncated.dcm"), "truncated"),
         (os.path.join("siemens", "0.dcm"), "mosaic"), (os.path.join("siemens", "1.dcm"), "mosaic")]
    assert all("7 x 7 tiles" in s["detail"] for s in skipped.values() if s["reason"] == "mosaic")
    assert report["files"]["used"] == len(MR_SMALL_VARIANTS) + 1 + 3
    assert report["slices"]["skipped_at_decode"] == 0
    # emri_small has no PatientID: it is grouped by name and birth date, or its study.
    assert report["notes"]["no_patient_id"]["series"] == 1
