"""Train-step throughput of the multi-task ResNet-18: the project's own step beside a
PyTorch ResNet-18 of the same shape, batch, loss and optimizer.

The JAX variants time the training loop's own step, as `iap_jax.training.train.build_steps` builds
it (preprocess.model_input on the stored uint16 batch, the masked multi-task loss, the
config's optimizer, the model of models.factory.build_model, the state laid out by the
config's sharding tactic), on the mesh sharding.make_mesh builds from the config
(--config, default configs/paper_dbc.py: the paper's Adam with coupled L2, sum of CE + MSE,
per-image max scaling), fed by sharding.global_batch:

  jax_xla            XLA's own convolutions (the accelerator path)
  jax_cpu_fast       iap_jax/kernels/conv.py's custom gradients
  jax_cpu_fast_2dev  the same, data parallel over two host devices
  jax_onednn         oneDNN convolutions as XLA custom calls
  jax_e2e            the training loop's input too: input_pipeline.train_batches over a
                     prepared TFRecord dataset (--dataset; default: bench/input.py's
                     224 px synthetic one), global_batch and the step (conv_impl "auto")
  torch              eager PyTorch: channels-last, bf16 autocast with --dtype bfloat16,
                     cuDNN autotuning on a GPU; the same restore + max scaling of the
                     stored batch, masked losses and Adam with coupled L2
  torch_compile      the same model through torch.compile (where it works)

Each (variant, size, batch) runs in its own subprocess so that compile time and peak memory
belong to that configuration alone; repeats are interleaved and each keeps its best run.
Prints a table (img/s, ratio to eager PyTorch, the step's FLOPs from XLA's cost analysis
and, on a card listed in PEAK_TFLOPS, its model FLOP utilisation) and writes JSON.

  python bench/train.py --sizes 64,128,224 --batch 32 --steps 5 --repeats 3
  (on a GPU: --sizes 224 --batch 256,512 --dtype bfloat16 --variants jax_xla,jax_e2e,torch,torch_compile)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import runpy
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by path
from paper_model import HEAD_SIZES, torch_available, torch_resnet18  # noqa: E402
DEFAULT_CONFIG = os.path.join("configs", "paper_dbc.py")
DEFAULT_OUT = os.path.join("bench", "results", "train.json")
MASKED_SHARE = 0.1  # of every head's labels, masked in the synthetic batch

# Dense bf16 matrix peak per chip, TFLOP/s (the with-sparsity figures halved): NVIDIA's
# H100 and H200 datasheets (H100 SXM 1,979 / PCIe 1,513 / NVL 1,671 with sparsity; H200 SXM
# the same 1,979, H200 NVL 1,671), NVIDIA's A100 datasheet (312 dense), and Google Cloud's
# TPU system-architecture pages (v4 275, v5e 197, v5p 459, v6e 918). Matched in order
# against the device name (nvidia-smi / jax.devices()[0].device_kind).
PEAK_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("H200 NVL", 835.0), ("H200", 989.4),
    ("A100", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0),
)


def peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def load_config(path: str, model: str = ""):
    """The config file's get_config(), with the model replaced by `model` ("NAME" or
    "NAME:WIDTH") where given."""
    config = runpy.run_path(os.path.join(REPO, path) if not os.path.isabs(path) else path)["get_config"]("")
    if model:
        name, _, width = model.partition(":")
        config.model.name = name
        config.model.width = int(width) if width else (8 if name == "tiny" else 64)
    return config


def _max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic_encoding(loss_mode: str):
    """A label encoding with HEAD_SIZES' heads (continuous heads raw for the paper loss)."""
    from iap_jax.core.labels import HeadEncoding, LabelEncoding

    transform = "raw" if loss_mode == "paper" else "log"
    return LabelEncoding(tuple(
        HeadEncoding(name, "categorical", classes=tuple(f"c{i}" for i in range(n))) if n > 1
        else HeadEncoding(name, "continuous", unit="ms", transform=transform)
        for name, n in HEAD_SIZES.items()))


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict:
    """A stored batch as the input pipeline yields it: uint16 images, intensity scales and
    offsets, targets and masks (MASKED_SHARE of each head's labels masked)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    targets, masks = {}, {}
    for name, n in HEAD_SIZES.items():
        targets[name] = (rng.standard_normal(batch).astype(np.float32) if n == 1
                         else rng.integers(0, n, batch).astype(np.int32))
        masks[name] = (rng.random(batch) >= MASKED_SHARE).astype(np.float32)
    return {"image": rng.integers(0, 65536, (batch, size, size)).astype(np.uint16),
            "scale": rng.uniform(0.01, 0.1, batch).astype(np.float32),
            "offset": rng.uniform(-10.0, 10.0, batch).astype(np.float32),
            "targets": targets, "masks": masks}


def _flops(stage) -> float | None:
    """FLOPs of a lowered or compiled computation from XLA's cost analysis (None if absent)."""
    try:
        analysis = stage.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# ----------------------------------------------------------------------------- JAX


def _run_jax(conv_impl: str, size: int, batch: int, steps: int, dtype: str, config_path: str,
             model_name: str = "", cpu_devices: int = 1, dataset: str | None = None,
             input_cache: str = "config") -> dict:
    """The project's train step on the project's mesh, timed over `steps` steps after a
    warm-up step; with `dataset`, fed by the training input pipeline."""
    import jax

    if cpu_devices > 1:  # data parallel over host devices, as iap_jax.training.train_cli does on the CPU
        jax.config.update("jax_num_cpu_devices", cpu_devices)

    from iap_jax.training import input_pipeline
    from iap_jax.core import sharding as sharding_lib
    from iap_jax.models.factory import describe_convolutions
    from iap_jax.core.preprocess import PixelSpec
    from iap_jax.training.train import build_steps

    config = load_config(config_path, model_name)
    config.model.dtype, config.model.conv_impl = dtype, conv_impl
    if dataset and input_cache in ("on", "off"):
        if "cache" not in config.input:
            raise ValueError("--input-cache: this checkout's config.input has no `cache` field")
        config.input.cache = input_cache == "on"
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    reader = None
    if dataset:
        from iap_jax.core.labels import LabelEncoding

        if "logical_shards" in config.input and batch % config.input.logical_shards:
            config.input.logical_shards = math.gcd(batch, config.input.logical_shards)
        reader = input_pipeline.SplitReader(dataset, "train", input_pipeline.InputConfig.from_config(config.input))
        spec = input_pipeline.pixel_spec(reader)
        labels = config.labels
        encoding = LabelEncoding.from_stats(
            input_pipeline.load_split_stats(dataset, "train"), kinds=dict(labels.kinds),
            transforms=dict(labels.transforms), min_count=labels.min_count,
            always_other=labels.always_other, aliases=bool(labels.get("aliases", False)))
        steps_per_epoch = input_pipeline.steps_per_epoch(reader, batch)
        if steps_per_epoch == 0:
            raise ValueError(f"{dataset}: the train split is smaller than one batch of {batch}")
        stream = input_pipeline.train_batches(reader, encoding, batch, seed=0)
        first = next(stream)
    else:
        spec = PixelSpec(stored_size=size, normalisation=config.input.normalisation,
                         percentiles=tuple(config.input.percentiles))
        encoding = _synthetic_encoding(config.loss.mode)
        first = synthetic_batch(batch, size)

    built = build_steps(config, encoding, spec, mesh, total_steps=steps + 2)
    init_fn, state_shardings, train_step = built.init_fn, built.state_shardings, built.train_step

    rss_before = _max_rss_mib()
    start = time.perf_counter()
    state = jax.block_until_ready(
        jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(0)))
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    device_batch = sharding_lib.global_batch(first, mesh)
    lowered = train_step.lower(state, device_batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops_lowered, flops_compiled = _flops(lowered), _flops(compiled)
    if describe_convolutions(conv_impl, dtype).split()[0] != "xla":
        # Custom-call convolutions are opaque to XLA's cost analysis: count the same step
        # built by the same factory with XLA's convolutions (lowered only, not compiled).
        xla = config.copy_and_resolve_references()
        xla.model.conv_impl = "xla"
        flops_lowered = _flops(build_steps(xla, encoding, spec, mesh, steps + 2).train_step.lower(
            state, device_batch))
    flops_per_step = flops_lowered or flops_compiled

    losses_seen = []
    state, logs = compiled(state, device_batch)  # warm-up, not timed
    losses_seen.append(logs["loss"])
    jax.block_until_ready(state)
    input_wait = epoch_start_wait = 0.0
    epoch_starts = 0
    if reader is not None:  # as the training loop does: the next batch sent while a step runs
        device_batches = sharding_lib.prefetch_to_mesh(stream, mesh)
    start = time.perf_counter()
    for index in range(1, steps + 1):  # the warm-up step took batch 0 of the stream
        if reader is not None:
            before = time.perf_counter()
            device_batch = next(device_batches)
            waited = time.perf_counter() - before
            input_wait += waited
            if index % steps_per_epoch == 0:  # an epoch's first batch
                epoch_start_wait += waited
                epoch_starts += 1
        state, logs = compiled(state, device_batch)
        losses_seen.append(logs["loss"])
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    if reader is not None:
        device_batches.close()  # stops the reader processes
    device_stats = jax.devices()[0].memory_stats() or {}
    result = dict(
        compile_s=compile_s,
        init_s=init_s,
        step_s=elapsed / steps,
        images_per_s=steps * batch / elapsed,
        losses=[float(x) for x in jax.device_get(losses_seen)],
        flops_per_step=flops_per_step,
        flops_per_image=flops_per_step / batch if flops_per_step else None,
        flops_per_step_compiled=flops_compiled,
        peak_rss_delta_mib=_max_rss_mib() - rss_before,
        peak_device_mib=device_stats.get("peak_bytes_in_use", 0) / 2**20,
        backend=jax.default_backend(),
        device=f"{jax.devices()[0].device_kind} x{len(jax.devices())}",
        detail=f"{describe_convolutions(conv_impl, dtype)}, mesh {dict(mesh.shape)}, "
               f"{os.path.basename(config_path)}",
        version=jax.__version__,
    )
    if reader is not None:
        # The rate between epoch starts, an estimate of a long epoch's (a Duke-sized split
        # has hundreds of steps per epoch).
        within = (steps - epoch_starts) * batch / max(elapsed - epoch_start_wait, 1e-9)
        result.update(input_wait_share=input_wait / elapsed, steps_per_epoch=steps_per_epoch,
                      epoch_starts=epoch_starts, epoch_start_wait_s=epoch_start_wait,
                      images_per_s_between_epoch_starts=within if steps > epoch_starts else None,
                      train_examples=reader.split_size,
                      input_cache=bool(config.input.get("cache", False)))
    return result


# ------------------------------------------------------------------------- PyTorch


def _run_torch(size: int, batch: int, steps: int, dtype: str, config_path: str,
               model_name: str = "", compiled: bool = False) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F

    config = load_config(config_path, model_name)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    host = synthetic_batch(batch, size)
    # uint16 has few kernels in PyTorch: the stored integers travel as int32.
    stored = torch.from_numpy(host["image"].astype("int32"))[:, None].to(device)
    scale = torch.from_numpy(host["scale"]).to(device)[:, None, None, None]
    offset = torch.from_numpy(host["offset"]).to(device)[:, None, None, None]
    targets = {k: torch.from_numpy(v).to(device) for k, v in host["targets"].items()}
    masks = {k: torch.from_numpy(v).to(device) for k, v in host["masks"].items()}
    model = torch_resnet18(HEAD_SIZES, config.model.name, config.model.width).train().to(device)
    model = model.to(memory_format=torch.channels_last)
    if cuda:  # PyTorch's fast GPU path: cuDNN autotuning, NHWC
        torch.backends.cudnn.benchmark = True
    forward = torch.compile(model) if compiled else model
    optim_config = config.optim
    if optim_config.name == "paper":  # Adam with coupled L2, as the paper's code
        optimizer = torch.optim.Adam(model.parameters(), lr=optim_config.learning_rate,
                                     betas=(optim_config.b1, optim_config.b2),
                                     weight_decay=optim_config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=optim_config.learning_rate,
                                      betas=(optim_config.b1, optim_config.b2),
                                      weight_decay=optim_config.weight_decay)
    clip = float(optim_config.clip_norm or 0.0)
    # Mixed precision like the JAX model's bf16 compute with f32 parameters.
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        # preprocess.model_input's restore and per-image max scaling to [0, 255]
        x = stored.float() * scale + offset
        x = x - torch.clamp(x.amin(dim=(1, 2, 3), keepdim=True), max=0.0)
        x = x / torch.clamp(x.amax(dim=(1, 2, 3), keepdim=True), min=1e-6) * 255.0
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            outputs = forward(x)
        loss = 0.0
        for name, n in HEAD_SIZES.items():
            out, mask = outputs[name].float(), masks[name]
            if n == 1:
                per_example = (out[:, 0] - targets[name]) ** 2
            else:
                per_example = F.cross_entropy(out, targets[name].long(), reduction="none")
            loss = loss + (per_example * mask).sum() / mask.sum().clamp(min=1.0)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return loss.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_before = _max_rss_mib()
    start = time.perf_counter()
    losses_seen = [train_step()]  # warm-up (and torch.compile's compile), not timed
    sync()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        losses_seen.append(train_step())
    sync()
    elapsed = time.perf_counter() - start
    return dict(
        compile_s=compile_s,
        step_s=elapsed / steps,
        images_per_s=steps * batch / elapsed,
        losses=[float(x) for x in losses_seen],
        peak_rss_delta_mib=_max_rss_mib() - rss_before,
        peak_device_mib=(torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0),
        backend=device.type,
        device=(torch.cuda.get_device_name() if cuda else "cpu"),
        detail=f"torch {torch.__version__}, {'torch.compile' if compiled else 'eager'}, "
               f"channels-last{', bf16 autocast' if dtype == 'bfloat16' else ''}, "
               f"{torch.get_num_threads()} threads",
        version=torch.__version__,
    )


# ------------------------------------------------------------------------- driver

VARIANTS = {
    "jax_xla": lambda a: _run_jax("xla", *a),
    "jax_cpu_fast": lambda a: _run_jax("cpu_fast", *a),
    # The trainer's CPU default without oneDNN: the CPU conv, data parallel over 2 host devices.
    "jax_cpu_fast_2dev": lambda a: _run_jax("cpu_fast", *a, cpu_devices=2),
    # The trainer's CPU default where oneDNN is installed: one device, oneDNN's threads.
    "jax_onednn": lambda a: _run_jax("onednn", *a),
    "jax_e2e": None,  # needs the dataset: see _worker
    "torch": lambda a: _run_torch(*a),
    "torch_compile": lambda a: _run_torch(*a, compiled=True),
}
DEFAULT_VARIANTS = "jax_xla,jax_cpu_fast,jax_cpu_fast_2dev,jax_onednn,torch"


def _worker(args) -> dict:
    size, batch = int(args.sizes), int(args.batch)
    common = (size, batch, args.steps, args.dtype, args.config, args.model)
    if args.worker == "jax_e2e":
        return _run_jax("auto", *common, dataset=args.dataset, input_cache=args.input_cache)
    return VARIANTS[args.worker](common)


def _default_dataset(size: int) -> str:
    """bench/input.py's synthetic dataset at this size (made once, then reused)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import input as input_bench  # bench/input.py

    return input_bench.dataset_dirs(os.path.join(REPO, input_bench.DEFAULT_DATA), 64, 10, size)["zlib"]


def _run_in_subprocess(variant: str, size: int, batch: int, args, dataset: str | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--sizes", str(size),
               "--batch", str(batch), "--steps", str(args.steps), "--dtype", args.dtype,
               "--config", args.config, "--model", args.model]
    if dataset:
        command += ["--dataset", dataset, "--input-cache", args.input_cache]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {"error": next((l for l in reversed(lines) if "Error" in l or "error" in l),
                              lines[-1] if lines else f"exit {done.returncode}")[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_torch (eager, same size and batch), TFLOP/s and MFU against PEAK_TFLOPS."""
    for row in rows:
        if "error" in row:
            continue
        torch_row = next((r for r in rows if r["variant"] == "torch" and r["size"] == row["size"]
                          and r["batch"] == row["batch"] and "error" not in r), None)
        row["ratio_vs_torch"] = row["images_per_s"] / torch_row["images_per_s"] if torch_row else None
        flops = row.get("flops_per_step")
        if not flops:  # PyTorch rows: the same network's FLOPs, counted on a JAX row
            twin = next((r for r in rows if r.get("flops_per_step") and r["size"] == row["size"]
                         and "error" not in r), None)
            flops = twin["flops_per_step"] / twin["batch"] * row["batch"] if twin else None
        row["tflops"] = flops / row["step_s"] / 1e12 if flops else None
        peak = peak_tflops(row.get("device", ""))
        row["peak_bf16_tflops"] = peak
        count = re.search(r" x(\d+)$", row.get("device", ""))  # JAX rows: "<kind> x<devices>"
        row["mfu"] = (row["tflops"] / (peak * (int(count.group(1)) if count else 1))
                      if row["tflops"] and peak else None)


def print_table(rows: list[dict]) -> None:
    header = (f"{'size':>5} {'batch':>5} {'variant':>17} {'device':>24} {'img/s':>9} {'vs torch':>9} "
              f"{'compile s':>10} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>6} {'loss[0]':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['size']:>5} {row['batch']:>5} {row['variant']:>17}  failed: {row['error'][:100]}")
            continue
        ratio = f"{row['ratio_vs_torch']:.2f}x" if row.get("ratio_vs_torch") else "-"
        # Host RSS growth on the CPU; the allocator's peak on an accelerator.
        peak = row.get("peak_device_mib") or row["peak_rss_delta_mib"]
        tflops = f"{row['tflops']:.2f}" if row.get("tflops") else "-"
        mfu = f"{row['mfu']:.1%}" if row.get("mfu") else "-"
        print(f"{row['size']:>5} {row['batch']:>5} {row['variant']:>17} {row.get('device', '')[:24]:>24} "
              f"{row['images_per_s']:>9.1f} {ratio:>9} {row['compile_s']:>10.1f} {peak:>9.0f} "
              f"{tflops:>8} {mfu:>6} {row['losses'][0]:>9.4f}")
    waits = [r for r in rows if "input_wait_share" in r]
    for row in waits:
        between = row.get("images_per_s_between_epoch_starts")
        print(f"jax_e2e {row['size']} px batch {row['batch']}: the loop waited for input "
              f"{row['input_wait_share']:.0%} of the time ({row['train_examples']} train examples, "
              f"{row['steps_per_epoch']} steps per epoch, cache {row['input_cache']}); "
              f"{row['epoch_starts']} epoch starts waited {row['epoch_start_wait_s']:.1f} s; "
              + (f"{between:.1f} img/s between them" if between else "no step between them"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,224", help="comma-separated image sizes in pixels")
    parser.add_argument("--batch", default="32", help="comma-separated global batch sizes")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one untimed warm-up step")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every variant this many times, interleaved, and keep each one's best "
                             "(on a shared machine, the run least disturbed by other jobs)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (parameters stay float32); bfloat16 on accelerators")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="training config whose optimizer, loss, normalisation, mesh and "
                             "sharding the step uses (model dtype / conv from --dtype / variant)")
    parser.add_argument("--model", default="resnet18",
                        help="NAME[:WIDTH] of iap_jax/models/resnet.py (and its PyTorch twin); "
                             "'' keeps the config's")
    parser.add_argument("--dataset", default=None,
                        help="prepared dataset (TFDS dir) for jax_e2e; default: bench/input.py's "
                             "synthetic one at the size, made on first use")
    parser.add_argument("--input-cache", choices=("config", "on", "off"), default="config",
                        help="jax_e2e: config.input.cache as the config sets it, or on / off")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if any(v.startswith("torch") for v in variants) and not torch_available():
        print("torch not installed, skipping baseline (pip install 'iap-jax[bench]')")
        variants = [v for v in variants if not v.startswith("torch")]
    datasets = {size: (args.dataset or _default_dataset(size)) if "jax_e2e" in variants else None
                for size in sizes}

    best: dict[tuple, dict] = {}
    for repeat in range(args.repeats):  # interleaved: a noisy neighbour hits every variant alike
        for size in sizes:
            for batch in batches:
                for variant in variants:
                    result = _run_in_subprocess(variant, size, batch, args,
                                                datasets[size] if variant == "jax_e2e" else None)
                    key = (size, batch, variant)
                    result.update(variant=variant, size=size, batch=batch)
                    shown = result.get("error") or f"{result['images_per_s']:.1f} img/s"
                    print(f"{size}px batch {batch} {variant} (run {repeat + 1}): {shown}", flush=True)
                    if "error" in result:
                        best.setdefault(key, result)
                        continue
                    runs = best.get(key, {}).get("runs_images_per_s", []) + [result["images_per_s"]]
                    if key not in best or "error" in best[key] or result["images_per_s"] > best[key]["images_per_s"]:
                        best[key] = result
                    best[key]["runs_images_per_s"] = runs
                    _write_report(args, batches, list(best.values()))  # a cut-short run keeps its rows
    rows = [best[(s, b, v)] for s in sizes for b in batches for v in variants]
    add_ratios(rows)
    print()
    print_table(rows)
    _write_report(args, batches, rows)
    print(f"\nwrote {args.out}")
    return 0


def _write_report(args, batches: list[int], rows: list[dict]) -> None:
    report = dict(
        benchmark="train_step_resnet18",
        batches=batches,
        steps=args.steps,
        dtype=args.dtype,
        config=args.config,
        model=args.model,
        head_sizes=HEAD_SIZES,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
        repeats=args.repeats,
        note="img/s over the timed steps of a run (one sync at the end), best of the repeats; "
             "JAX and PyTorch ran side by side, interleaved, in this run; flops_per_step (and "
             "flops_per_image, the same over the batch) from XLA's cost analysis of the lowered "
             "step; mfu against PEAK_TFLOPS (dense bf16)",
        results=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    sys.exit(main())
