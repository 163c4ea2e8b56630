"""Train-step throughput of the multi-task ResNet-18: JAX (XLA and CPU-fast convolutions)
beside a PyTorch ResNet-18 of the same shape, batch, loss and optimizer.

Variants: jax_xla (XLA's own convolutions), jax_cpu_fast (iap_jax/models/conv.py's custom
gradients), jax_cpu_fast_2dev (the same, data parallel over two host devices), jax_onednn
(oneDNN convolutions as XLA custom calls; needs libdnnl-dev), torch.

Each (framework, variant, image size) runs in its own subprocess so that compile time and
peak resident memory belong to that configuration alone. Prints a table and writes JSON.

  python bench/train.py --sizes 64,128,224 --batch 32 --steps 5 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# The paper's twelve heads with its class counts (Manufacturer 3, model 8, scan options 9,
# position 2, field 4, agent 6, matrix 10, slice thickness 21, flip angle 4, FOV 27);
# TE and TR are regressed (one output each).
HEAD_SIZES = {
    "Manufacturer": 3,
    "ManufacturerModelName": 8,
    "ScanOptions": 9,
    "PatientPosition": 2,
    "MagneticFieldStrength": 4,
    "ContrastBolusAgent": 6,
    "AcquisitionMatrix": 10,
    "SliceThickness": 21,
    "FlipAngle": 4,
    "FOV": 27,
    "EchoTime": 1,
    "RepetitionTime": 1,
}
LEARNING_RATE = 1e-3
DEFAULT_OUT = os.path.join("bench", "results", "train.json")


def _synthetic_batch(batch: int, size: int):
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.random((batch, size, size, 1), dtype=np.float32)
    labels = {
        name: (rng.standard_normal(batch).astype(np.float32) if n == 1 else rng.integers(0, n, batch))
        for name, n in HEAD_SIZES.items()
    }
    return images, labels


def _max_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- JAX


def _run_jax(conv_impl: str, size: int, batch: int, steps: int, dtype: str,
             cpu_devices: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    if cpu_devices > 1:  # data parallel over host devices, as iap_jax.main does on the CPU
        jax.config.update("jax_num_cpu_devices", cpu_devices)

    from iap_jax.models.resnet import make_model

    images, labels = _synthetic_batch(batch, size)
    images, labels = jnp.asarray(images), {k: jnp.asarray(v) for k, v in labels.items()}
    model = make_model("resnet18", HEAD_SIZES, conv_impl=conv_impl, dtype=jnp.dtype(dtype))
    variables = model.init(jax.random.PRNGKey(0), images[:1], train=False)
    optimizer = optax.adam(LEARNING_RATE)
    state = (variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))

    # Images and labels are step arguments, not closed-over constants, so XLA cannot
    # precompute anything from them at compile time.
    def loss_fn(params, batch_stats, images, labels):
        outputs, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        loss = 0.0
        for name, n in HEAD_SIZES.items():
            if n == 1:
                loss += jnp.mean((outputs[name][:, 0] - labels[name]) ** 2)
            else:
                loss += optax.softmax_cross_entropy_with_integer_labels(outputs[name], labels[name]).mean()
        return loss, updates["batch_stats"]

    def train_step(state, images, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    rss_before = _max_rss_mib()
    start = time.perf_counter()
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    split, whole = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    state = jax.device_put(state, whole)
    images, labels = jax.device_put(images, split), jax.device_put(labels, split)
    compiled = jax.jit(train_step, in_shardings=(whole, split, split), out_shardings=(whole, whole),
                       donate_argnums=0).lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start
    step_times, losses = [], []
    for _ in range(steps + 1):  # the first executed step warms caches and is not timed
        start = time.perf_counter()
        state, loss = compiled(state, images, labels)
        losses.append(float(loss))
        step_times.append(time.perf_counter() - start)
    device_stats = jax.devices()[0].memory_stats() or {}
    return dict(
        compile_s=compile_s,
        step_s=step_times[1:],
        losses=losses,
        peak_rss_delta_mib=_max_rss_mib() - rss_before,
        peak_device_mib=device_stats.get("peak_bytes_in_use", 0) / 2**20,
        backend=jax.default_backend(),
        device=f"{jax.devices()[0].device_kind} x{len(jax.devices())}",
        version=jax.__version__,
    )


# ------------------------------------------------------------------------- PyTorch


def _torch_resnet18(heads: dict):
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.proj is None else self.proj(x)))

    class ResNet18(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, 64, 7, 2, 3, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            blocks, cin = [], 64
            for stage, cout in enumerate((64, 128, 256, 512)):
                for index in range(2):
                    blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.heads = nn.ModuleDict({name: nn.Linear(512, n) for name, n in heads.items()})

        def forward(self, x):
            features = self.blocks(self.stem(x)).mean(dim=(2, 3))
            return {name: head(features) for name, head in self.heads.items()}

    return ResNet18()


def _run_torch(size: int, batch: int, steps: int, dtype: str) -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = _synthetic_batch(batch, size)
    images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = {k: torch.from_numpy(v).to(device) for k, v in labels.items()}
    model = _torch_resnet18(HEAD_SIZES).train().to(device)
    if device.type == "cuda":  # PyTorch's fast GPU path: cuDNN autotuning, NHWC
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
        images = images.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    # Mixed precision like the JAX model's bf16 compute with f32 parameters.
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else contextlib.nullcontext())

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            outputs = model(images)
        outputs = {k: v.float() for k, v in outputs.items()}
        loss = 0.0
        for name, n in HEAD_SIZES.items():
            if n == 1:
                loss = loss + F.mse_loss(outputs[name][:, 0], labels[name])
            else:
                loss = loss + F.cross_entropy(outputs[name], labels[name])
        loss.backward()
        optimizer.step()
        return float(loss)

    rss_before = _max_rss_mib()
    step_times, losses = [], []
    for _ in range(steps + 1):
        start = time.perf_counter()
        losses.append(train_step())
        step_times.append(time.perf_counter() - start)
    return dict(
        compile_s=0.0,
        step_s=step_times[1:],
        losses=losses,
        peak_rss_delta_mib=_max_rss_mib() - rss_before,
        peak_device_mib=(torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0),
        backend=device.type,
        device=(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        version=torch.__version__,
        threads=torch.get_num_threads(),
    )


# ------------------------------------------------------------------------- driver

VARIANTS = {
    "jax_xla": lambda size, batch, steps, dtype: _run_jax("xla", size, batch, steps, dtype),
    "jax_cpu_fast": lambda size, batch, steps, dtype: _run_jax("cpu_fast", size, batch, steps, dtype),
    # The trainer's CPU default without oneDNN: the CPU conv, data parallel over 2 host devices.
    "jax_cpu_fast_2dev": lambda size, batch, steps, dtype: _run_jax("cpu_fast", size, batch, steps,
                                                                     dtype, cpu_devices=2),
    # The trainer's CPU default where oneDNN is installed: one device, oneDNN's threads.
    "jax_onednn": lambda size, batch, steps, dtype: _run_jax("onednn", size, batch, steps, dtype),
    "torch": _run_torch,
}


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _run_in_subprocess(variant: str, size: int, batch: int, steps: int, dtype: str) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--sizes", str(size), "--batch", str(batch),
               "--steps", str(steps), "--dtype", dtype]
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} at {size}px failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_table(rows: list[dict]) -> None:
    header = (f"{'size':>5} {'variant':>13} {'device':>22} {'img/s':>8} {'vs torch':>9} "
              f"{'compile s':>10} {'peak MiB':>9} {'loss[0]':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row['ratio_vs_torch']:.2f}x" if row.get("ratio_vs_torch") else "-"
        # Host RSS growth on the CPU; the allocator's peak on an accelerator.
        peak = row.get("peak_device_mib") or row["peak_rss_delta_mib"]
        print(f"{row['size']:>5} {row['variant']:>13} {row.get('device', '')[:22]:>22} "
              f"{row['images_per_s']:>8.1f} {ratio:>9} {row['compile_s']:>10.1f} {peak:>9.0f} "
              f"{row['losses'][0]:>9.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,224", help="comma-separated image sizes in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one untimed warm-up step")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every variant this many times, interleaved, and keep each one's best "
                             "(on a shared machine, the run least disturbed by other jobs)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (parameters stay float32); bfloat16 on accelerators")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    if args.worker:
        print(json.dumps(VARIANTS[args.worker](sizes[0], args.batch, args.steps, args.dtype)))
        return

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if "torch" in variants and not _torch_available():
        print("torch not installed, skipping baseline (pip install 'iap-jax[bench]')")
        variants.remove("torch")

    rows = []
    for size in sizes:
        best: dict[str, dict] = {}
        for repeat in range(args.repeats):
            for variant in variants:
                result = _run_in_subprocess(variant, size, args.batch, args.steps, args.dtype)
                result.update(variant=variant, size=size, batch=args.batch,
                              images_per_s=args.batch / statistics.median(result["step_s"]))
                print(f"{size}px {variant} (run {repeat + 1}): {result['images_per_s']:.1f} img/s", flush=True)
                runs = best.get(variant, {}).get("runs_images_per_s", []) + [result["images_per_s"]]
                if variant not in best or result["images_per_s"] > best[variant]["images_per_s"]:
                    best[variant] = result
                best[variant]["runs_images_per_s"] = runs
        size_rows = [best[v] for v in variants]
        torch_row = next((r for r in size_rows if r["variant"] == "torch"), None)
        for row in size_rows:
            row["ratio_vs_torch"] = row["images_per_s"] / torch_row["images_per_s"] if torch_row else None
        rows.extend(size_rows)

    print()
    _print_table(rows)
    report = dict(
        benchmark="train_step_resnet18",
        batch=args.batch,
        steps=args.steps,
        dtype=args.dtype,
        head_sizes=HEAD_SIZES,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
        repeats=args.repeats,
        note="img/s from the median timed step of a run, best of the repeats; JAX and PyTorch ran "
             "side by side, interleaved, in this run",
        results=rows,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
