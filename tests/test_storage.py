"""gs:// against a local GCS emulator (tests/gcs_emulator.py): the salt, atomic writes,
predictions, evaluation and sorting written to a bucket, inputs read from one, and the
clients underneath (tf.data, tf.summary, TFDS, tensorstore, Orbax) on the same bucket."""
import json
import os

import numpy as np
import pytest
from etils import epath

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)
from predict_data import run_predict

from iap_jax.analysis import eval_cli, sort_cli
from iap_jax.io import local_paths
from iap_jax.io.dataset_info import PREP_OPTIONS_FILE, STATS_FILE, load_iap_stats, load_prep_options
from iap_jax.io.salt import SALT_ENV, SALT_FILE, create_if_absent, kept_salt, resolve_salt
from iap_jax.io.storage import open_file, read_json, replacing, write_json_atomic, write_text_atomic
from iap_jax.prediction import tables

pytestmark = [pytest.mark.gcs, pytest.mark.slow]


@pytest.fixture(autouse=True)
def no_salt_in_environment(monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)


def _objects(emulator, url: str) -> list[str]:
    """Object names under a gs:// URL, relative to it."""
    bucket, _, prefix = url[len("gs://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    return [name[len(prefix):] for name in emulator.list_objects(bucket, prefix)
            if not name.endswith("/")]  # folder markers


def _upload(local: str, url: str) -> None:
    """A local folder's files copied under a gs:// URL."""
    for folder, _, files in os.walk(local):
        for name in files:
            source = epath.Path(folder) / name
            source.copy(epath.Path(url) / os.path.relpath(source, local))


def _rows(path: str) -> list[dict]:
    table = tables.read_table(path)
    keys = [k for k in ("series_key", "slice_index") if k in table.column_names]
    return table.sort_by([(k, "ascending") for k in keys]).to_pylist()


# --- the salt and atomic files ------------------------------------------------------------

def test_salt_is_created_once_in_a_bucket_and_kept(gcs_bucket, gcs_emulator):
    data_dir = f"{gcs_bucket}/data"
    said = []
    salt = resolve_salt(data_dir, announce=said.append)
    assert len(salt) == 32 and f"generated and kept in {data_dir}/{SALT_FILE}" in said[0]
    assert _objects(gcs_emulator, data_dir) == [SALT_FILE]
    assert resolve_salt(data_dir, announce=said.append) == salt == kept_salt(data_dir)
    assert resolve_salt(data_dir, salt, announce=said.append) == salt
    with pytest.raises(ValueError, match=SALT_FILE):
        resolve_salt(data_dir, "another", announce=said.append)
    assert resolve_salt(f"{gcs_bucket}/other", "given", announce=said.append) == "given"
    assert kept_salt(f"{gcs_bucket}/other") is None  # a given salt is never written


def test_create_if_absent_never_replaces_an_existing_value():
    # The precondition's semantics, on tensorstore's in-memory store: fake-gcs-server
    # ignores ifGenerationMatch on the simple uploads tensorstore makes (real GCS applies it).
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "memory"}).result()
    assert create_if_absent(store, "prep_salt", b"first\n")
    assert not create_if_absent(store, "prep_salt", b"second\n")
    assert store.read("prep_salt").result().value == b"first\n"


def test_salt_on_a_shared_file_system_without_hard_links(tmp_path, monkeypatch):
    from iap_jax.io import salt as salt_lib

    def no_links(source, target):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(salt_lib.os, "link", no_links)
    salt = resolve_salt(str(tmp_path), announce=lambda message: None)
    assert os.listdir(tmp_path) == [SALT_FILE]
    assert oct(os.stat(tmp_path / SALT_FILE).st_mode & 0o777) == oct(0o600)
    assert resolve_salt(str(tmp_path), announce=lambda message: None) == salt == kept_salt(str(tmp_path))


def test_atomic_writes_replace_whole_objects_and_leave_no_temporary(gcs_bucket, gcs_emulator):
    path = f"{gcs_bucket}/run/report.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2, "b": [1, 2]}, sort_keys=True)
    assert read_json(path) == {"a": 2, "b": [1, 2]}
    write_text_atomic(f"{gcs_bucket}/run/notes.md", "line\r\nline\n")
    assert epath.Path(f"{gcs_bucket}/run/notes.md").read_bytes() == b"line\r\nline\n"
    # A writer that fails midway: its half-written temporary (which GCS would upload when
    # the failing block closes it) is removed, and the old object stays.
    with pytest.raises(RuntimeError):
        with replacing(path) as temporary, open_file(temporary, "w") as f:
            f.write('{"a": 3')
            raise RuntimeError("killed")
    assert read_json(path) == {"a": 2, "b": [1, 2]}
    assert _objects(gcs_emulator, f"{gcs_bucket}/run") == ["notes.md", "report.json"]


# --- predictions, evaluation and sorting to a bucket ---------------------------------------

def test_predictions_report_and_manifest_are_written_to_a_bucket(trained_run, gcs_bucket,
                                                                 gcs_emulator, tmp_path):
    local = str(tmp_path / "local")
    out = f"{gcs_bucket}/predictions"
    args = ("--input", trained_run.dataset_dir, "--split", "test", "--csv")
    expected = run_predict(trained_run, local, *args)
    report = run_predict(trained_run, out, *args)
    assert report["counts"] == expected["counts"] and report["counts"]["slices"] > 0
    assert _rows(f"{out}/slices.parquet") == _rows(os.path.join(local, "slices.parquet"))
    assert _rows(f"{out}/series.parquet") == _rows(os.path.join(local, "series.parquet"))
    assert tables.read_metadata(f"{out}/slices.parquet")["step"] == report["checkpoint"]["step"]
    assert read_json(f"{out}/predict_report.json")["counts"] == report["counts"]
    names = _objects(gcs_emulator, out)
    assert {"slices.parquet", "series.parquet", "slices.csv", "series.csv",
            "predict_report.json", "parts/run.json", "parts/plan.json"} <= set(names)
    assert not [n for n in names if ".tmp." in n]
    assert (epath.Path(out, "slices.csv").read_text()
            == epath.Path(local, "slices.csv").read_text())
    resumed = run_predict(trained_run, out, *args)  # every unit is read back from the bucket
    assert resumed["run"]["units_resumed"] == resumed["counts"]["units"]
    assert resumed["counts"] == report["counts"]

    report_dir = f"{gcs_bucket}/evaluation"
    assert eval_cli.main(["--predictions", out, "--out", report_dir, "--bootstrap", "20"]) == 0
    assert eval_cli.main(["--predictions", local, "--out", str(tmp_path / "evaluation"),
                          "--bootstrap", "20"]) == 0
    metrics, local_metrics = read_json(f"{report_dir}/metrics.json"), read_json(
        str(tmp_path / "evaluation" / "metrics.json"))
    assert metrics.pop("predictions") == out and local_metrics.pop("predictions") == local
    assert json.dumps(metrics, sort_keys=True) == json.dumps(local_metrics, sort_keys=True)
    written = set(_objects(gcs_emulator, report_dir))
    assert {"report.md", "report.html", "metrics.json"} <= written
    pngs = sorted(n for n in written if n.endswith(".png"))
    assert pngs == sorted(os.path.relpath(os.path.join(d, f), tmp_path / "evaluation")
                          for d, _, fs in os.walk(tmp_path / "evaluation") for f in fs
                          if f.endswith(".png"))
    assert epath.Path(report_dir, pngs[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({pngs[0]})" in epath.Path(report_dir, "report.md").read_text()

    manifest = f"{gcs_bucket}/sorted/manifest.csv"
    assert sort_cli.main(["--predictions", out, "--out", manifest]) == 0
    assert sort_cli.main(["--predictions", local, "--out", str(tmp_path / "manifest.csv")]) == 0
    assert epath.Path(manifest).read_bytes() == (tmp_path / "manifest.csv").read_bytes()


def test_tfrecord_shards_and_images_are_predicted_from_a_bucket(trained_run, gcs_bucket, tmp_path):
    shards = sorted(f for f in os.listdir(trained_run.dataset_dir) if "-test.tfrecord" in f)
    assert shards
    for name in shards:
        epath.Path(trained_run.dataset_dir, name).copy(epath.Path(gcs_bucket, "shards", name))
    local = run_predict(trained_run, str(tmp_path / "local"), "--input",
                        os.path.join(trained_run.dataset_dir, "*-test.tfrecord*"))
    remote = run_predict(trained_run, str(tmp_path / "remote"), "--input",
                         f"{gcs_bucket}/shards/*-test.tfrecord*")
    assert remote["input"]["kind"] == "tfrecord" and remote["counts"] == local["counts"]
    # The same rows, sources included (relative to the glob's folder either way).
    assert (_rows(str(tmp_path / "remote" / "slices.parquet"))
            == _rows(str(tmp_path / "local" / "slices.parquet")))

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for series in ("a", "b"):
        (images / series).mkdir(parents=True)
        for k in range(2):
            np.save(images / series / f"{k}.npy", rng.integers(0, 900, (40, 36)).astype(np.uint16))
    _upload(str(images), f"{gcs_bucket}/images")
    local = run_predict(trained_run, str(tmp_path / "img_local"), "--input", str(images))
    remote = run_predict(trained_run, str(tmp_path / "img_remote"), "--input", f"{gcs_bucket}/images")
    assert remote["input"]["kind"] == "images" and remote["counts"]["slices"] == 4
    assert (_rows(str(tmp_path / "img_remote" / "slices.parquet"))
            == _rows(str(tmp_path / "img_local" / "slices.parquet")))


def _flat_archive(dicom_root: str, out) -> str:
    """The cohort's files as a bucket archive keeps them: one object per instance named by a
    UUID, no folder layout; one gzip-compressed."""
    import gzip
    import uuid

    out.mkdir()
    files = sorted(os.path.join(d, n) for d, _, names in os.walk(dicom_root) for n in names
                   if n.endswith(".dcm"))
    for index, path in enumerate(files):
        name = str(uuid.UUID(int=index + 1))
        data = open(path, "rb").read()
        if index == 0:
            (out / f"{name}.dcm.gz").write_bytes(gzip.compress(data))
        else:
            (out / name).write_bytes(data)
    return str(out)


def test_a_dicom_root_in_a_bucket_gives_the_records_and_predictions_of_local_files(
        trained_run, gcs_bucket, tmp_path):
    """Issue 18 item 9: prep and prediction from a DICOM root in a bucket (listed there,
    read by the workers) give what the same files on a local disk give."""
    import tensorflow_datasets as tfds

    from data_prep.builder import prepare

    local = _flat_archive(trained_run.dicom_root, tmp_path / "archive")
    remote = f"{gcs_bucket}/idc"
    _upload(local, remote)
    options = dict(image_size=16, salt="s", workers=2, progress=False, split=(0.5, 0.25, 0.25))
    datasets = [prepare(root, str(tmp_path / name), **options)
                for name, root in (("local", local), ("remote", remote))]
    examples = []
    for dataset_dir in datasets:
        builder = tfds.builder_from_directory(dataset_dir)
        examples.append({(e["series"], int(e["slice_index"])): e for split in builder.info.splits
                         for e in tfds.as_numpy(builder.as_dataset(split=split))})
    assert examples[0].keys() == examples[1].keys() and len(examples[0]) == 60
    for key, example in examples[0].items():
        np.testing.assert_array_equal(example["image"], examples[1][key]["image"])
        assert example["labels"]["EchoTime"]["value"] == examples[1][key]["labels"]["EchoTime"]["value"]
    reports = [read_json(str(tmp_path / name / "prep_report.json")) for name in ("local", "remote")]
    assert reports[0]["files"] == reports[1]["files"] and reports[0]["skipped"] == reports[1]["skipped"]
    assert local_paths.read(str(tmp_path / "remote"))["root"] == remote

    predicted = [run_predict(trained_run, str(tmp_path / f"pred_{name}"), "--input", root)
                 for name, root in (("local", local), ("remote", remote))]
    assert predicted[0]["counts"] == predicted[1]["counts"] and predicted[0]["counts"]["slices"] == 60
    assert (_rows(str(tmp_path / "pred_remote" / "slices.parquet"))
            == _rows(str(tmp_path / "pred_local" / "slices.parquet")))
    with pytest.raises(ValueError, match="local paths only"):
        from iap_jax.io.sources import open_source
        open_source(f"{gcs_bucket}/**/*.tfrecord", None)


# --- the clients underneath ---------------------------------------------------------------

def test_tfds_dataset_and_its_json_files_are_read_from_a_bucket(trained_run, gcs_bucket, tmp_path):
    import tensorflow_datasets as tfds

    remote = f"{gcs_bucket}/data/iap_dataset/1.0.0"
    _upload(trained_run.dataset_dir, remote)
    local_builder = tfds.builder_from_directory(trained_run.dataset_dir)
    builder = tfds.builder_from_directory(remote)
    assert os.fspath(builder.info.splits["test"].filepaths[0]).startswith(remote)
    for split in local_builder.info.splits:
        local = [e["series"] for e in tfds.as_numpy(local_builder.as_dataset(split=split))]
        assert [e["series"] for e in tfds.as_numpy(builder.as_dataset(split=split))] == local
    assert load_iap_stats(remote) == load_iap_stats(trained_run.dataset_dir)
    assert load_prep_options(remote) == load_prep_options(trained_run.dataset_dir)
    assert epath.Path(remote, STATS_FILE).exists() and epath.Path(remote, PREP_OPTIONS_FILE).exists()
    local = run_predict(trained_run, str(tmp_path / "local"), "--input", trained_run.dataset_dir,
                        "--split", "test")
    report = run_predict(trained_run, str(tmp_path / "remote"), "--input", remote, "--split", "test")
    assert local_paths.read(str(tmp_path / "remote"))["input"] == remote
    assert report["counts"] == local["counts"]
    assert (_rows(str(tmp_path / "remote" / "slices.parquet"))
            == _rows(str(tmp_path / "local" / "slices.parquet")))


def test_records_are_read_and_tensorboard_events_written_in_a_bucket_without_tensorflow(gcs_bucket,
                                                                                      tmp_path):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    from iap_jax.io import records
    from iap_jax.io.storage import open_file
    from iap_jax.io.event_log import EventLog

    # Records written by TensorFlow's own writer, read back by the training's reader (gcsfs).
    path = f"{gcs_bucket}/records/a.tfrecord"
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(5):
            writer.write(f"record {i}".encode())
    with open_file(path, "rb") as f:
        assert list(records.iter_records(f, path)) == [f"record {i}".encode() for i in range(5)]
    with open_file(path, "rb") as f:
        offsets, lengths = records.scan_offsets(f, path)
        assert records.read_record_at(f, path, 3, int(offsets[3]), int(lengths[3])) == b"record 3"
    # As training writes its scalars, flushed twice (a bucket's file is rewritten whole);
    # read back by TensorBoard's own loader from a local copy.
    log = EventLog(f"{gcs_bucket}/tensorboard")
    log.scalar("val/mean_top1", 0.75, 3)
    log.flush()
    log.scalar("val/mean_top1", 0.5, 4)
    log.flush()
    events = list(epath.Path(gcs_bucket, "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    local = tmp_path / events[0].name
    local.write_bytes(events[0].read_bytes())
    # (the loader turns each scalar into a tensor, as TensorBoard's scalars plugin reads it)
    values = [(v.tag, e.step, float(tensor_util.make_ndarray(v.tensor)))
              for e in EventFileLoader(str(local)).Load() for v in e.summary.value]
    assert values == [("val/mean_top1", 3, 0.75), ("val/mean_top1", 4, 0.5)]


def test_orbax_saves_and_restores_a_tree_in_a_bucket(gcs_bucket, gcs_emulator):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    directory = f"{gcs_bucket}/workdir/checkpoints"

    def manager(**options):
        return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**options),
                                     item_handlers={"model": ocp.StandardCheckpointHandler(),
                                                    "config": ocp.JsonCheckpointHandler()})

    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}
    writer = manager(max_to_keep=1, enable_async_checkpointing=True)
    for step in (1, 2):
        writer.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(jax.tree.map(lambda x: x * step, tree)),
            config=ocp.args.JsonSave({"step": step})))
    writer.wait_until_finished()
    writer.close()
    assert {n.split("/")[0] for n in _objects(gcs_emulator, directory)} == {"2"}

    reader = manager(read_only=True, create=False)
    assert reader.all_steps() == [2]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
                            reader.item_metadata(2)["model"])
    restored = reader.restore(2, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()))
    reader.close()
    assert restored["config"] == {"step": 2}
    for key in tree:
        assert restored["model"][key].dtype == tree[key].dtype
        np.testing.assert_array_equal(np.asarray(restored["model"][key], np.float32),
                                      np.asarray(tree[key] * 2, np.float32))
