"""Fixtures shared by the training tests."""
import pytest

import predict_data
import train_data


@pytest.fixture(scope="session")
def train_dataset_dir(tmp_path_factory):
    """A small dataset in the prepared layout whose images show their labels."""
    return train_data.write_dataset(str(tmp_path_factory.mktemp("train_data")), num_train=64,
                                    num_validation=16)


@pytest.fixture
def compiled_programs_cache(tmp_path_factory):
    """Training runs of a test share compiled programs (a resumed run reads them back)."""
    with train_data.compilation_cache(str(tmp_path_factory.getbasetemp() / "jax_cache")):
        yield


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """Synthetic DICOM, prepared at 32 px, and a tiny model trained on it (predictor tests)."""
    return predict_data.make_run(str(tmp_path_factory.mktemp("trained_run")))
