"""The salt: generated once per data dir, kept private beside the datasets, never in them."""
import os
import stat

import pytest
import tensorflow_datasets as tfds

import prep_series
from data_prep.builder import prepare
from data_prep.splits import salted_hash

from iap_jax.io.salt import SALT_ENV, SALT_FILE, resolve_salt

NUM_PATIENTS = 6


@pytest.fixture(autouse=True)
def no_salt_in_environment(monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dicom"))
    return root, prep_series.write_duke_cohort(root, NUM_PATIENTS, num_slices=2)


def split_by_patient(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    owner = {}
    for split in builder.info.splits:
        for e in tfds.as_numpy(builder.as_dataset(split=split)):
            assert owner.setdefault(e["patient"].decode(), split) == split
    return owner


def test_generated_salt_is_kept_private_reused_and_never_in_the_dataset(archive, tmp_path, capsys):
    root, patients = archive
    data_dir = tmp_path / "data"
    options = dict(image_size=8, split=(0.4, 0.3, 0.3), progress=False)
    pre = prepare(root, str(data_dir), **options)
    salt_file = data_dir / SALT_FILE
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = salt_file.read_text().strip()
    assert len(salt) == 32
    assert f"salt: generated and kept in {salt_file}" in capsys.readouterr().out

    every_phase = prepare(root, str(data_dir), phases="all", **options)
    assert salt_file.read_text().strip() == salt
    assert str(salt_file) in capsys.readouterr().out
    first, second = split_by_patient(pre), split_by_patient(every_phase)
    assert first == second
    assert set(first) == {salted_hash(salt, "patient", pid) for pid in patients}

    dataset_files = [os.path.join(folder, name)
                     for folder, _, names in os.walk(data_dir / "iap_dataset") for name in names]
    assert dataset_files and SALT_FILE not in {os.path.basename(p) for p in dataset_files}
    for path in dataset_files:
        assert salt.encode() not in open(path, "rb").read(), path


def test_config_name_does_not_depend_on_the_salt(archive, tmp_path):
    root, _ = archive
    salts = ("first-salt-7a1c", "second-salt-93be")
    dirs = [prepare(root, str(tmp_path / s), salt=s, image_size=8, slices="stride:2", progress=False)
            for s in salts]
    assert os.path.relpath(dirs[0], tmp_path / salts[0]) == os.path.relpath(dirs[1], tmp_path / salts[1])
    assert "_" in os.path.basename(os.path.dirname(dirs[0]))[len("pre_8"):], "options digest expected"
    assert not (tmp_path / salts[0] / SALT_FILE).exists()
    assert set(split_by_patient(dirs[0])).isdisjoint(split_by_patient(dirs[1]))
    for dataset_dir, salt in zip(dirs, salts):
        for name in os.listdir(dataset_dir):
            assert salt.encode() not in open(os.path.join(dataset_dir, name), "rb").read()


def test_salt_sources_and_conflicts(tmp_path, monkeypatch):
    quiet = lambda *_: None  # noqa: E731
    assert resolve_salt(str(tmp_path / "a"), "given", quiet) == "given"
    assert not (tmp_path / "a" / SALT_FILE).exists()
    monkeypatch.setenv(SALT_ENV, "from-env")
    assert resolve_salt(str(tmp_path / "a"), None, quiet) == "from-env"
    monkeypatch.delenv(SALT_ENV)
    kept = resolve_salt(str(tmp_path / "b"), None, quiet)
    assert resolve_salt(str(tmp_path / "b"), None, quiet) == kept
    assert resolve_salt(str(tmp_path / "b"), kept, quiet) == kept
    with pytest.raises(ValueError, match="prep_salt"):
        resolve_salt(str(tmp_path / "b"), "another", quiet)
    (tmp_path / "b" / SALT_FILE).write_text("")
    with pytest.raises(ValueError, match="empty"):
        resolve_salt(str(tmp_path / "b"), None, quiet)


def test_a_kill_while_writing_the_salt_leaves_no_empty_salt_file(tmp_path, monkeypatch):
    from iap_jax.io import salt as salt_lib

    def killed(fd):  # the process dies before the salt is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(salt_lib.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        resolve_salt(str(tmp_path), announce=lambda message: None)
    assert os.listdir(tmp_path) == []  # neither an empty prep_salt nor a temporary file
    monkeypatch.undo()
    salt = resolve_salt(str(tmp_path), announce=lambda message: None)
    assert salt and open(tmp_path / SALT_FILE).read().strip() == salt
    assert stat.S_IMODE(os.stat(tmp_path / SALT_FILE).st_mode) == 0o600
