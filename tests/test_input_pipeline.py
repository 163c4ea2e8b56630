import numpy as np
import pytest

import train_data

from iap_jax.core.labels import LabelEncoding
from iap_jax.training import input_pipeline


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return train_data.write_dataset(str(tmp_path_factory.mktemp("data")), num_train=40,
                                    num_validation=10)


def _encoding(dataset_dir):
    return LabelEncoding.from_stats(input_pipeline.load_split_stats(dataset_dir))


def test_resumed_stream_repeats_the_uninterrupted_one(dataset_dir):
    cfg = input_pipeline.InputConfig(augment=True, logical_shards=8)
    reader = input_pipeline.SplitReader(dataset_dir, "train", cfg)
    enc = _encoding(dataset_dir)
    stream = input_pipeline.train_batches(reader, enc, 8, seed=3)
    full = [next(stream)["image"] for _ in range(8)]  # 5 steps per epoch: crosses an epoch
    resumed = input_pipeline.train_batches(reader, enc, 8, seed=3, start_step=4)
    for expected in full[4:]:
        np.testing.assert_array_equal(next(resumed)["image"], expected)
    assert not np.array_equal(full[0], full[5])  # epochs are shuffled differently
    assert full[0].shape == (8, 32, 32) and full[0].dtype == np.uint16  # as stored


def test_process_shares_are_disjoint_and_eval_pads_with_masks(dataset_dir):
    cfg = input_pipeline.InputConfig(normalisation="percentile", image_size=16)
    enc = _encoding(dataset_dir)
    seen = []
    for index in range(2):
        reader = input_pipeline.SplitReader(dataset_dir, "validation", cfg, process_index=index,
                                            process_count=2)
        batches = list(input_pipeline.eval_batches(reader, enc, 4))
        assert len(batches) == 2  # 5 examples per process -> 2 batches of 4, the last padded
        assert batches[0]["image"].shape == (4, 32, 32)
        assert batches[0]["scale"].shape == batches[0]["offset"].shape == (4,)
        masks = np.concatenate([b["masks"]["Manufacturer"] for b in batches])
        assert masks.sum() == 5
        seen.append(np.concatenate([b["image"] for b in batches])[masks > 0])
    assert not any(np.array_equal(a, b) for a in seen[0] for b in seen[1])


def test_bad_dataset_dir_and_split_are_named(dataset_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such dataset"):
        input_pipeline.SplitReader(str(tmp_path / "nope"), "train", input_pipeline.InputConfig())
    with pytest.raises(ValueError, match="no split 'test'"):
        input_pipeline.SplitReader(dataset_dir, "test", input_pipeline.InputConfig())
    with pytest.raises(ValueError, match="normalisation"):
        input_pipeline.SplitReader(dataset_dir, "train",
                                   input_pipeline.InputConfig(normalisation="zscore"))


def test_excluded_values_leave_every_split_and_the_counts(dataset_dir):
    cfg = input_pipeline.InputConfig(exclude=(("Manufacturer", ("SIEMENS",)),))
    full = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    kept = input_pipeline.SplitReader(dataset_dir, "train", cfg)
    rows = kept.row_reader.rows(kept.share_positions())
    makers = list(rows["labels"]["Manufacturer"]["value"])
    assert makers and set(makers) == {b"GE MEDICAL SYSTEMS"}
    assert kept.split_size == len(makers) < full.split_size
    shares = [input_pipeline.SplitReader(dataset_dir, "train", cfg, process_index=i, process_count=2)
              for i in range(2)]
    assert sum(len(s.share_positions()) for s in shares) == len(makers)
    assert shares[0].min_process_examples == min(len(s.share_positions()) for s in shares)
    with pytest.raises(ValueError, match="unknown IAPs"):
        input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig(
            exclude=(("Colour", ("red",)),)))


def _steps(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("exclude", [(), (("Manufacturer", ("SIEMENS",)),)])
def test_global_batches_are_the_same_on_any_process_count_and_with_the_cache(dataset_dir, exclude):
    enc = _encoding(dataset_dir)
    base = dict(logical_shards=4, augment=True, exclude=exclude)
    one = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig(**base))
    steps = input_pipeline.steps_per_epoch(one, 8)
    reference = _steps(input_pipeline.train_batches(one, enc, 8, seed=5), 2 * steps + 1)
    for processes, cache in ((1, True), (2, False), (4, True), (2, True)):
        cfg = input_pipeline.InputConfig(**base, cache=cache)
        readers = [input_pipeline.SplitReader(dataset_dir, "train", cfg, process_index=i,
                                              process_count=processes) for i in range(processes)]
        assert {input_pipeline.steps_per_epoch(r, 8 // processes) for r in readers} == {steps}
        streams = [input_pipeline.train_batches(r, enc, 8 // processes, seed=5, start_step=1)
                   for r in readers]
        for expected in reference[1:]:  # resumed at step 1, across two epoch ends
            parts = [next(s) for s in streams]
            for key in ("image", "scale", "offset"):
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                              expected[key])
            np.testing.assert_array_equal(
                np.concatenate([p["targets"]["Manufacturer"] for p in parts]),
                expected["targets"]["Manufacturer"])
    # Every kept example of an epoch appears at most once; epochs differ in order.
    first = np.concatenate([b["image"] for b in reference[:steps]])
    assert len({x.tobytes() for x in first}) == len(first)
    assert not np.array_equal(reference[0]["image"], reference[steps]["image"])


def test_logical_shards_must_fit_processes_and_batch(dataset_dir):
    enc = _encoding(dataset_dir)
    with pytest.raises(ValueError, match="multiple of the process count"):
        input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig(logical_shards=4),
                                   process_index=0, process_count=3)
    reader = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig(logical_shards=4))
    with pytest.raises(ValueError, match="logical_shards=4"):
        next(input_pipeline.train_batches(reader, enc, 6, seed=0))


def test_reader_processes_give_the_batches_of_the_training_process(dataset_dir):
    encoding = _encoding(dataset_dir)

    def batches(workers, cache):
        cfg = input_pipeline.InputConfig(logical_shards=4, workers=workers, cache=cache)
        reader = input_pipeline.SplitReader(dataset_dir, "train", cfg)
        stream = input_pipeline.train_batches(reader, encoding, 8, seed=2, start_step=1)
        out = [next(stream) for _ in range(5)]
        stream.close()
        return out

    reference = batches(0, False)
    for workers, cache in ((2, False), (2, True)):
        for expected, got in zip(reference, batches(workers, cache)):
            np.testing.assert_array_equal(np.asarray(got["image"]), expected["image"])
            np.testing.assert_array_equal(np.asarray(got["targets"]["FlipAngle"]),
                                          expected["targets"]["FlipAngle"])


def test_reader_processes_refuse_more_shared_memory_than_there_is():
    from iap_jax.training import reader_pool

    stream = reader_pool.in_processes(dict, range(3), 2, (10**6, 1024, 1024), 4)
    with pytest.raises(RuntimeError, match="shared memory.*input.workers"):
        next(stream)
