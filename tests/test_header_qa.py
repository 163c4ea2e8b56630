"""Header QA end to end: a model trained on images that show their scanner, calibrated on
validation, flags series whose Manufacturer, model tag or field strength was altered on
purpose (recall >= 0.9) and leaves the untouched ones alone (<= 2% flagged)."""
import copy

import pyarrow.parquet as pq
import pytest

import train_data

from iap_jax.analysis import fit
from iap_jax.core.iaps import LabelState
from iap_jax.prediction.job import predict
from iap_jax.prediction.predict_cli import build_parser
from iap_jax.training import train

SWAPS = {"Manufacturer": {"GE MEDICAL SYSTEMS": "SIEMENS", "SIEMENS": "GE MEDICAL SYSTEMS"},
         "ManufacturerModelName": {"SIGNA HDX": "AVANTO", "AVANTO": "SIGNA HDX"},
         "MagneticFieldStrength": {"1.5": "3"}}
CHANGES = tuple(SWAPS)


def _alter(split, index, example):
    """Every other held-out series gets one tag changed, cycling through CHANGES."""
    if split != "validation" or index % 2:
        return example
    example = copy.deepcopy(example)
    name = CHANGES[(index // 2) % len(CHANGES)]
    label = example["labels"][name]
    assert label["state"] == int(LabelState.PRESENT)
    label["value"] = SWAPS[name][label["value"]]
    label["number"] = float(label["value"]) if name == "MagneticFieldStrength" else label["number"]
    return example


@pytest.mark.slow
@pytest.mark.usefixtures("compiled_programs_cache")
def test_altered_headers_are_flagged_and_untouched_ones_are_not(tmp_path):
    dataset = train_data.write_dataset(str(tmp_path / "data"), num_train=192, num_validation=100)
    held_out = train_data.write_dataset(str(tmp_path / "held_out"), num_train=16,
                                        num_validation=120, seed=11, edit=_alter)
    workdir = str(tmp_path / "train")
    config = train_data.tiny_config(dataset, num_epochs=6)
    config.checkpoint.keep_best = 1
    train.train_and_evaluate(config, workdir)

    def run(input_dir, out, *extra):
        return predict(build_parser().parse_args(["--workdir", workdir, "--input", input_dir,
                                                  "--split", "validation", "--out", str(out),
                                                  "--quiet", *extra]))

    run(dataset, tmp_path / "val", "--no-calibration")
    _, calibration = fit.fit_calibration(str(tmp_path / "val"), qa_iaps=CHANGES)
    assert set(calibration["qa"]["thresholds"]) == set(CHANGES)
    run(held_out, tmp_path / "held_out_pred")
    series = pq.read_table(tmp_path / "held_out_pred" / "series.parquet").to_pylist()
    altered = {f"s{i}": CHANGES[(i // 2) % len(CHANGES)] for i in range(0, 120, 2)}
    caught = sum(altered[s["series_key"]] in s["qa_flags"] for s in series if s["series_key"] in altered)
    false = sum(bool(s["qa_flags"]) for s in series if s["series_key"] not in altered)
    assert len(series) == 120
    assert caught / len(altered) >= 0.9, (caught, calibration["qa"])
    assert false / (len(series) - len(altered)) <= 0.02, (false, calibration["qa"])
