"""The Beam path at scale: the pipeline starts from work-items files (a line per series),
never from every slice, and several Beam workers write the same dataset, example for
example, as the multiprocessing path."""
import json
import math
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions
from etils import epath

import prep_series
from local_paths_view import by_path
from data_prep import builder as builder_lib
from data_prep.builder import REPORT_FILE, IapDataset, make_config, prepare, read_work_items
from data_prep.examples import SliceItem
from data_prep.synthetic.cohort import generate_cohort

pytestmark = [pytest.mark.beam, pytest.mark.slow]

NUM_PATIENTS, NUM_SLICES = 4, 3
# The salt puts the 4 patients into every split (2, 1, 1).
OPTIONS = dict(phases="all", image_size=16, split=(0.5, 0.25, 0.25), salt="beam test salt 3",
               progress=False)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    rows = generate_cohort(root, NUM_PATIENTS, seed=7, preset="small", phases="all",
                           slices=NUM_SLICES)
    dce = [r for r in rows if int(r["fat_suppressed"])]
    folder = os.path.join(root, dce[0]["series_dir"])
    broken = os.path.join(dce[0]["series_dir"], sorted(os.listdir(folder))[0])
    prep_series.corrupt_pixels(os.path.join(root, broken))
    return root, len(dce), broken


@pytest.fixture(scope="module")
def both_ways(archive, tmp_path_factory):
    """The dataset written by two local processes, and by the DirectRunner with two worker
    processes, from work-items files of two series each (so each split has several). The
    workers are processes of their own, as on a cluster: they unpickle the pipeline's
    functions and read the work-items files themselves."""
    root, _, _ = archive
    local_dir = str(tmp_path_factory.mktemp("local"))
    local = prepare(root, local_dir, workers=2, **OPTIONS)
    beam_dir = str(tmp_path_factory.mktemp("beam"))
    # [] : Beam would otherwise parse the test runner's command line as pipeline options.
    options = PipelineOptions([], direct_num_workers=2, direct_running_mode="multi_processing")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder_lib, "WORK_SHARD_SERIES", 2)
        written = {}
        patch.setattr(builder_lib, "write_work_items", recording(builder_lib.write_work_items, written))
        beam_dataset = prepare(root, beam_dir, beam_runner="DirectRunner", beam_options=options,
                               **OPTIONS)
    return (local_dir, local), (beam_dir, beam_dataset), written


def recording(write, written):
    """write_work_items, keeping the paths it wrote per split in `written`."""
    def write_and_record(items, folder, split, *args):
        written[split] = write(items, folder, split, *args)
        return written[split]
    return write_and_record


def read_in_order(dataset_dir):
    builder = tfds.builder_from_directory(dataset_dir)
    return {split: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
            for split in builder.info.splits}


def assert_same(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for name in a:
            assert_same(a[name], b[name], f"{where}/{name}")
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where
    else:
        np.testing.assert_equal(a, b, err_msg=where)


def example_key(example):
    return f"{example['series'].decode()}_{int(example['slice_index']):05d}"


def test_beam_workers_write_the_multiprocessing_dataset(archive, both_ways):
    _, num_series, broken = archive
    (local_dir, local), (beam_dir, beam_dataset), written = both_ways
    a, b = read_in_order(local), read_in_order(beam_dataset)
    assert list(a) == list(b) and set(a) == {"train", "validation", "test"}
    for split in a:
        assert len(a[split]) == len(b[split]) > 0, split
        assert [example_key(e) for e in a[split]] == [example_key(e) for e in b[split]], split
        for index, (x, y) in enumerate(zip(a[split], b[split])):
            assert_same(x, y, f"{split}[{index}]")
    total = sum(len(examples) for examples in a.values())
    assert total == num_series * NUM_SLICES - 1  # the corrupt slice is skipped
    # The same report: counts, skips (the decode skip came from a Beam worker's side output).
    local_report = json.loads((epath.Path(local_dir) / REPORT_FILE).read_text())
    beam_report = json.loads((epath.Path(beam_dir) / REPORT_FILE).read_text())
    assert beam_report == local_report
    assert [p for p in by_path(beam_report["skipped"], beam_dir) if p.endswith(".dcm")] == [broken]
    assert beam_report["slices"]["skipped_at_decode"] == 1
    for name in ("iap_stats.json", "prep_options.json"):
        assert (epath.Path(beam_dataset) / name).read_text() == (epath.Path(local) / name).read_text()
    # A work-items file per two series, removed with the skips when the build ended.
    series = {split: {e["series"] for e in examples} for split, examples in a.items()}
    assert {split: len(paths) for split, paths in written.items()} == \
        {split: math.ceil(len(s) / 2) for split, s in series.items()}
    assert min(len(paths) for paths in written.values()) >= 2
    assert not [p for p in os.listdir(beam_dir) if p.startswith((".beam_work", ".beam_skips"))]


def slice_items(num_series, num_slices):
    nan = float("nan")
    return [SliceItem(key=f"s{s:03d}_{i:05d}", path=f"/archive/{s}/{i}.dcm",
                      file_key=f"k{s}-{i}", frame=0, patient=f"p{s // 2}", series=f"s{s:03d}",
                      phase=s % 3, slice_index=i, num_slices=num_slices,
                      iaps=((0, "SIEMENS", nan), (0, "", 2.81 + i), (2, "", nan)))
            for s in range(num_series) for i in range(num_slices)]


def transforms_in(pipeline):
    """{full label: transform} of every transform of a pipeline graph, composites included."""
    found = {}

    class Visitor(beam.pipeline.PipelineVisitor):
        def enter_composite_transform(self, node):
            found[node.full_label] = node.transform

        def visit_transform(self, node):
            found[node.full_label] = node.transform

    pipeline.visit(Visitor())
    return found


def test_pipeline_graph_holds_work_files_not_slices(tmp_path):
    """40 series of 5 slices: the pipeline is created from 3 work-items files (16 series
    each), not from 200 slices; the files hold every slice, in order."""
    items = slice_items(40, 5)
    dataset = IapDataset(config=make_config(image_size=16), data_dir=str(tmp_path), progress=False)
    pipeline = beam.Pipeline(runner="DirectRunner")
    _ = pipeline | "train" >> dataset._beam_transform(items, "train")
    transforms = transforms_in(pipeline)
    creates = {label: list(t.values) for label, t in transforms.items() if isinstance(t, beam.Create)}
    paths = creates.pop("train/work_files")
    assert all(len(values) <= 1 for values in creates.values()), creates  # WriteToText's own
    assert len(paths) == math.ceil(40 / builder_lib.WORK_SHARD_SERIES) == 3
    assert all(epath.Path(p).parent == tmp_path / ".beam_work.pre_16" for p in paths)
    lines = [line for p in paths for line in epath.Path(p).read_text().splitlines()]
    assert len(lines) == 40
    read_back = [item for p in paths for item in read_work_items(p)]
    assert len(read_back) == len(items)
    for original, read in zip(items, read_back):
        assert isinstance(read.iaps, tuple) and all(isinstance(iap, tuple) for iap in read.iaps)
        np.testing.assert_equal(read.__dict__, original.__dict__)  # NaN equals NaN here
    for step in ("work_files", "read_items", "spread", "decode"):  # read, then spread, then decode
        assert f"train/{step}" in transforms, step
    assert isinstance(transforms["train/spread"], beam.Reshuffle)
