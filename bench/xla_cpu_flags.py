"""XLA's own CPU flags against the project's CPU kernels, on the demo's model.

The demo's ResNet (configs/synthetic_cpu.py: ResNet-18 of width 16, 64 px, batch 32,
float32) timed two ways:

  train      the project's train step (bench/train.py's `_run_jax`: train.make_train_step,
             the config's loss and optimizer, on the mesh the config builds)
  inference  the prediction forward (models.factory.build_model(..., inference=True) on
             the variables of models.factory.prepare_inference: BatchNorms folded and,
             with oneDNN, kernels packed), jitted for one batch

for each variant, each in its own process (XLA reads XLA_FLAGS once, at start-up):

  xla                 XLA's convolutions, XLA's default CPU flags
  xla_onednn          --xla_cpu_use_onednn=true
  xla_onednn_fusion   the same, and --xla_cpu_experimental_onednn_fusion_type=
                      individual_convolution,dot,eltwise
  xla_onednn_cc       --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true
  xla_xnn_fusion      --xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type=
                      individual_convolution,dot,eltwise
  xla_ynn_fusion      --xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot,eltwise
  xla_fast_math       --xla_cpu_enable_fast_math=true
  xla_mkl_dnn         --xla_cpu_use_mkl_dnn=true (the flag's old name: recorded if refused)
  onednn              the project's oneDNN custom calls (conv_impl "onednn")
  cpu_fast            the project's pure-JAX CPU convolutions (conv_impl "cpu_fast")
  cpu_fast_2dev       the same, data parallel over two host devices (what "auto" runs
                      without oneDNN in a single-process run)

Repeats are interleaved; each (variant, mode) keeps its best. A variant whose flags XLA
refuses is recorded with XLA's message. `library_ops` counts the lines of the compiled HLO
that name an oneDNN / XNNPACK / YNNPACK call or fusion of XLA's own ("__onednn...",
"__xnn...", "__ynn..."; the project's custom calls are not counted), to tell a flag that
changed the program from one that did not.

  python bench/xla_cpu_flags.py --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic_cpu.py")
DEFAULT_OUT = os.path.join(REPO, "bench", "results", "xla_cpu_flags.json")
_FUSIONS = "individual_convolution,dot,eltwise"

# variant: (conv_impl, XLA_FLAGS, host devices)
VARIANTS = {
    "xla": ("xla", "", 1),
    "xla_onednn": ("xla", "--xla_cpu_use_onednn=true", 1),
    "xla_onednn_fusion": ("xla", f"--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type={_FUSIONS}", 1),
    "xla_onednn_cc": ("xla", "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true", 1),
    "xla_xnn_fusion": ("xla", f"--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_fusion_type={_FUSIONS}", 1),
    "xla_ynn_fusion": ("xla", f"--xla_cpu_experimental_ynn_fusion_type={_FUSIONS}", 1),
    "xla_fast_math": ("xla", "--xla_cpu_enable_fast_math=true", 1),
    "xla_mkl_dnn": ("xla", "--xla_cpu_use_mkl_dnn=true", 1),
    "onednn": ("onednn", "", 1),
    "cpu_fast": ("cpu_fast", "", 1),
    "cpu_fast_2dev": ("cpu_fast", "", 2),
}
MODES = ("train", "inference")
# XLA's own library calls and fusions: "__onednn$convolution", "__xnn_fusion", ...
_LIBRARY_OP = re.compile(r"__(onednn|xnn|ynn)")


_METADATA = re.compile(r"metadata=\{[^}]*\}")


def library_ops(hlo: str) -> int:
    return sum(1 for line in hlo.splitlines()
               if _LIBRARY_OP.search(_METADATA.sub("", line)))


def _bench_train():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(REPO, "bench", "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config():
    import runpy

    return runpy.run_path(CONFIG)["get_config"]()


def _run_train(conv_impl: str, devices: int, steps: int) -> dict:
    import jax

    bench = _bench_train()
    hlo = []
    flops = bench._flops

    def recording_flops(stage):  # the compiled step passes through here: keep its HLO
        if isinstance(stage, jax.stages.Compiled):
            hlo.append(stage.as_text())
        return flops(stage)

    bench._flops = recording_flops
    config = _config()
    result = bench._run_jax(conv_impl, config.input.image_size, config.batch_size, steps, "float32",
                            CONFIG, cpu_devices=devices)
    result["library_ops"] = library_ops(hlo[0]) if hlo else None
    return result


def _run_inference(conv_impl: str, devices: int, steps: int) -> dict:
    import jax

    if devices > 1:
        jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp

    from iap_jax.core import sharding as sharding_lib
    from iap_jax.models.factory import build_model, describe_convolutions, prepare_inference

    config = _config()
    size, batch = config.input.image_size, config.eval_batch_size
    heads = dict(_bench_train().HEAD_SIZES)
    model_config = {**config.model.to_dict(), "conv_impl": conv_impl, "dtype": "float32"}
    train_model = build_model(model_config, heads)
    model = build_model(model_config, heads, inference=True)
    shape = (batch, size, size, 1)
    variables = jax.jit(lambda r: train_model.init(r, jnp.zeros(shape), train=False))(jax.random.PRNGKey(0))
    mesh = sharding_lib.make_mesh({"data": -1})
    variables = jax.device_put(variables, sharding_lib.replicated(mesh))
    images = jax.device_put(jax.random.uniform(jax.random.PRNGKey(1), shape),
                            sharding_lib.batch_sharding(mesh))
    start = time.perf_counter()
    prepared = prepare_inference(model, variables, shape)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    compiled = forward.lower(prepared, images).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(prepared, images))  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        out = compiled(prepared, images)
    jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    return dict(compile_s=compile_s, step_s=elapsed / steps, images_per_s=steps * batch / elapsed,
                library_ops=library_ops(compiled.as_text()),
                detail=f"{describe_convolutions(conv_impl, 'float32', inference=True)}, "
                       f"mesh {dict(mesh.shape)}",
                version=jax.__version__)


def _worker(variant: str, mode: str, steps: int) -> dict:
    conv_impl, _, devices = VARIANTS[variant]
    return (_run_train if mode == "train" else _run_inference)(conv_impl, devices, steps)


def _in_subprocess(variant: str, mode: str, steps: int) -> dict:
    flags = VARIANTS[variant][1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags]))
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--mode", mode,
               "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        message = next((line for line in lines if "Unknown flag" in line or "Illegal value" in line), None)
        message = message or next((line for line in reversed(lines) if "rror" in line),
                                  lines[-1] if lines else f"exit {done.returncode}")
        return {"error": message.strip()[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: dict, variants, modes) -> None:
    header = f"{'variant':<18} {'XLA_FLAGS':<36} " + " ".join(
        f"{m + ' img/s':>15} {'/ xla':>6} {'/ onednn':>8} {'lib ops':>7}" for m in modes)
    print(header)
    print("-" * len(header))
    for variant in variants:
        _, flags, devices = VARIANTS[variant]
        cells = []
        for mode in modes:
            row = rows[variant][mode]
            if "error" in row:
                cells.append(f"{'error':>15} {'':>6} {'':>8} {'':>7}")
                continue
            ratio = lambda other: (f"{row['images_per_s'] / rows[other][mode]['images_per_s']:.2f}"
                                   if "images_per_s" in rows[other][mode] else "-")
            cells.append(f"{row['images_per_s']:>15.1f} {ratio('xla'):>6} {ratio('onednn'):>8} "
                         f"{row.get('library_ops') if row.get('library_ops') is not None else '-':>7}")
        label = flags.replace("--xla_cpu_", "") or ("(2 devices)" if devices > 1 else "")
        print(f"{variant:<18} {label[:36]:<36} " + " ".join(cells))
    for variant in variants:
        for mode in modes:
            if "error" in rows[variant][mode]:
                print(f"{variant} {mode}: {rows[variant][mode]['error']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps after one untimed warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.mode, args.steps)))
        return 0
    variants = [v for v in args.variants.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown variants or modes: {unknown}")
    rows = {v: {m: {"error": "not run"} for m in MODES} for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in variants:
            for mode in modes:
                result = _in_subprocess(variant, mode, args.steps)
                best = rows[variant][mode]
                if "error" in best or result.get("images_per_s", 0) > best.get("images_per_s", 0):
                    rows[variant][mode] = result
                print(f"[{repeat + 1}/{args.repeats}] {variant} {mode}: "
                      + (f"{result['images_per_s']:.1f} img/s" if "images_per_s" in result
                         else result["error"]), file=sys.stderr, flush=True)
    print_table(rows, variants, modes)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report = dict(command=" ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
                  config=os.path.relpath(CONFIG, REPO), steps=args.steps, repeats=args.repeats,
                  machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                               processor=platform.processor()),
                  variants={v: dict(conv_impl=VARIANTS[v][0], xla_flags=VARIANTS[v][1],
                                    devices=VARIANTS[v][2], **rows[v]) for v in variants})
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
