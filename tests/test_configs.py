"""The config files: switches, runlocal, loading by path, and what they declare for the
library (the input settings, the fields a resume keeps)."""
import copy
import dataclasses
import importlib
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, default, gpu, tpu_pod

from iap_jax.training import train
from iap_jax.training.input_pipeline import InputConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py")
                      if p.name not in ("__init__.py", "common.py"))


def load(spec: str):
    """A config file by path, as iap-train's --config flag loads it (iap_jax/training/train_cli.py)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    values(["iap-train", f"--config={spec}"])
    return values.config


def test_switches_are_parsed_by_their_defaults():
    args = common.parse_arg("runlocal, res=64,lr=0.5,name=x", runlocal=False, res=224,
                            lr=1.0, name="", augment=True)
    assert args.to_dict() == dict(runlocal=True, res=64, lr=0.5, name="x", augment=True)
    assert common.parse_arg("runlocal=false", runlocal=True).runlocal is False
    assert common.parse_arg("", runlocal=False).runlocal is False
    assert common.parse_arg(None, runlocal=False).runlocal is False
    for arg, error in (("norunlocal", "'norunlocal': no such switch"),
                       ("runlocals", "no such switch"), ("runlocal=maybe", "not a bool"),
                       ("res", "needs a value"), ("res=6.5", "not a int")):
        with pytest.raises(ValueError, match=error):
            common.parse_arg(arg, runlocal=False, res=224)
    with pytest.raises(TypeError):
        common.parse_arg("", sizes=(1, 2))


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_config_file_loads_by_path_from_anywhere(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    full, small = load(f"configs/{name}"), load(f"configs/{name}:runlocal")
    monkeypatch.chdir(tmp_path)
    assert load(str(REPO / "configs" / name)).to_dict() == full.to_dict()
    assert small.model.name == "tiny" and small.input.image_size == 32
    assert full.model.name != "tiny"
    with pytest.raises(Exception, match="norunlocal"):
        load(f"{REPO / 'configs' / name}:norunlocal")
    # Each file opens with the command that runs it.
    doc = (REPO / "configs" / name).read_text().split('"""')[1]
    assert f"--config=configs/{name}" in doc.splitlines()[0] + doc.splitlines()[1]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_runlocal_is_applied_once_after_the_variant(name, monkeypatch):
    variant = importlib.import_module(f"configs.{name[:-3]}")
    calls = []
    apply = default.apply_runlocal
    monkeypatch.setattr(default, "apply_runlocal", lambda config: (calls.append(1), apply(config)))
    small = variant.get_config("runlocal")
    assert len(calls) == 1
    expected = copy.deepcopy(variant.get_config(""))
    assert len(calls) == 1
    apply(expected)
    assert small.to_dict() == expected.to_dict()


def test_runlocal_shrinks_what_a_variant_sets():
    assert gpu.get_config("").input.image_size == 224
    small = gpu.get_config("runlocal")
    assert (small.input.image_size, small.model.dtype, small.model.conv_impl) == (32, "float32", "auto")
    pod = tpu_pod.get_config("runlocal")
    assert (pod.mesh.fsdp, pod.distributed.auto, pod.model.name) == (1, False, "tiny")


def test_the_input_settings_are_input_configs_fields():
    config = default.get_config()
    assert set(config.input) == {f.name for f in dataclasses.fields(InputConfig)}
    assert InputConfig.from_config(config.input) == dataclasses.replace(InputConfig(), cache=True)
    config.input.exclude = {"Manufacturer": ["SIEMENS", "GE"]}
    assert InputConfig.from_config(config.input).exclude == (("Manufacturer", ("SIEMENS", "GE")),)
    # A config saved before a field existed gets its default; an unknown field is an error.
    assert InputConfig.from_config({"image_size": 64, "normalisation": "max",
                                    "percentiles": [1, 99], "augment": True}).logical_shards == 16
    with pytest.raises(ValueError, match="no such input setting imag_size"):
        InputConfig.from_config({"imag_size": 64})


def test_the_resume_fields_are_declared_with_the_config():
    config = default.get_config()
    names = set(config.to_dict()) | {f"input.{k}" for k in config.input}
    assert set(config.resume.fixed) <= names and set(config.resume.free) <= names
    saved = config.to_dict()
    for key, value, named in (("batch_size", 32, "batch_size: 128 -> 32"),
                              ("optim.learning_rate", 0.5, "optim.learning_rate: 0.001 -> 0.5"),
                              ("input.logical_shards", 8, "input.logical_shards: 16 -> 8")):
        changed = copy.deepcopy(config)
        changed.update_from_flattened_dict({key: value})
        with pytest.raises(ValueError, match=named.replace(".", r"\.")):
            train._check_resumable(changed.to_dict(), saved, changed.resume)
    free = copy.deepcopy(config)
    free.update_from_flattened_dict({"input.workers": 4, "input.cache": False, "eval_batch_size": 8})
    train._check_resumable(free.to_dict(), saved, free.resume)
