"""The TensorFlow-free reader of the prepared records (iap_jax.io.records) against TFDS, the
writer: the same examples, and checksums that catch damage."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import train_data

from iap_jax.core.iaps import IAP_NAMES
from iap_jax.io import records
from iap_jax.training import input_pipeline


@pytest.fixture(scope="module", params=["zlib", "none"])
def dataset_dir(request, tmp_path_factory):
    return train_data.write_dataset(str(tmp_path_factory.mktemp(f"records_{request.param}")),
                                    num_train=24, num_validation=8,
                                    image_encoding=request.param)


def test_rows_equal_what_tfds_decodes(dataset_dir):
    reader = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    assert reader.info.image_encoding == ("none" if "records_none" in dataset_dir else "zlib")
    rows = reader.row_reader.rows(np.arange(reader.split_size)[::-1].copy())
    expected = list(tfds.as_numpy(tfds.builder_from_directory(dataset_dir).as_dataset(
        split="train", shuffle_files=False)))[::-1]
    np.testing.assert_array_equal(rows["image"], np.stack([e["image"] for e in expected]))
    np.testing.assert_array_equal(rows["scale"], [e["intensity_scale"] for e in expected])
    for name in IAP_NAMES:
        labels = rows["labels"][name]
        assert list(labels["value"]) == [e["labels"][name]["value"] for e in expected]
        np.testing.assert_array_equal(labels["state"], [e["labels"][name]["state"] for e in expected])
        np.testing.assert_array_equal(labels["number"], [e["labels"][name]["number"] for e in expected])
    examples = list(input_pipeline.split_examples(dataset_dir, "train"))
    assert [e.series for e in examples] == [e["series"].decode() for e in expected[::-1]]


def _damaged_copy(dataset_dir, tmp_path, where) -> str:
    """A copy of the train shard with one byte flipped at `where(offsets, lengths)`."""
    source = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    path = source.split_info.files[0]
    with open(path, "rb") as f:
        offsets, lengths = records.scan_offsets(f, path)
    data = bytearray(open(path, "rb").read())
    data[where(offsets, lengths)] ^= 0xFF
    out = str(tmp_path / "shard.tfrecord")
    with open(out, "wb") as f:
        f.write(bytes(data))
    return out


def test_a_damaged_record_is_named_and_the_rest_is_read(dataset_dir, tmp_path):
    # A byte of record 3's data: its checksum fails; the records after it are still read.
    path = _damaged_copy(dataset_dir, tmp_path, lambda o, n: int(o[3]) + 12 + int(n[3]) // 2)
    with open(path, "rb") as f:
        items = list(records.iter_records(f, path))
    assert len(items) == 24
    bad = [i for i, item in enumerate(items) if isinstance(item, records.CorruptRecordError)]
    assert bad == [3] and "record 3" in str(items[3]) and "data checksum" in str(items[3])
    assert path in str(items[3])
    # A byte of record 5's length: nothing after it can be located, so reading stops there.
    path = _damaged_copy(dataset_dir, tmp_path, lambda o, n: int(o[5]) + 1)
    with open(path, "rb") as f, pytest.raises(records.CorruptRecordError, match="record 5.*length"):
        list(records.iter_records(f, path))
    with open(path, "rb") as f, pytest.raises(records.CorruptRecordError, match="record 5"):
        records.scan_offsets(f, path)


def test_training_refuses_a_damaged_record_naming_its_file(dataset_dir, tmp_path):
    reader = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    path = reader.split_info.files[0]
    with open(path, "rb") as f:
        offsets, lengths = records.scan_offsets(f, path)
    reader.row_reader.index_positions(np.arange(24))
    data = bytearray(open(path, "rb").read())
    data[int(offsets[2]) + 20] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    try:
        with pytest.raises(ValueError, match=f"{os.path.basename(path)}: record 2 .*checksum"):
            reader.row_reader.rows(np.arange(4))
    finally:
        data[int(offsets[2]) + 20] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(data))


def test_records_encoded_without_tensorflow_read_back_in_tfds(dataset_dir):
    from data_prep.features import example_features

    reader = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    info = reader.info
    features = example_features(info.image_size, info.image_encoding)
    rows = reader.row_reader.rows(np.arange(4))
    for i, example in enumerate(list(input_pipeline.split_examples(dataset_dir, "train"))[:4]):
        data = records.encode_example(
            rows["image"][i], example.scale, example.offset, example.patient, example.series,
            example.phase, example.slice_index, 1,
            {k: (s, v.decode(), x) for k, (s, v, x) in example.labels.items()},
            info.image_encoding)
        back = features.deserialize_example_np(data)
        np.testing.assert_array_equal(back["image"], rows["image"][i])
        assert back["series"].decode() == example.series and back["phase"] == example.phase
        for name in IAP_NAMES:
            state, value, number = example.labels[name]
            assert back["labels"][name]["value"] == value and back["labels"][name]["state"] == state
            np.testing.assert_equal(back["labels"][name]["number"], number)
