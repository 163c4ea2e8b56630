"""Prediction throughput of the multi-task ResNet-18: iap-predict's compiled forward beside
PyTorch inference of the same network and batch, and iap-predict end to end from TFRecords.

Variants (each size in its own subprocess, interleaved, best of --repeats):
  jax        iap_jax.prediction.engine.Predictor: stored uint16 images in, the pixel path and the
             forward in one compiled program (oneDNN convolutions on a CPU, XLA elsewhere;
             there each BatchNorm folded into its convolution, which adds the residual and
             applies the ReLU in the same call)
  jax_unfolded   the same with BatchNorm, residual and ReLU as XLA passes of their own
  torch      eval mode, torch.inference_mode, channels-last, float32 input already normalised
  torch_compile   the same through torch.compile (where it works on this machine)
  e2e        the whole command over a TFRecord shard of the size: images/s and the share of
             time the devices wait for input (over the run; after the first batch, i.e. the
             steady pace of a large input; and the wait for the first batch, the reader's
             start-up)

Then iap-predict's DICOM input (bench/multiframe.py): the same synthetic series written as
classic files and as Enhanced MR multi-frame files, the per-frame cost of reading them into
stored slices side by side and their ratio (goal: at most 2); --dicom-patients 0 skips it.

  python bench/predict.py --sizes 64,128,224 --batch 32 --batches 8 --repeats 3
  (bfloat16 on a CPU with AVX-512 / AMX: --dtype bfloat16 --out bench/results/predict_bf16.json,
  PyTorch then under bfloat16 autocast; on a GPU: --sizes 224 --batch 512 --dtype bfloat16)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from paper_model import HEAD_SIZES, torch_available, torch_resnet18  # noqa: E402

DEFAULT_OUT = os.path.join("bench", "results", "predict.json")
E2E_IMAGES = int(os.environ.get("IAP_BENCH_E2E_IMAGES", "1024"))


def _restored(size: int, dtype: str, mesh):
    """What restore_model returns, for a freshly initialised ResNet-18 with the paper's heads."""
    import jax
    import jax.numpy as jnp

    from iap_jax.core.labels import HeadEncoding, LabelEncoding
    from iap_jax.models.factory import build_model
    from iap_jax.core.preprocess import PixelSpec

    heads = tuple(HeadEncoding(n, "categorical", classes=tuple(f"c{i}" for i in range(k)))
                  if k > 1 else HeadEncoding(n, "continuous", unit="ms", transform="log")
                  for n, k in HEAD_SIZES.items())
    encoding = LabelEncoding(heads)
    config = {"model": {"name": "resnet18", "width": 64, "dtype": dtype, "conv_impl": "auto"}}
    model = build_model(config["model"], encoding.head_sizes())
    variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, size, size, 1)), train=False))(
        jax.random.PRNGKey(0))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    variables = jax.device_put(variables, replicated)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "label_encoding": encoding, "config": config, "step": 0, "directory": "",
            "pixel_spec": PixelSpec(stored_size=size, normalisation="percentile")}


def _images(batch: int, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    return (rng.integers(0, 65536, (batch, size, size)).astype(np.uint16),
            rng.uniform(0.01, 0.1, batch).astype(np.float32), np.zeros(batch, np.float32))


def _run_jax(size: int, batch: int, batches: int, dtype: str, fold_norms: bool = True) -> dict:
    import jax

    from iap_jax.core import sharding
    from iap_jax.prediction.engine import Predictor

    mesh = sharding.make_mesh({"data": -1}, devices=jax.local_devices())
    predictor = Predictor(_restored(size, dtype, mesh), mesh, batch, fold_norms=fold_norms,
                          dtype=None if dtype == "float32" else dtype)
    arrays = _images(predictor.batch_size, size)
    jax.block_until_ready(predictor(*arrays))
    start = time.perf_counter()
    outputs = [predictor(*arrays) for _ in range(batches)]
    jax.block_until_ready(outputs)
    elapsed = time.perf_counter() - start
    return {"images_per_s": batches * predictor.batch_size / elapsed, "compile_s": predictor.compile_s,
            "device": jax.devices()[0].device_kind, "detail": predictor.convolutions}


def _run_torch(size: int, batch: int, batches: int, dtype: str, compiled: bool = False) -> dict:
    import contextlib

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch_resnet18(HEAD_SIZES).eval().to(device).to(memory_format=torch.channels_last)
    images = torch.rand(batch, 1, size, size, device=device).to(memory_format=torch.channels_last) * 255
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if compiled:
        model = torch.compile(model)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast:
        start = time.perf_counter()
        model(images)
        sync()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            outputs = model(images)
        {k: v.float().cpu() for k, v in outputs.items()}
        sync()
        elapsed = time.perf_counter() - start
    return {"images_per_s": batches * batch / elapsed, "compile_s": compile_s,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "detail": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}


def _run_e2e(size: int, batch: int, batches: int, dtype: str) -> dict:
    """iap-predict over one TFRecord shard of E2E_IMAGES synthetic slices."""
    import jax
    import numpy as np

    from iap_jax.core import sharding

    from iap_jax.io import records
    from iap_jax.io.checkpoints import Checkpointer
    from iap_jax.core.iaps import IAP_NAMES
    from iap_jax.prediction.job import predict
    from iap_jax.prediction.predict_cli import build_parser

    root = tempfile.mkdtemp(prefix="iap_bench_predict_")
    mesh = sharding.make_mesh({"data": -1}, devices=jax.local_devices())
    restored = _restored(size, dtype, mesh)
    checkpointer = Checkpointer(os.path.join(root, "train"), async_save=False)
    checkpointer.save(1, model={"params": restored["params"], "batch_stats": restored["batch_stats"]},
                      train={"step": np.zeros((), np.int32)}, config=restored["config"],
                      encoding=restored["label_encoding"],
                      pixel_spec=restored["pixel_spec"], dataset={}, input_position={"step": 1})
    checkpointer.manager.wait_until_finished()  # (close() would stop Orbax's shared executor)
    labels = {n: (0, "", np.nan) for n in IAP_NAMES}
    images, scales, _ = _images(batch, size)
    with open(os.path.join(root, "shard.tfrecord"), "wb") as f:  # zlib images, as iap-prep's
        for i in range(E2E_IMAGES):
            f.write(records.frame(records.encode_example(
                images[i % batch], float(scales[i % batch]), 0.0, "p", f"s{i // 16}", 0, i % 16,
                16, labels)))
    report = predict(build_parser().parse_args([
        "--workdir", os.path.join(root, "train"), "--step", "latest", "--input",
        os.path.join(root, "shard.tfrecord"), "--out", os.path.join(root, "out"), "--quiet",
        "--batch-size", str(batch), *(["--dtype", dtype] if dtype != "float32" else [])]))
    run = report["run"]
    return {"images_per_s": run["images_per_s"], "compile_s": run["compile_s"],
            "device": run["device_kind"], "input_wait_share": run["input_wait_share"],
            "input_wait_share_after_first_batch": run["input_wait_share_after_first_batch"],
            "first_batch_wait_s": run["first_batch_wait_s"],
            "detail": run["convolutions"]}


VARIANTS = {"jax": _run_jax, "jax_unfolded": lambda *a: _run_jax(*a, fold_norms=False),
            "torch": _run_torch,
            "torch_compile": lambda *a: _run_torch(*a, compiled=True), "e2e": _run_e2e}


def _in_subprocess(variant: str, size: int, args) -> dict | None:
    command = [sys.executable, __file__, "--worker", variant, "--sizes", str(size), "--batch",
               str(args.batch), "--batches", str(args.batches), "--dtype", args.dtype]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{variant} at {size}px failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _dicom_read(args, size: int) -> dict:
    """The enhanced-vs-classic read of DICOM input at the largest size (bench/multiframe.py)."""
    import shutil

    from multiframe import compare, table, write_both

    work = tempfile.mkdtemp(prefix="iap_bench_dicom_")
    try:
        roots = write_both(work, args.dicom_patients, 0, slices=args.dicom_slices)
        result = compare(roots, "predict", size, workers=args.dicom_workers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + table(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,128,224")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--variants", default="jax,jax_unfolded,torch,torch_compile,e2e")
    parser.add_argument("--dicom-patients", type=int, default=1,
                        help="patients of the enhanced-vs-classic DICOM read (0: none)")
    parser.add_argument("--dicom-slices", type=int, default=None,
                        help="slices per series there (default: every slice)")
    parser.add_argument("--dicom-workers", type=int, default=1)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(VARIANTS[args.worker](sizes[0], args.batch, args.batches, args.dtype)))
        return
    variants = [v for v in args.variants.split(",") if v in VARIANTS]
    if not torch_available():
        print("PyTorch is not installed (make bench-predict installs it): JAX rows only", file=sys.stderr)
        variants = [v for v in variants if not v.startswith("torch")]
    best: dict = {}
    for _ in range(args.repeats):  # interleaved: a noisy neighbour hits every variant alike
        for size in sizes:
            for variant in variants:
                result = _in_subprocess(variant, size, args)
                key = (size, variant)
                if result and (key not in best or result["images_per_s"] > best[key]["images_per_s"]):
                    best[key] = {"size": size, "variant": variant, **result}
    rows = []
    header = (f"{'size':>5} {'variant':>14} {'device':>16} {'img/s':>9} {'vs torch':>9} "
              f"{'compile s':>10} {'input wait (after 1st batch, 1st batch)':>40}  detail")
    print(header + "\n" + "-" * len(header))
    for size in sizes:
        torch_best = max((best[(size, v)]["images_per_s"] for v in ("torch", "torch_compile")
                          if (size, v) in best), default=None)
        for variant in variants:
            row = best.get((size, variant))
            if not row:
                continue
            row["ratio_vs_best_torch"] = row["images_per_s"] / torch_best if torch_best else None
            rows.append(row)
            ratio = f"{row['ratio_vs_best_torch']:.2f}x" if row["ratio_vs_best_torch"] else "-"
            wait = (f"{row['input_wait_share']:.0%} ({row['input_wait_share_after_first_batch']:.0%}, "
                    f"{row['first_batch_wait_s']:.1f} s)" if "input_wait_share" in row else "")
            print(f"{size:>5} {variant:>14} {row['device'][:16]:>16} {row['images_per_s']:>9.1f} "
                  f"{ratio:>9} {row['compile_s']:>10.1f} {wait:>40}  {row['detail']}")
    multiframe = _dicom_read(args, sizes[-1]) if args.dicom_patients > 0 else None
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"batch": args.batch, "batches": args.batches, "dtype": args.dtype,
                   "repeats": args.repeats, "rows": rows, "multiframe": multiframe}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
