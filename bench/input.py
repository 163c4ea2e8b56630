"""Training-input throughput per CPU core at 224 px: read, decode, batch, label encoding
(and, separately, the restore + normalise of preprocess.model_input on the CPU).

The dataset is made with the project's own prep (iap-synth small preset, then iap-prep
--image-size 224; a few hundred slices, kept under --data-dir and reused) and copied into
three other record formats with the same examples:

  zlib          today's records: TFDS Tensor feature, uint16, Encoding.ZLIB, in TFRecords
  raw           the same feature with Encoding.BYTES (uncompressed uint16; tf.io.decode_raw)
  array_record  the raw records in uncompressed ArrayRecord files (group_size 1: random access)
  array_record_zstd   the same with ArrayRecord's default compression (zstd level 3 per
                record), as TFDS writes ArrayRecord

Paths measured, each process pinned to `threads` cores (sched_setaffinity) with tf.data's
private thread pool and TensorFlow's op pools set to the same number:

  train_batches   input_pipeline.train_batches, the training loop's own iterator, over
                  several epochs (it builds its pipeline per epoch: at this dataset size that
                  start is most of an epoch, see the "epoch s" column)
  stream          the same per-example work (SplitReader.records(), the train path's map,
                  shuffle, batch, tfds.as_numpy, the label encoding) as one pipeline repeated
                  over epochs: the rate between epoch starts on a dataset of any size
  +cache          the decoded records held in memory after the first epoch
                  (InputConfig(cache=True) for train_batches, tf.data cache() for stream)
  data_source     ArrayRecord through TFDS's random-access data source (global shuffle,
                  Python decoding), batched as the train path does, label encoding included
  encode          LabelEncoding.encode alone (the Python step every path ends with)
  model_input     preprocess.model_input (restore + max / percentile normalise), jitted on
                  the CPU: on an accelerator it runs inside the train step instead

The table gives img/s (wall clock), img/s per pinned core, img per CPU-second of the
process (all its threads: robust to other jobs sharing the cores) and the cores a host needs
for --target images/s (default 140k, an 8-GPU H200 node) at that CPU cost.

  python bench/input.py [--threads 1,2] [--batch 64] [--seconds 3] [--data-dir DIR]
  (--threads 0: every core of the machine, the rate one host gives)
"""
from __future__ import annotations

import argparse
import dataclasses
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
# One H200 trains the ResNet-18 at about 17.5k images/s (README, bench/train.py): an
# 8-GPU node needs this many training images per second from its host.
NODE_TARGET = 140_000
FORMATS = ("zlib", "raw", "array_record", "array_record_zstd")
# (path, format, cache) of every measured row, in table order.
PATHS = (
    ("train_batches", "zlib", False), ("train_batches", "zlib", True),
    ("train_batches", "raw", False), ("train_batches", "raw", True),
    ("stream", "zlib", False), ("stream", "zlib", True),
    ("stream", "raw", False), ("stream", "raw", True),
    ("data_source", "array_record", False), ("data_source", "array_record_zstd", False),
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
    """{format: TFDS dataset dir} of the bench dataset in `formats` (and zlib, the prep's
    own), each made on first use and then reused."""
    base = os.path.join(data_dir, f"synth_p{patients}_s{slices}_{image_size}px")
    leaf = os.path.join("iap_dataset", f"pre_{image_size}", "1.0.0")
    dirs = {fmt: os.path.join(base, fmt, leaf) for fmt in FORMATS if fmt == "zlib" or fmt in formats}
    if not os.path.exists(os.path.join(dirs["zlib"], "dataset_info.json")):
        dicom = os.path.join(base, "dicom")
        start = time.perf_counter()
        _run_cli("data_prep.synthetic.cli:main", [
            "--out", dicom, "--patients", str(patients), "--seed", "0", "--preset", "small",
            "--slices", str(slices), "--workers", str(workers)])
        _run_cli("data_prep.cli:main", [
            "--dicom-root", dicom, "--data-dir", os.path.join(base, "zlib"), "--image-size",
            str(image_size), "--workers", str(workers), "--salt", "bench-input"])
        shutil.rmtree(dicom, ignore_errors=True)
        print(f"bench dataset made with iap-synth + iap-prep in {time.perf_counter() - start:.0f} s: "
              f"{dirs['zlib']}", file=sys.stderr)
    for fmt in [f for f in dirs if f != "zlib"]:
        if not os.path.exists(os.path.join(dirs[fmt], "dataset_info.json")):
            write_variant(dirs["zlib"], dirs[fmt], fmt)
    return dirs


def write_variant(source: str, target: str, fmt: str) -> None:
    """A copy of a prepared dataset whose image feature is uncompressed (Encoding.BYTES),
    in TFRecords (fmt "raw") or ArrayRecord files (fmt "array_record" uncompressed,
    "array_record_zstd" with ArrayRecord's default zstd); every other feature, the
    statistics and the prep options are the same."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter

    old = tfds.builder_from_directory(source).info.features
    image = old["image"]
    new = tfds.features.FeaturesDict({
        name: (tfds.features.Tensor(shape=image.shape, dtype=np.uint16,
                                    encoding=tfds.features.Encoding.BYTES)
               if name == "image" else old[name])
        for name in old.keys()})
    staging = target + ".incomplete"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    suffix = "array_record" if fmt.startswith("array_record") else "tfrecord"
    sizes: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(source, "*.tfrecord-*"))):
        name = os.path.basename(path).replace(".tfrecord-", f".{suffix}-")
        split = name.split("-")[1].split(".")[0]
        out = os.path.join(staging, name)
        records = [new.serialize_example(old.deserialize_example_np(bytes(s)))
                   for s in tf.data.TFRecordDataset(path).as_numpy_iterator()]
        if suffix == "array_record":
            writer = ArrayRecordWriter(out, "group_size:1" + (",uncompressed" if fmt == "array_record" else ""))
            for record in records:
                writer.write(record)
            writer.close()
        else:
            with tf.io.TFRecordWriter(out) as writer:
                for record in records:
                    writer.write(record)
        sizes[split] = sizes.get(split, 0) + os.path.getsize(out)
    for name in os.listdir(source):
        if name.endswith(".json") and name not in ("features.json", "dataset_info.json"):
            shutil.copy(os.path.join(source, name), staging)
    new.save_config(staging)
    with open(os.path.join(source, "dataset_info.json")) as f:
        info = json.load(f)
    info["fileFormat"] = suffix
    for split in info["splits"]:
        split["numBytes"] = str(sizes.get(split["name"], 0))
    with open(os.path.join(staging, "dataset_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(staging, target)


def bytes_per_image(dataset_dir: str) -> float:
    """Bytes of the train split's record files per example."""
    with open(os.path.join(dataset_dir, "dataset_info.json")) as f:
        info = json.load(f)
    train = next(s for s in info["splits"] if s["name"] == "train")
    return int(train["numBytes"]) / sum(int(n) for n in train["shardLengths"])


# ----------------------------------------------------------------- one measurement


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _pin(threads: int) -> int:
    """Pins this process to `threads` of its cores; returns how many it got."""
    cores = sorted(os.sched_getaffinity(0))
    cores = cores[:max(1, min(threads, len(cores)))]
    os.sched_setaffinity(0, set(cores))
    return len(cores)


def has_cache_option() -> bool:
    from iap_jax.input_pipeline import InputConfig

    return "cache" in {f.name for f in dataclasses.fields(InputConfig)}


def _encoding(dataset_dir: str):
    """The default config's label encoding of the train split (configs/default.py)."""
    from iap_jax import input_pipeline
    from iap_jax.labels import LabelEncoding

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


def _input_config(threads: int, cache: bool):
    from iap_jax.input_pipeline import InputConfig

    if cache and not has_cache_option():
        raise NotImplementedError("InputConfig has no `cache` field in this checkout "
                                  "(config.input.cache): no cached train_batches row")
    return InputConfig(threads=threads, **({"cache": True} if cache else {}))


def _measure_train_batches(dataset_dir: str, threads: int, batch: int, cache: bool,
                           seconds: float) -> dict:
    """input_pipeline.train_batches as the training loop calls it: the first epoch
    (with cache: reading the files into memory) apart, then whole epochs."""
    from iap_jax import input_pipeline

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


def _measure_stream(dataset_dir: str, threads: int, batch: int, cache: bool,
                    seconds: float) -> dict:
    """The train path's per-example work in one pipeline repeated over epochs."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from iap_jax import input_pipeline

    reader = input_pipeline.SplitReader(dataset_dir, "train", _input_config(threads, False))
    encoding = _encoding(dataset_dir)
    examples = reader.split_size
    ds = reader.records().map(input_pipeline._raw_example, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        ds = ds.cache()
    ds = (ds.repeat().shuffle(min(reader.cfg.shuffle_buffer, examples), seed=0)
          .batch(batch, drop_remainder=True).prefetch(reader.cfg.prefetch))
    batches = iter(tfds.as_numpy(ds))

    def next_batch() -> int:
        return len(input_pipeline._to_numpy_batch(next(batches), encoding)["image"])

    # The first pass (all of it, with the cache: filling it) is not timed.
    return _timed(next_batch, warmup=examples // batch + 2, seconds=seconds)


def _measure_data_source(dataset_dir: str, threads: int, batch: int, seconds: float) -> dict:
    """ArrayRecord through tfds' random-access data source: a shuffled index per epoch,
    `threads` reader threads decoding one share of each batch each."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import tensorflow_datasets as tfds

    from iap_jax import input_pipeline

    source = tfds.builder_from_directory(dataset_dir).as_data_source(split="train")
    encoding = _encoding(dataset_dir)
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(threads)
    state = {"order": rng.permutation(len(source)), "at": 0}

    def indices() -> list[int]:
        if state["at"] + batch > len(state["order"]):
            state["order"], state["at"] = rng.permutation(len(source)), 0
        chosen = state["order"][state["at"]:state["at"] + batch]
        state["at"] += batch
        return [int(i) for i in chosen]

    def next_batch() -> int:
        chunks = np.array_split(np.asarray(indices()), threads)
        examples = [e for part in pool.map(lambda c: source.__getitems__([int(i) for i in c]), chunks)
                    for e in part]
        raw = {"image": np.stack([e["image"] for e in examples]),
               "scale": np.asarray([e["intensity_scale"] for e in examples], np.float32),
               "offset": np.asarray([e["intensity_offset"] for e in examples], np.float32),
               "labels": {name: {key: np.asarray([e["labels"][name][key] for e in examples])
                                 for key in ("value", "number", "state")}
                          for name in examples[0]["labels"]}}
        return len(input_pipeline._to_numpy_batch(raw, encoding)["image"])

    return _timed(next_batch, warmup=2, seconds=seconds)


def _one_batch(dataset_dir: str, batch: int) -> dict:
    import tensorflow_datasets as tfds

    from iap_jax import input_pipeline

    reader = input_pipeline.SplitReader(dataset_dir, "train", input_pipeline.InputConfig())
    ds = reader.records().map(input_pipeline._raw_example).repeat().batch(batch)
    return next(iter(tfds.as_numpy(ds)))


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

    from iap_jax import input_pipeline
    from iap_jax.preprocess import model_input

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
    from iap_jax import input_pipeline

    input_pipeline.configure_tensorflow(threads)
    path, fmt, *rest = key.split(":")
    cache = bool(rest)
    if path == "train_batches":
        result = _measure_train_batches(dataset_dir, threads, batch, cache, seconds)
    elif path == "stream":
        result = _measure_stream(dataset_dir, threads, batch, cache, seconds)
    elif path == "data_source":
        result = _measure_data_source(dataset_dir, threads, batch, seconds)
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
    names = {"train_batches": "train_batches", "stream": "stream", "data_source": "data_source",
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
                        help="subset of rows, e.g. train_batches:zlib,stream:raw:cache (default: all)")
    parser.add_argument("--target", type=int, default=NODE_TARGET, help="images/s to size the cores for")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--make-only", action="store_true",
                        help="make (or find) the dataset, print its dirs as JSON and stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.worker_dir, int(args.threads), args.batch, args.seconds)))
        return 0

    paths = [p for p in PATHS if not args.paths or _path_key(*p) in args.paths.split(",")]
    formats = () if args.make_only else {fmt for _, fmt, _ in paths}
    dirs = dataset_dirs(args.data_dir, args.patients, args.slices, args.image_size, args.workers,
                        formats)
    if args.make_only:
        print(json.dumps({fmt: os.path.abspath(d) for fmt, d in dirs.items()}))
        return 0
    threads = [int(t) or os.cpu_count() or 1 for t in args.threads.split(",") if t]
    sys.path.insert(0, REPO)
    cache_ok = has_cache_option()
    if not cache_ok:
        print("InputConfig has no `cache` field yet (config.input.cache): the train_batches "
              "+cache rows are skipped", file=sys.stderr)
    rows = []
    for path, fmt, cache in paths:
        for count in threads:
            key = _path_key(path, fmt, cache)
            row = {"key": key, "label": _describe(path, fmt, cache), "path": path, "format": fmt,
                   "cache": cache, "threads": count}
            if path == "train_batches" and cache and not cache_ok:
                row["error"] = "skipped: InputConfig has no `cache` field in this checkout"
            else:
                row.update(_in_subprocess(key, dirs[fmt], count, args))
            if "error" not in row:  # CPU time: robust to other jobs on a shared machine
                row["cores_for_target"] = args.target / row["images_per_cpu_s"]
            print(f"{row['label']} x{count}: " + (row.get("error") or f"{row['images_per_s']:.0f} img/s"),
                  file=sys.stderr, flush=True)
            rows.append(row)
            _write_report(args, dirs, cache_ok, rows)  # after every row: a cut-short run keeps its rows
    print()
    print_table(rows, args.target)
    print("\nrecord bytes per image (train split): " +
          ", ".join(f"{fmt} {bytes_per_image(d) / 1e3:.1f} kB" for fmt, d in dirs.items()))
    print(f"wrote {args.out}")
    return 0


def _write_report(args, dirs: dict, cache_ok: bool, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = {"benchmark": "training_input", "image_size": args.image_size, "batch": args.batch,
              "seconds": args.seconds, "target_images_per_s": args.target,
              "dataset": dict(dirs), "record_bytes_per_image": {f: bytes_per_image(d) for f, d in dirs.items()},
              "train_examples": _train_examples(dirs["zlib"]),
              "cache_option": cache_ok,
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
