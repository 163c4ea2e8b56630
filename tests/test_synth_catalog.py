"""The protocol catalog: vocabularies of the Duke cohort, and a valid series per protocol."""
import numpy as np
import pydicom
import pytest

from data_prep.synthetic import cohort, scanners

PAPER_SCAN_OPTIONS = {
    "FAST_GEMS\\SAT_GEMS\\ACC_GEMS\\PFP\\FS", "FAST_GEMS\\SAT_GEMS\\MP_GEMS\\ACC_GEMS\\PFP\\FS",
    "FAST_GEMS\\SAT_GEMS\\MP_GEMS\\PFP\\FS", "FAST_GEMS\\SAT_GEMS\\PFP\\FS", "FS", "PFP\\FS",
    "PFP\\SFS", "SAT_GEMS\\PFP\\FS", "SFS"}
PAPER_MATRICES = {(320, 320), (340, 340), (350, 350), (360, 360), (384, 360), (384, 384),
                  (448, 251), (448, 381), (448, 430), (448, 448), (512, 358)}


def test_catalog_covers_the_paper_vocabularies():
    variants = [v for m in scanners.CATALOG for v in m.variants]
    assert {v.scan_options for v in variants} == PAPER_SCAN_OPTIONS
    assert {v.acquisition_matrix for v in variants} == PAPER_MATRICES
    assert {v.flip_angle for v in variants} == {7, 8, 10, 12}
    assert {m.field_written for m in scanners.CATALOG} == {1.494, 1.5, 2.8936, 3.0}
    assert {m.model for m in scanners.CATALOG} == {
        "Avanto", "Optima MR450w", "SIGNA EXCITE", "SIGNA HDx", "Signa HDxt", "Skyra", "Trio",
        "TrioTim"}
    labels = {label for m in scanners.CATALOG for era in m.agents for label in era.labels}
    assert labels == {"GADAVIST", "MAGNEVIST", "MMAGNEVIST", "MULTIHANCE", "", None}
    assert {v.recon_size for v in variants} <= {320, 448, 512}


def test_agent_depends_on_site_and_year_only():
    rng = np.random.default_rng(0)
    for scanner in scanners.CATALOG:
        for _ in range(5):
            plan = scanners.plan_patient_series(scanner, rng, 320.0)
            years = [e for e in scanner.agents if e.years[0] <= plan[0].year <= e.years[1]]
            assert plan[0].contrast_label in years[0].labels
            assert len({p.contrast_label for p in plan}) == 1


def test_fov_follows_body_size():
    scanner = scanners.CATALOG[0]
    fovs = {w: np.mean([scanners.plan_patient_series(scanner, np.random.default_rng(s), w)[0].fov_mm
                        for s in range(20)]) for w in (280.0, 360.0)}
    assert fovs[360.0] > fovs[280.0] + 30


@pytest.mark.parametrize("scanner_index,variant_index", scanners.variant_pairs())
def test_every_protocol_writes_a_valid_series(tmp_path, scanner_index, variant_index):
    task = cohort.PatientTask(str(tmp_path), 0, 5, scanner_index, "small", "pre",
                              variant_index=variant_index, max_slices=2)
    result = cohort.generate_patient(task)
    variant = scanners.CATALOG[scanner_index].variants[variant_index]
    dce = next(r for r in result.rows if r["series_role"] == "dce")
    assert dce["ScanOptions"] == variant.scan_options
    assert dce["AcquisitionMatrix"] == "{}x{}".format(*variant.acquisition_matrix)
    files = sorted((tmp_path / dce["series_dir"]).glob("*.dcm"))
    assert len(files) == 2 == result.slices_written // 2
    for path in files:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        assert 0 <= pixels.min() and pixels.max() < 2 ** ds.BitsStored
        assert pixels.std() > 0
        assert list(ds.ScanOptions) == variant.scan_options.split("\\") or (
            ds.ScanOptions == variant.scan_options)
