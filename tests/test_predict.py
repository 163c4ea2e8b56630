"""iap-predict on a real tiny run: what it writes, that it reproduces training's validation,
pads without recompiling, agrees across devices and processes, and resumes."""
import collections
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from predict_data import run_predict

from iap_jax.prediction import tables
from iap_jax.prediction.predict_cli import main as predict_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(path):
    table = pq.read_table(path).sort_by([("series_key", "ascending"), ("slice_index", "ascending")])
    return table.drop_columns(["file_key", "frame"]).to_pylist()  # where in its input


def _assert_close(rows_a, rows_b):
    """The same predictions up to float rounding (another batch shape or device count can
    round the convolutions differently): equal classes and keys, close numbers."""
    assert len(rows_a) == len(rows_b) > 0
    for a, b in zip(rows_a, rows_b):
        for key, value in a.items():
            if key.endswith(("_logits", "_prob")) or key in ("EchoTime", "RepetitionTime"):
                np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
            else:
                assert b[key] == value, key


def test_validation_prediction_reproduces_the_training_table(trained_run, tmp_path):
    report = run_predict(trained_run, str(tmp_path / "val"), "--input", trained_run.dataset_dir,
                         "--split", "validation", "--step", "latest")
    scores = tables.accuracy(str(tmp_path / "val" / "slices.parquet"))
    assert report["counts"]["slices"] == trained_run.validation["Manufacturer"]["count"]
    for name, expected in trained_run.validation.items():
        got = scores[name]
        assert got["count"] == expected["count"], name
        if "top1" in expected:  # the same hits, to the slice
            assert round(got["top1"] * got["count"]) == round(expected["top1"] * expected["count"]), name
            assert round(got["top2"] * got["count"]) == round(expected["top2"] * expected["count"]), name
        else:
            assert math.isclose(got["mae"], expected["mae"], rel_tol=1e-4), name


@pytest.fixture(scope="module")
def test_split(trained_run, tmp_path_factory):
    """The test split predicted once with the top 3 classes and CSV copies: (out, report)."""
    out = tmp_path_factory.mktemp("test_split")
    report = run_predict(trained_run, str(out), "--input", trained_run.dataset_dir, "--split",
                         "test", "--top-k", "3", "--csv")
    return out, report


def test_tables_carry_the_checkpoint_step_and_pixel_spec(trained_run, test_split):
    out, report = test_split
    meta = tables.read_metadata(str(out / "slices.parquet"))
    steps = [int(d) for d in os.listdir(os.path.join(trained_run.workdir, "checkpoints")) if d.isdigit()]
    assert meta["step"] == report["checkpoint"]["step"] and meta["step"] in steps
    assert meta["pixel_spec"]["stored_size"] == 32


def test_classes_come_back_as_names_with_sorted_top_k_probabilities(test_split):
    out, report = test_split
    meta = tables.read_metadata(str(out / "slices.parquet"))
    classes = {h["name"]: h["classes"] for h in meta["label_encoding"]["heads"] if h["classes"]}
    rows = pq.read_table(out / "slices.parquet").to_pylist()
    assert rows and len(rows) == report["counts"]["slices"]
    for row in rows:
        for name, vocabulary in classes.items():
            assert row[name] in vocabulary and row[f"{name}_topk"][0] == row[name]
            probs = row[f"{name}_topk_prob"]
            assert len(probs) == min(3, len(vocabulary)) and probs == sorted(probs, reverse=True)
            assert math.isclose(row[f"{name}_prob"], probs[0]) and 0 < sum(probs) <= 1 + 1e-5
            assert len(row[f"{name}_logits"]) == len(vocabulary)


def test_continuous_iaps_come_back_in_milliseconds_beside_the_headers(test_split):
    out, _ = test_split
    for row in pq.read_table(out / "slices.parquet").to_pylist():
        # The synthetic TE is 1-5 ms, TR 3-10 ms.
        assert 0.05 < row["EchoTime"] < 100 and 0.05 < row["RepetitionTime"] < 1000
        assert row["Manufacturer_header"] in ("SIEMENS", "GE MEDICAL SYSTEMS")
        assert isinstance(row["EchoTime_header"], float)


def test_series_table_summarises_its_slices(test_split):
    out, _ = test_split
    rows = pq.read_table(out / "slices.parquet").to_pylist()
    series = pq.read_table(out / "series.parquet").to_pylist()
    by_key = collections.Counter(r["series_key"] for r in rows)
    assert {s["series_key"]: s["num_slices"] for s in series} == dict(by_key)
    for s in series:
        members = [r for r in rows if r["series_key"] == s["series_key"]]
        assert 0 < s["Manufacturer_agreement"] <= 1
        assert s["EchoTime"] == pytest.approx(float(np.median([r["EchoTime"] for r in members])))
        assert s["Manufacturer_header"] == members[0]["Manufacturer_header"]
    assert json.load(open(out / "predict_report.json"))["counts"]["series"] == len(series)


def test_csv_copies_hold_the_top_k_but_no_logits(test_split):
    out, _ = test_split
    with open(out / "slices.csv") as f:
        header = f.readline()
    assert "Manufacturer_topk" in header and "_logits" not in header


def test_last_batch_is_padded_without_recompiling(trained_run, tmp_path):
    compiles = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, duration, **kw: compiles.update([name]))
    before = compiles["/jax/core/compile/backend_compile_duration"]
    report = run_predict(trained_run, str(tmp_path / "p"), "--input", trained_run.dicom_root,
                         "--batch-size", "7")
    batches = -(-report["counts"]["slices"] // 7)
    assert report["counts"]["slices"] % 7 and batches >= 3  # several batches, the last padded
    # The forward, and with oneDNN the one-off packing of its kernels: none per batch.
    from iap_jax.kernels import onednn
    packs = 1 if report["run"]["convolutions"] == "onednn" and onednn.available() else 0
    assert compiles["/jax/core/compile/backend_compile_duration"] - before == 1 + packs
    assert report["run"]["batch_size"] == 7
    before = compiles["/jax/core/compile/backend_compile_duration"]
    whole = run_predict(trained_run, str(tmp_path / "q"), "--input", trained_run.dicom_root,
                        "--batch-size", "256")
    assert compiles["/jax/core/compile/backend_compile_duration"] - before == 1 + packs
    assert whole["counts"] == report["counts"]
    _assert_close(_rows(tmp_path / "p" / "slices.parquet"), _rows(tmp_path / "q" / "slices.parquet"))


def test_dicom_folder_and_tfrecords_agree_row_for_row(trained_run, tmp_path):
    run_predict(trained_run, str(tmp_path / "tf"), "--input", trained_run.dataset_dir, "--split", "test")
    report = run_predict(trained_run, str(tmp_path / "dcm"), "--input", trained_run.dicom_root)
    tfrecord_rows = _rows(tmp_path / "tf" / "slices.parquet")
    dicom_rows = {(r["series_key"], r["slice_index"]): r for r in _rows(tmp_path / "dcm" / "slices.parquet")}
    assert tfrecord_rows and len(dicom_rows) > len(tfrecord_rows)  # every split's patients
    for row in tfrecord_rows:
        assert dicom_rows[(row["series_key"], row["slice_index"])] == row
    # The folder's non-DICOM files (cohort.csv, the generator's settings) are reported.
    assert {s["reason"] for s in report["skipped"]} == {"not_dicom"}
    assert report["input"]["salt"] == "--salt"


PREDICT_ON_DEVICES = """
import sys
sys.path.insert(0, "tests")
import jax
from predict_data import SALT
from iap_jax.prediction.job import predict
from iap_jax.prediction.predict_cli import build_parser
workdir, dataset_dir, out = sys.argv[1:4]
assert len(jax.local_devices()) == int(sys.argv[4])
report = predict(build_parser().parse_args([
    "--workdir", workdir, "--input", dataset_dir, "--split", "test", "--out", out, "--quiet",
    "--batch-size", "8", "--conv-impl", "cpu_fast"]))
assert report["run"]["devices"] == int(sys.argv[4]), report["run"]
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_one_and_four_devices_agree(trained_run, tmp_path):
    outs = {}
    for devices in (1, 4):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        outs[devices] = str(tmp_path / f"d{devices}")
        result = subprocess.run([sys.executable, "-c", PREDICT_ON_DEVICES, trained_run.workdir,
                                 trained_run.dataset_dir, outs[devices], str(devices)],
                                env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    _assert_close(*(_rows(os.path.join(outs[d], "slices.parquet")) for d in (1, 4)))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_share_the_input_and_process_0_writes_the_tables(trained_run, tmp_path):
    pattern = os.path.join(trained_run.dataset_dir, "*.tfrecord*")  # 3 shards: 3 units
    single = run_predict(trained_run, str(tmp_path / "one"), "--input", pattern)
    sys.path.insert(0, os.path.join(REPO, "launch"))
    import local_multiprocess

    port = local_multiprocess.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "iap_jax.prediction.predict_cli", "--workdir", trained_run.workdir, "--input",
         pattern, "--out", str(tmp_path / "two"), "--quiet", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)], env=env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert "predicted" in outputs[0][0] and "predicted" not in outputs[1][0]
    shares = [json.load(open(tmp_path / "two" / "parts" / f"process-{i}.json")) for i in range(2)]
    assert [s["units"] for s in shares] == [2, 1] and all(s["images"] > 0 for s in shares)
    # (Two processes convolve with the pure-JAX CPU path, one process with oneDNN.)
    _assert_close(_rows(tmp_path / "two" / "slices.parquet"), _rows(tmp_path / "one" / "slices.parquet"))
    report = json.load(open(tmp_path / "two" / "predict_report.json"))
    assert report["run"]["processes"] == 2 and report["counts"] == single["counts"]


def test_checkpoint_without_optimizer_state_still_predicts(trained_run, tmp_path):
    workdir = tmp_path / "model_only"
    shutil.copytree(trained_run.workdir, workdir)
    steps = [d for d in os.listdir(workdir / "checkpoints") if d.isdigit()]
    for step in steps:
        shutil.rmtree(workdir / "checkpoints" / step / "train")
    run_predict(trained_run, str(tmp_path / "full"), "--input", trained_run.dataset_dir, "--split", "test")
    code = predict_main(["--workdir", str(workdir), "--input", trained_run.dataset_dir, "--split",
                         "test", "--out", str(tmp_path / "slim"), "--quiet"])
    assert code == 0
    assert _rows(tmp_path / "slim" / "slices.parquet") == _rows(tmp_path / "full" / "slices.parquet")


def test_killed_run_resumes_from_its_parts_without_duplicates(trained_run, tmp_path):
    pattern = os.path.join(trained_run.dataset_dir, "*.tfrecord*")
    out = tmp_path / "out"
    run_predict(trained_run, str(out), "--input", pattern)
    expected = _rows(out / "slices.parquet")
    # As if killed while predicting the second unit: its part, the tables and the report
    # were never written, and a half-written temporary file is left behind.
    for name in ("slices.parquet", "series.parquet", "predict_report.json"):
        os.remove(out / name)
    os.remove(out / "parts" / "shard-00001.parquet")
    (out / "parts" / "shard-00001.parquet.tmp-999").write_bytes(b"PAR1 half")
    report = run_predict(trained_run, str(out), "--input", pattern)
    assert report["run"]["units_resumed"] == 2 and report["run"]["images_this_run"] > 0
    assert _rows(out / "slices.parquet") == expected
    # Another run's settings in the same folder are refused rather than mixed in.
    with pytest.raises(ValueError, match="top_k"):
        run_predict(trained_run, str(out), "--input", pattern, "--top-k", "1")
    run_predict(trained_run, str(out), "--input", pattern, "--top-k", "1", "--overwrite")
    assert all(len(r["Manufacturer_topk"]) == 1 for r in pq.read_table(out / "slices.parquet").to_pylist())


def test_predictions_hold_no_patient_identifiers(trained_run, tmp_path):
    import pydicom

    out = tmp_path / "dcm"
    run_predict(trained_run, str(out), "--input", trained_run.dicom_root, "--csv")
    secrets = set()
    for folder, _, files in os.walk(trained_run.dicom_root):
        for name in files:
            if name.endswith(".dcm"):
                ds = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
                secrets.update({str(ds.PatientName), str(ds.PatientBirthDate), str(ds.SeriesInstanceUID)})
                break
    written = b"".join(open(os.path.join(d, n), "rb").read()
                       for d, _, files in os.walk(out) for n in files if not n.endswith(".parquet"))
    written += b"".join(str(pq.read_table(os.path.join(d, n)).to_pylist()).encode()
                        for d, _, files in os.walk(out) for n in files if n.endswith(".parquet"))
    assert secrets and not [s for s in secrets if s.encode() in written]


def test_help_and_bad_arguments(trained_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_main(["--help"])
    assert exit_info.value.code == 0 and "--input SPEC" in capsys.readouterr().out
    assert predict_main(["--workdir", str(tmp_path), "--input", trained_run.dataset_dir,
                         "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert predict_main(["--workdir", trained_run.workdir, "--input", trained_run.dataset_dir,
                         "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "pass --split" in capsys.readouterr().err
    assert predict_main(["--workdir", trained_run.workdir, "--input", str(tmp_path / "none*.tfrecord"),
                         "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_a_model_that_cannot_be_built_leaves_no_reader_behind(trained_run, tmp_path, capsys):
    """The reader starts before the model compiles (to overlap its start-up); a model that
    fails to build must still stop it and close the input."""
    import threading

    from iap_jax.prediction.engine import Reader

    workdir = tmp_path / "unknown_model"
    shutil.copytree(trained_run.workdir, workdir)
    for step in (d for d in os.listdir(workdir / "checkpoints") if d.isdigit()):
        path = workdir / "checkpoints" / step / "config" / "metadata"
        config = json.loads(path.read_text())
        config["model"]["name"] = "resnet999"
        path.write_text(json.dumps(config))
    assert predict_main(["--workdir", str(workdir), "--input", trained_run.dataset_dir,
                         "--split", "validation", "--out", str(tmp_path / "o"), "--quiet",
                         "--batch-size", "1"]) == 2
    assert "unknown model 'resnet999'" in capsys.readouterr().err
    assert not [t for t in threading.enumerate() if isinstance(t, Reader)]


def test_bfloat16_prediction_on_a_cpu_agrees_with_float32(trained_run, tmp_path):
    from iap_jax.kernels import onednn

    if not (onednn.available() and onednn.bfloat16_inference_available()):
        pytest.skip("no oneDNN bfloat16 inference convolutions on this CPU")
    full = run_predict(trained_run, str(tmp_path / "f32"), "--input", trained_run.dataset_dir,
                       "--split", "test")
    half = run_predict(trained_run, str(tmp_path / "bf16"), "--input", trained_run.dataset_dir,
                       "--split", "test", "--dtype", "bfloat16")
    assert (half["run"]["dtype"], half["run"]["convolutions"]) == ("bfloat16", "onednn")
    assert full["run"]["dtype"] == "float32"
    a, b = _rows(tmp_path / "f32" / "slices.parquet"), _rows(tmp_path / "bf16" / "slices.parquet")
    assert len(a) == len(b) > 0
    encoding = tables.read_metadata(str(tmp_path / "f32" / "slices.parquet"))["label_encoding"]
    for head in encoding["heads"]:
        name = head["name"]
        if head["kind"] == "categorical":
            agree = np.mean([x[name] == y[name] for x, y in zip(a, b)])
            assert agree >= 0.95, (name, agree)
        else:
            np.testing.assert_allclose([y[name] for y in b], [x[name] for x in a], rtol=0.05)
