"""Training-input throughput per CPU core at 224 px: read, decode, batch, label encoding
(and, separately, the restore + normalise of preprocess.model_input on the CPU), the
TensorFlow-free reader of the training loop beside the tf.data pipeline it replaced.

The dataset is made with the project's own prep (iap-synth small preset, then iap-prep
--image-size 224; a few hundred slices, kept under --data-dir and reused), once per image
encoding of iap-prep (--image-encoding):

  zlib          zlib-compressed uint16 images (the prep's default)
  raw           uncompressed uint16 images

Paths measured, each in a process pinned to `threads` cores (sched_setaffinity):

  train_batches   input_pipeline.train_batches, the training loop's own iterator
                  (iap_jax.io.records + Grain; with more than one core, one reader process per
                  core), after its first epoch
  tfdata          the tf.data pipeline the training loop used before (TFDS as_dataset, the
                  per-example map, shuffle, batch, tfds.as_numpy, the label encoding), one
                  pipeline repeated over epochs, tf.data's pools set to `threads`: the
                  reference (needs the [prep] extra's TensorFlow)
  +cache          the decoded records held in memory after the first epoch
                  (InputConfig(cache=True) for train_batches, tf.data cache() for tfdata)
  encode          LabelEncoding.encode alone (the Python step every path ends with)
  model_input     preprocess.model_input (restore + max / percentile normalise), jitted on
                  the CPU: on an accelerator it runs inside the train step instead

The table gives img/s (wall clock), img/s per pinned core, img per CPU-second of the
process and its reader processes (all their threads: robust to other jobs sharing the
cores) and the cores a host needs for --target images/s at that CPU cost.

  python bench/input.py [--threads 1,2] [--batch 64] [--seconds 3] [--data-dir DIR]
  (--threads 0: every core of the machine, the rate one host gives)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join("bench", "results", "input_data")
DEFAULT_OUT = os.path.join("bench", "results", "input.json")
# One H200 trains the ResNet-18 at about 17.5k images/s (bench/README.md, bench/train.py): an
# 8-GPU node needs this many training images per second from its host.
NODE_TARGET = 140_000
FORMATS = ("zlib", "raw")
# (path, format, cache) of every measured row, in table order: each new row beside its
# tf.data reference.
PATHS = (
    ("train_batches", "zlib", False), ("tfdata", "zlib", False),
    ("train_batches", "raw", False), ("tfdata", "raw", False),
    ("train_batches", "zlib", True), ("tfdata", "zlib", True),
    ("train_batches", "raw", True), ("tfdata", "raw", True),
    ("encode", "zlib", False),
    ("model_input_max", "zlib", False), ("model_input_percentile", "zlib", False),
)


def _path_key(path: str, fmt: str, cache: bool) -> str:
    return f"{path}:{fmt}" + (":cache" if cache else "")


# ----------------------------------------------------------------- the dataset


def _run_cli(module_main: str, argv: list[str]) -> None:
    """One of the project's console scripts, in a subprocess of this interpreter."""
    module, function = module_main.rsplit(":", 1)
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{module_main} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def dataset_dirs(data_dir: str, patients: int, slices: int, image_size: int,
                 workers: int = 2, formats=FORMATS) -> dict[str, str]:
    """{format: dataset dir} of the bench dataset in `formats` (and zlib, the prep's
    default), each prepared by iap-prep from one synthetic cohort on first use, then reused."""
    base = os.path.join(data_dir, f"synth_p{patients}_s{slices}_{image_size}px")

    def found(fmt: str) -> str | None:  # the prep names a non-default config with a hash
        made = glob.glob(os.path.join(base, fmt, "iap_dataset", f"pre_{image_size}*", "1.0.0",
                                      "dataset_info.json"))
        return os.path.dirname(made[0]) if made else None

    wanted = [fmt for fmt in FORMATS if fmt == "zlib" or fmt in formats]
    missing = [fmt for fmt in wanted if found(fmt) is None]
    if missing:
        dicom = os.path.join(base, "dicom")
        start = time.perf_counter()
        if not os.path.isdir(dicom):
            _run_cli("data_prep.synthetic.cli:main", [
                "--out", dicom, "--patients", str(patients), "--seed", "0", "--preset", "small",
                "--slices", str(slices), "--workers", str(workers)])
        for fmt in missing:
            _run_cli("data_prep.cli:main", [
                "--dicom-root", dicom, "--data-dir", os.path.join(base, fmt), "--image-size",
                str(image_size), "--workers", str(workers), "--salt", "bench-input",
                "--image-encoding", {"zlib": "zlib", "raw": "none"}[fmt]])
        shutil.rmtree(dicom, ignore_errors=True)
        print(f"bench dataset ({', '.join(missing)}) made with iap-synth + iap-prep in "
              f"{time.perf_counter() - start:.0f} s: {base}", file=sys.stderr)
    return {fmt: found(fmt) for fmt in wanted}


def bytes_per_image(dataset_dir: str) -> float:
    """Bytes of the train split's record files per example."""
    with open(os.path.join(dataset_dir, "dataset_info.json")) as f:
        info = json.load(f)
    train = next(s for s in info["splits"] if s["name"] == "train")
    return int(train["numBytes"]) / sum(int(n) for n in train["shardLengths"])


# ----------------------------------------------------------------- one measurement


def _cpu_s() -> float:
    """CPU seconds of this process and of its live descendants (the reader processes)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime + sum(_proc_cpu_s(p) for p in _descendants(os.getpid()))


def _descendants(pid: int) -> list[int]:
    found = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for child in children:
            found += [child] + _descendants(child)
    return found


def _proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:  # ended meanwhile
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _pin(threads: int) -> int:
    """Pins this process to `threads` of its cores; returns how many it got."""
    cores = sorted(os.sched_getaffinity(0))
    cores = cores[:max(1, min(threads, len(cores)))]
    os.sched_setaffinity(0, set(cores))
    return len(cores)


def _encoding(dataset_dir: str):
    """The default config's label encoding of the train split (configs/default.py)."""
    from iap_jax.training import input_pipeline
    from iap_jax.core.labels import LabelEncoding

    return LabelEncoding.from_stats(input_pipeline.load_split_stats(dataset_dir, "train"),
                                    transforms={"EchoTime": "log", "RepetitionTime": "log"},
                                    always_other=True)


def _timed(next_batch, warmup: int, seconds: float, min_batches: int = 4) -> dict:
    for _ in range(warmup):
        next_batch()
    images, batches = 0, 0
    start, cpu = time.perf_counter(), _cpu_s()
    while batches < min_batches or time.perf_counter() - start < seconds:
        images += next_batch()
        batches += 1
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    return {"images": images, "wall_s": wall, "cpu_s": cpu}


def _input_config(cores: int, cache: bool):
    """One reader process per core where there are several (else a reader thread)."""
    from iap_jax.training.input_pipeline import InputConfig

    return InputConfig(workers=cores if cores > 1 else 0, cache=cache)


def _measure_train_batches(dataset_dir: str, threads: int, batch: int, cache: bool,
                           seconds: float) -> dict:
    """input_pipeline.train_batches as the training loop calls it: the first epoch
    (with cache: reading the files into memory) apart, then whole epochs."""
    from iap_jax.training import input_pipeline

    reader = input_pipeline.SplitReader(dataset_dir, "train", _input_config(threads, cache))
    steps = input_pipeline.steps_per_epoch(reader, batch)
    stream = input_pipeline.train_batches(reader, _encoding(dataset_dir), batch, seed=0)
    start = time.perf_counter()
    for _ in range(steps):
        next(stream)
    first_epoch_s = time.perf_counter() - start
    epochs, images, first_batch_s = 0, 0, []
    start, cpu = time.perf_counter(), _cpu_s()
    while epochs < 2 or time.perf_counter() - start < seconds:
        for step in range(steps):
            before = time.perf_counter()
            images += len(next(stream)["image"])
            if step == 0:
                first_batch_s.append(time.perf_counter() - before)
        epochs += 1
    wall, cpu = time.perf_counter() - start, _cpu_s() - cpu
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "epochs": epochs,
            "images_per_epoch": steps * batch, "epoch_s": wall / epochs,
            "epoch_first_batch_s": sum(first_batch_s) / len(first_batch_s),
            "first_epoch_s": first_epoch_s}


def _measure_tfdata(dataset_dir: str, threads: int, batch: int, cache: bool,
                    seconds: float) -> dict:
    """The reference: the tf.data pipeline training used before, repeated over epochs."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from iap_jax.core.iaps import IAP_NAMES

    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    builder = tfds.builder_from_directory(dataset_dir)
    encoding = _encoding(dataset_dir)
    examples = builder.info.splits["train"].num_examples
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads

    def raw_example(example):
        return {"image": example["image"], "scale": example["intensity_scale"],
                "offset": example["intensity_offset"],
                "labels": {name: {key: example["labels"][name][key]
                                  for key in ("value", "number", "state")} for name in IAP_NAMES}}

    ds = builder.as_dataset(split="train", shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False)).with_options(options)
    ds = ds.map(raw_example, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    ds = (ds.repeat().shuffle(min(10_000, examples), seed=0)
          .batch(batch, drop_remainder=True).prefetch(2))
    batches = iter(tfds.as_numpy(ds))

    def next_batch() -> int:
        raw = next(batches)
        targets, masks = encoding.encode(raw["labels"])
        return len(raw["image"])

    # The first pass (all of it, with the cache: filling it) is not timed.
    return _timed(next_batch, warmup=examples // batch + 2, seconds=seconds)


def _one_batch(dataset_dir: str, batch: int) -> dict:
    import numpy as np

    from iap_jax.training import input_pipeline

    reader = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    positions = reader.share_positions()
    return reader.row_reader.rows(np.resize(positions, batch))


def _measure_encode(dataset_dir: str, threads: int, batch: int, seconds: float) -> dict:
    raw = _one_batch(dataset_dir, batch)
    encoding = _encoding(dataset_dir)

    def next_batch() -> int:
        encoding.encode(raw["labels"])
        return batch

    return _timed(next_batch, warmup=1, seconds=seconds)


def _measure_model_input(dataset_dir: str, threads: int, batch: int, normalisation: str,
                         seconds: float) -> dict:
    import jax

    from iap_jax.training import input_pipeline
    from iap_jax.core.preprocess import model_input

    raw = _one_batch(dataset_dir, batch)
    reader = input_pipeline.SplitReader(dataset_dir, "train",
                                        input_pipeline.InputConfig(normalisation=normalisation))
    spec = input_pipeline.pixel_spec(reader)
    step = jax.jit(lambda i, s, o: model_input(i, s, o, spec))
    args = [jax.device_put(raw[k]) for k in ("image", "scale", "offset")]

    def next_batch() -> int:
        jax.block_until_ready(step(*args))
        return batch

    return _timed(next_batch, warmup=2, seconds=seconds)


def measure(key: str, dataset_dir: str, threads: int, batch: int, seconds: float) -> dict:
    cores = _pin(threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    path, fmt, *rest = key.split(":")
    cache = bool(rest)
    if path == "train_batches":
        result = _measure_train_batches(dataset_dir, cores, batch, cache, seconds)
    elif path == "tfdata":
        result = _measure_tfdata(dataset_dir, cores, batch, cache, seconds)
    elif path == "encode":
        result = _measure_encode(dataset_dir, threads, batch, seconds)
    elif path.startswith("model_input_"):
        result = _measure_model_input(dataset_dir, threads, batch, path.split("_", 2)[2], seconds)
    else:
        raise ValueError(f"unknown path {key!r}")
    images_per_s = result["images"] / result["wall_s"]
    return {**result, "cores": cores, "images_per_s": images_per_s,
            "images_per_s_per_core": images_per_s / cores,
            "images_per_cpu_s": result["images"] / max(result["cpu_s"], 1e-9)}


# ----------------------------------------------------------------- driver


def _in_subprocess(key: str, dataset_dir: str, threads: int, args) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", key, "--worker-dir", dataset_dir,
               "--threads", str(threads), "--batch", str(args.batch), "--seconds", str(args.seconds)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": next((l for l in reversed(lines) if "Error" in l), lines[-1] if lines else "failed")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _describe(path: str, fmt: str, cache: bool) -> str:
    names = {"train_batches": "train_batches", "tfdata": "tf.data (before)",
             "encode": "label encode only", "model_input_max": "model_input max (XLA CPU)",
             "model_input_percentile": "model_input pct (XLA CPU)"}
    label = names[path] + (" +cache" if cache else "")
    return label if path in ("encode",) or path.startswith("model_input") else f"{fmt:<17} {label}"


def print_table(rows: list[dict], target: int) -> None:
    header = (f"{'format / path':<38} {'cores':>5} {'img/s':>8} {'img/s/core':>10} {'img/CPU-s':>9} "
              f"{'cores@' + format(target // 1000) + 'k':>9} {'epoch s':>8}  note")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['label']:<38} {row['threads']:>5} {'-':>8} {'-':>10} {'-':>9} {'-':>9} "
                  f"{'-':>8}  {row['error'][:90]}")
            continue
        epoch = f"{row['epoch_s']:.2f}" if "epoch_s" in row else ""
        note = (f"{row['images_per_epoch']} img/epoch, first batch of an epoch "
                f"{row['epoch_first_batch_s']:.2f} s" if "epoch_s" in row else "")
        print(f"{row['label']:<38} {row['cores']:>5} {row['images_per_s']:>8.0f} "
              f"{row['images_per_s_per_core']:>10.0f} {row['images_per_cpu_s']:>9.0f} "
              f"{row['cores_for_target']:>9.0f} {epoch:>8}  {note}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA,
                        help="where the bench dataset is made (once) and kept")
    parser.add_argument("--patients", type=int, default=64)
    parser.add_argument("--slices", type=int, default=10, help="pre-contrast slices per patient")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16),
                        help="prep workers (making the dataset only)")
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated core counts; 0 = every core of this machine")
    parser.add_argument("--batch", type=int, default=64, help="a multiple of input.logical_shards")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per row (at least)")
    parser.add_argument("--paths", default="",
                        help="subset of rows, e.g. train_batches:zlib,tfdata:raw:cache (default: all)")
    parser.add_argument("--target", type=int, default=NODE_TARGET, help="images/s to size the cores for")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--dataset", default=None,
                        help="measure this prepared dataset (its own image encoding) instead "
                             "of making the bench's")
    parser.add_argument("--make-only", action="store_true",
                        help="make (or find) the dataset, print its dirs as JSON and stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.worker_dir, int(args.threads), args.batch, args.seconds)))
        return 0

    paths = [p for p in PATHS if not args.paths or _path_key(*p) in args.paths.split(",")]
    if args.dataset:  # every row on the given dataset, as the format it is
        from iap_jax.io.dataset_info import DatasetInfo

        info = DatasetInfo.load(args.dataset)
        fmt = "raw" if info.image_encoding == "none" else info.image_encoding
        dirs = {fmt: os.path.abspath(args.dataset)}
        args.image_size = info.image_size
        paths = list(dict.fromkeys((path, fmt, cache) for path, _, cache in paths))
    else:
        formats = () if args.make_only else {fmt for _, fmt, _ in paths}
        dirs = dataset_dirs(args.data_dir, args.patients, args.slices, args.image_size,
                            args.workers, formats)
    if args.make_only:
        print(json.dumps({fmt: os.path.abspath(d) for fmt, d in dirs.items()}))
        return 0
    threads = [int(t) or os.cpu_count() or 1 for t in args.threads.split(",") if t]
    sys.path.insert(0, REPO)
    rows = []
    for path, fmt, cache in paths:
        for count in threads:
            key = _path_key(path, fmt, cache)
            row = {"key": key, "label": _describe(path, fmt, cache), "path": path, "format": fmt,
                   "cache": cache, "threads": count}
            row.update(_in_subprocess(key, dirs[fmt], count, args))
            if "error" not in row:  # CPU time: robust to other jobs on a shared machine
                row["cores_for_target"] = args.target / row["images_per_cpu_s"]
            print(f"{row['label']} x{count}: " + (row.get("error") or f"{row['images_per_s']:.0f} img/s"),
                  file=sys.stderr, flush=True)
            rows.append(row)
            _write_report(args, dirs, rows)  # after every row: a cut-short run keeps its rows
    print()
    print_table(rows, args.target)
    print("\nrecord bytes per image (train split): " +
          ", ".join(f"{fmt} {bytes_per_image(d) / 1e3:.1f} kB" for fmt, d in dirs.items()))
    print(f"wrote {args.out}")
    return 0


def _write_report(args, dirs: dict, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = {"benchmark": "training_input", "image_size": args.image_size, "batch": args.batch,
              "seconds": args.seconds, "target_images_per_s": args.target,
              "dataset": dict(dirs), "record_bytes_per_image": {f: bytes_per_image(d) for f, d in dirs.items()},
              "train_examples": _train_examples(next(iter(dirs.values()))),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version()},
              "note": "img/s from the wall clock of a process pinned to `cores` cores; "
                      "img/CPU-s from its CPU time (all threads); cores@target = target / (img/CPU-s): "
                      "the core-seconds a host must supply per second, robust to other jobs "
                      "sharing the cores (which lower the wall-clock rate)",
              "rows": rows}
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(args.out + ".tmp", args.out)


def _train_examples(dataset_dir: str) -> int:
    with open(os.path.join(dataset_dir, "dataset_info.json")) as f:
        info = json.load(f)
    return sum(int(n) for s in info["splits"] if s["name"] == "train" for n in s["shardLengths"])


if __name__ == "__main__":
    sys.exit(main())
