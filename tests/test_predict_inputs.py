"""The predictor's inputs: one pixel path from DICOM and from TFRecords, and every bad input
named and skipped while the rest is predicted."""
import json
import os
import shutil

import jax
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from data_prep.builder import prepare
from data_prep.features import example_features
from local_paths_view import by_path, slice_paths
from predict_data import SALT, run_predict

from iap_jax.core.labels import LabelEncoding
from iap_jax.core.preprocess import model_input
from iap_jax.io import local_paths, sources
from iap_jax.io.checkpoints import restore_model
from iap_jax.prediction.predict_cli import main as predict_main
from iap_jax.training import input_pipeline


def test_one_slice_gives_the_same_model_input_from_dicom_and_from_its_tfrecord(trained_run):
    spec = restore_model(trained_run.workdir)["pixel_spec"]
    # DICOM -> iap-prep -> TFRecord -> the training input pipeline.
    reader = input_pipeline.SplitReader(trained_run.dataset_dir, "test", input_pipeline.InputConfig())
    encoding = LabelEncoding.from_stats(input_pipeline.load_split_stats(trained_run.dataset_dir))
    records = list(input_pipeline.split_examples(trained_run.dataset_dir, "test"))
    n = len(records)
    batch = next(input_pipeline.eval_batches(reader, encoding, n))
    # DICOM -> the predictor's reader, for the same slices.
    source = sources.open_source(trained_run.dicom_root, spec, salt=lambda: SALT, progress=False)
    by_key = {}
    for unit in source.plan():
        for s in source.read(unit, []):
            by_key[(s.series_key, s.slice_index)] = s
    from_dicom = [by_key[(r.series, r.slice_index)] for r in records]
    images = np.stack([s.image for s in from_dicom])
    scales = np.array([s.scale for s in from_dicom], np.float32)
    offsets = np.array([s.offset for s in from_dicom], np.float32)
    np.testing.assert_array_equal(images, batch["image"])
    np.testing.assert_array_equal(scales, batch["scale"])
    np.testing.assert_array_equal(offsets, batch["offset"])
    to_input = jax.jit(lambda i, s, o: model_input(i, s, o, spec))
    np.testing.assert_array_equal(np.asarray(to_input(images, scales, offsets)),
                                  np.asarray(to_input(batch["image"], batch["scale"], batch["offset"])))
    assert spec.normalisation == "percentile" and spec.input_size == 32


def _serialized(image_size, series="s", index=0):
    features = example_features(image_size)
    labels = {name: {"value": "", "number": np.nan, "state": 0} for name in features["labels"].keys()}
    return features.serialize_example({
        "image": np.arange(image_size * image_size, dtype=np.uint16).reshape(image_size, image_size),
        "intensity_scale": 1.0, "intensity_offset": 0.0, "patient": "p", "series": series,
        "phase": 0, "slice_index": index, "num_slices": 1, "slice_position": 0.0, "labels": labels})


def test_bad_tfrecords_are_named_and_the_rest_predicted(trained_run, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    shards = sorted(p for p in os.listdir(trained_run.dataset_dir) if ".tfrecord" in p)
    for name in shards:
        shutil.copy(os.path.join(trained_run.dataset_dir, name), archive / name)
    test_shard = next(n for n in shards if "-test." in n)
    good = run_predict(trained_run, str(tmp_path / "good"), "--input", str(archive / "*.tfrecord*"))
    # A shard cut off in the middle of a record, a file that is no TFRecord at all, and a
    # shard of 48 px images (another prep size) beside one good 32 px record.
    data = (archive / test_shard).read_bytes()
    (archive / test_shard).write_bytes(data[:len(data) // 2])
    (archive / "notes.tfrecord").write_bytes(b"this is not a record file")
    with tf.io.TFRecordWriter(str(archive / "other-size.tfrecord")) as writer:
        writer.write(_serialized(48, "big", 0))
        writer.write(_serialized(48, "big", 1))
        writer.write(_serialized(32, "small", 0))
    out = tmp_path / "bad"
    report = run_predict(trained_run, str(out), "--input", str(archive / "*.tfrecord*"))
    files = local_paths.read(str(out))["files"]
    reasons = {(files[s["file"]], s["reason"]): s for s in report["skipped"]}
    assert (test_shard, "corrupt_tfrecord") in reasons
    assert "stopped after" in reasons[(test_shard, "corrupt_tfrecord")]["detail"]
    assert ("notes.tfrecord", "corrupt_tfrecord") in reasons
    wrong = reasons[("other-size.tfrecord", "wrong_image_shape")]
    assert wrong["slices"] == 2 and "48x48" in wrong["detail"] and "32x32" in wrong["detail"]
    rows = pq.read_table(out / "slices.parquet")
    sources_seen = set(slice_paths(out))
    assert {n for n in shards if n != test_shard} <= sources_seen and "other-size.tfrecord" in sources_seen
    # Everything before the cut is still predicted; nothing else is lost.
    in_test_shard = slice_paths(tmp_path / "good").count(test_shard)
    kept = rows.num_rows - 1 - (good["counts"]["slices"] - in_test_shard)
    assert 0 <= kept < in_test_shard


def test_bad_dicom_files_are_named_and_the_rest_predicted(trained_run, tmp_path):
    root = tmp_path / "dicom"
    shutil.copytree(trained_run.dicom_root, root)
    good = run_predict(trained_run, str(tmp_path / "good"), "--input", trained_run.dicom_root)
    used = sorted(set(slice_paths(tmp_path / "good")))
    # A file cut off inside its pixel data, and a file whose pixel data cannot be decoded.
    cut, broken = (os.path.join(root, used[i]) for i in (0, 5))
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[:len(data) - 200])
    import pydicom
    from pydicom.uid import JPEG2000Lossless
    ds = pydicom.dcmread(broken)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x01garbage" * 8])
    ds.save_as(broken, enforce_file_format=True)
    report = run_predict(trained_run, str(tmp_path / "bad"), "--input", str(root))
    reasons = {p: s["reason"] for p, s in by_path(report["skipped"], tmp_path / "bad").items()}
    assert reasons[os.path.relpath(cut, root)] == "truncated"
    assert reasons[os.path.relpath(broken, root)] == "undecodable"
    assert report["counts"]["slices"] == good["counts"]["slices"] - 2


def test_a_malformed_value_skips_its_file_and_the_rest_is_predicted(trained_run, tmp_path):
    import pydicom

    root = tmp_path / "dicom"
    shutil.copytree(trained_run.dicom_root, root)
    good = run_predict(trained_run, str(tmp_path / "good"), "--input", str(root))
    used = sorted(set(slice_paths(tmp_path / "good")))
    # RescaleSlope holding the text "abc" (written raw: pydicom would refuse the value).
    ds = pydicom.dcmread(root / used[0])
    tag = pydicom.tag.Tag("RescaleSlope")
    ds[tag] = pydicom.dataelem.RawDataElement(tag, "DS", 4, b"abc ", 0, False, True)
    ds.save_as(root / used[0])
    report = run_predict(trained_run, str(tmp_path / "bad"), "--input", str(root))
    skip = by_path(report["skipped"], tmp_path / "bad")[used[0]]
    assert skip["reason"] == "malformed" and "RescaleSlope" in skip["detail"]
    assert report["counts"]["slices"] == good["counts"]["slices"] - 1


def test_png_and_numpy_images_and_their_bad_cousins(trained_run, tmp_path):
    from PIL import Image

    folder = tmp_path / "images" / "series_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 4000, (40, 48)).astype(np.uint16)).save(folder / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(folder / "colour.png")
    np.save(tmp_path / "images" / "volume.npy", rng.normal(size=(4, 30, 30)).astype(np.float32))
    np.save(tmp_path / "images" / "line.npy", np.zeros(10))
    out = tmp_path / "out"
    report = run_predict(trained_run, str(out), "--input", str(tmp_path / "images"))
    reasons = by_path(report["skipped"], out)
    assert reasons["series_a/colour.png"]["reason"] == "unreadable"
    assert "not grayscale" in reasons["series_a/colour.png"]["detail"]
    assert reasons["line.npy"]["reason"] == "wrong_image_shape"
    rows = pq.read_table(out / "slices.parquet").to_pylist()
    keys = sorted((path, r["series_key"], r["slice_index"], r["frame"])
                  for path, r in zip(slice_paths(out), rows))
    # A folder's files are one series, a 3D array one series of its planes: keyed by salted
    # hashes of the folder and the file, never by their names.
    series_a, volume = keys[0][1], keys[-1][1]
    assert keys == [(f"series_a/{i:03d}.png", series_a, i, 0) for i in range(3)] + [
        ("volume.npy", volume, k, k) for k in range(4)]
    assert series_a != volume and "series_a" not in series_a and "volume" not in volume
    assert "Manufacturer_header" not in rows[0]  # images carry no headers
    # A glob of the same files gives the same predictions.
    again = run_predict(trained_run, str(tmp_path / "glob"), "--input", str(folder / "0*.png"))
    assert again["counts"]["slices"] == 3


def test_nothing_predictable_exits_non_zero(trained_run, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    np.save(folder / "line.npy", np.zeros(10))
    code = predict_main(["--workdir", trained_run.workdir, "--input", str(folder), "--out",
                         str(tmp_path / "out"), "--quiet"])
    assert code == 1
    report = json.load(open(tmp_path / "out" / "predict_report.json"))
    assert report["counts"]["slices"] == 0
    assert list(by_path(report["skipped"], tmp_path / "out")) == ["line.npy"]
    assert "wrong_image_shape" in capsys.readouterr().out


def test_raw_image_records_give_the_zlib_records_images_and_predictions(trained_run, tmp_path):
    """iap-prep --image-encoding none: the same examples, read by training's input and by
    the predictor's TFRecord source, as the default zlib records."""
    raw = prepare(trained_run.dicom_root, str(tmp_path / "data"), image_size=32, workers=1,
                  salt=SALT, progress=False, image_encoding="none")
    zlib_files = sorted(p for p in os.listdir(trained_run.dataset_dir) if ".tfrecord" in p)
    raw_files = sorted(p for p in os.listdir(raw) if ".tfrecord" in p)
    assert [p.split(".tfrecord")[0] for p in raw_files] == [p.split(".tfrecord")[0] for p in zlib_files]
    assert sum(os.path.getsize(os.path.join(raw, p)) for p in raw_files) > sum(
        os.path.getsize(os.path.join(trained_run.dataset_dir, p)) for p in zlib_files)
    for split in ("train", "test"):
        readers = [input_pipeline.SplitReader(d, split, input_pipeline.InputConfig())
                   for d in (trained_run.dataset_dir, raw)]
        assert [r.info.image_encoding for r in readers] == ["zlib", "none"]
        a, b = (r.row_reader.rows(r.share_positions()) for r in readers)
        assert len(a["image"]) == len(b["image"]) > 0
        np.testing.assert_array_equal(a["image"], b["image"])
        a, b = (list(input_pipeline.split_examples(d, split)) for d in (trained_run.dataset_dir, raw))
        assert [(x.series, x.slice_index) for x in a] == [(y.series, y.slice_index) for y in b]
    tables = []
    for name, folder in (("zlib", trained_run.dataset_dir), ("raw", raw)):
        out = str(tmp_path / name)
        run_predict(trained_run, out, "--input", os.path.join(folder, "*test.tfrecord*"))
        tables.append(pq.read_table(os.path.join(out, "slices.parquet")).drop(["file_key"]))
    assert tables[0].num_rows > 0 and tables[0].equals(tables[1])


def test_each_distinct_header_is_spelled_once_per_batch(monkeypatch):
    """The slices of a series share their headers; a categorical header's number is NaN, a
    fresh float on every slice read from a TFRecord, and must still be spelled only once."""
    from iap_jax.prediction import tables
    from iap_jax.core.iaps import IAP_NAMES
    from iap_jax.core.labels import HeadEncoding

    encoding = LabelEncoding((HeadEncoding("Manufacturer", "categorical", classes=("GE", "SIEMENS")),
                              HeadEncoding("EchoTime", "continuous", unit="ms")))
    spelled = []
    original = tables.header_value
    monkeypatch.setattr(tables, "header_value",
                        lambda name, *raw: spelled.append(name) or original(name, *raw))

    def headers(manufacturer, echo):
        values = {"Manufacturer": (2, manufacturer, float("nan")), "EchoTime": (2, "", echo)}
        return [values.get(n, (0, "", float("nan"))) for n in IAP_NAMES]

    slices = [sources.StoredSlice(np.zeros((4, 4), np.uint16), 1.0, 0.0, f"s{i // 3}", i % 3, "f",
                                  headers=headers("GE" if i < 3 else "SIEMENS", 2.5 + (i >= 3)))
              for i in range(6)]
    logits = {"Manufacturer": np.zeros((6, 2), np.float32), "EchoTime": np.zeros((6, 1), np.float32)}
    schema = tables.slice_schema(encoding, has_headers=True)
    table = tables.slice_table(slices, logits, encoding, schema, top_k=2).to_pydict()
    assert table["Manufacturer_header"] == ["GE"] * 3 + ["SIEMENS"] * 3
    assert table["EchoTime_header"] == [2.5] * 3 + [3.5] * 3
    assert sorted(spelled) == ["EchoTime"] * 2 + ["Manufacturer"] * 2
