"""The whole flow on gs:// (the GCS emulator of tests/gcs_emulator.py): a prepared dataset in
a bucket (iap-prep writes it locally and it is copied up: under the emulator, TFDS's last
step, a rename of its temporary folder, fails on the folder's marker object, which real
GCS renames like any other), training reads it from there and writes its workdir (checkpoints,
metrics.jsonl, TensorBoard, plots) into the bucket, is stopped, resumes from the bucket and
ends with the parameters of the same run done on local disk; iap-predict then predicts the
bucket's test split from the bucket's checkpoint into the bucket."""
import io
import json
import os

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from etils import epath

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401,F811  (fixtures)
from train_data import tiny_config

from predict_data import SALT  # noqa: E402

from iap_jax.io.checkpoints import restore_model
from iap_jax.prediction.job import predict
from iap_jax.prediction.predict_cli import build_parser
from iap_jax.training import train

pytestmark = [pytest.mark.gcs, pytest.mark.slow]


@pytest.mark.usefixtures("compiled_programs_cache")
def test_prep_train_stop_resume_predict_on_a_bucket(gcs_bucket, trained_run, tmp_path):  # noqa: F811
    # trained_run: the same synthetic DICOM prepared and trained on local disk, uninterrupted.
    local_dataset = trained_run.dataset_dir
    data_root = os.path.dirname(os.path.dirname(os.path.dirname(local_dataset)))
    dataset = f"{gcs_bucket}/data/{os.path.relpath(local_dataset, data_root)}"
    for path in sorted(epath.Path(local_dataset).iterdir()):
        path.copy(epath.Path(dataset) / path.name)
    assert (epath.Path(dataset) / "prep_options.json").exists()

    workdir = f"{gcs_bucket}/runs/r1"
    halted = train.train_and_evaluate(tiny_config(dataset, halt_after_steps=2), workdir)
    assert halted["step"] == 2
    resumed = train.train_and_evaluate(tiny_config(dataset), workdir)
    local = restore_model(trained_run.workdir, step="latest")
    assert resumed["step"] == local["step"] > 2
    for a, b in zip(jax.tree.leaves(local["params"]),
                    jax.tree.leaves(jax.device_get(resumed["state"].params))):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)

    run = epath.Path(workdir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)) and max(r["step"] for r in rows) == resumed["step"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "plots").glob("confusion_*.png"))
    assert restore_model(workdir, step="latest")["step"] == resumed["step"]

    # Predicted from the bucket's checkpoint and test split into the bucket: the rows of
    # the same prediction made from local disk.
    def predicted(workdir, dataset, out):
        predict(build_parser().parse_args([
            "--workdir", workdir, "--step", "latest", "--input", dataset, "--split", "test",
            "--out", out, "--quiet", "--salt", SALT]))
        data = io.BytesIO(epath.Path(out, "slices.parquet").read_bytes())
        return pq.read_table(data).to_pandas().sort_values(["series_key", "slice_index"])

    remote = predicted(workdir, dataset, f"{gcs_bucket}/predictions")
    on_disk = predicted(trained_run.workdir, local_dataset, str(tmp_path / "predictions"))
    assert len(remote) == len(on_disk) > 0
    assert list(remote["series_key"]) == list(on_disk["series_key"])
    assert list(remote["Manufacturer"]) == list(on_disk["Manufacturer"])
    np.testing.assert_allclose(remote["Manufacturer_prob"], on_disk["Manufacturer_prob"], atol=1e-4)
