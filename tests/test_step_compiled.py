"""What makes the train step fast on a GPU, checked on the CPU in the programs XLA is given:
bf16 convolutions, float32 BatchNorm statistics, no host traffic inside the step, scalar
metrics read on the host only at log steps, and XLA's FLOPs per image recorded.

The step is built as iap_jax/training/train.py builds it, for configs/gpu.py's model (bfloat16, XLA's
convolutions) shrunk to the runlocal tiny ResNet at 32 px, with the tiny dataset's heads.
"""
import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpu
from train_data import tiny_config

from iap_jax.core import sharding as sharding_lib
from iap_jax.core.iaps import IAP_NAMES
from iap_jax.core.labels import LabelEncoding
from iap_jax.core.preprocess import PixelSpec
from iap_jax.models.factory import build_model
from iap_jax.training import input_pipeline, losses, optim, train

REPO = Path(__file__).resolve().parents[1]
STORED_SIZE = 32  # train_data's images
TENSOR = r"tensor<[^>]*>"


def gpu_config(batch_size: int):
    """configs/gpu.py (bf16, XLA convolutions), with runlocal's tiny model and 32 px input
    (gpu.py's runlocal switch also goes back to float32 and CPU convolutions: kept here)."""
    config = gpu.get_config("runlocal")
    full = gpu.get_config("")
    config.model.dtype, config.model.conv_impl = full.model.dtype, full.model.conv_impl
    config.batch_size = batch_size
    return config


def lower_step(dataset_dir: str, batch_size: int):
    """(train.py's jitted train step lowered for a global batch, the abstract state)."""
    config = gpu_config(batch_size)
    labels = config.labels
    encoding = LabelEncoding.from_stats(
        input_pipeline.load_split_stats(dataset_dir, config.train_split),
        iaps=tuple(labels.iaps) or IAP_NAMES, kinds=dict(labels.kinds),
        transforms=dict(labels.transforms), min_count=labels.min_count,
        always_other=labels.always_other, aliases=bool(labels.get("aliases", False)))
    spec = PixelSpec(stored_size=STORED_SIZE, image_size=config.input.image_size,
                     normalisation=config.input.normalisation,
                     percentiles=tuple(config.input.percentiles))
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    model = build_model(config.model, encoding.head_sizes())
    tx = optim.make_optimizer(config.optim, 100)
    abstract_state = jax.eval_shape(train.make_init_fn(model, tx, spec.input_size),
                                    jax.random.PRNGKey(0))
    state_shardings = sharding_lib.tree_shardings(abstract_state, mesh, config.sharding.tactic,
                                                  config.sharding.fsdp_min_size)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    loss_fn = losses.make_loss_fn(encoding, mode=config.loss.mode, weights=dict(config.loss.weights),
                                  huber_delta=config.loss.huber_delta)
    step = jax.jit(train.make_train_step(model, tx, loss_fn, spec, config.input.augment),
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, sharding_lib.replicated(mesh)), donate_argnums=0)

    def batched(dtype, *shape):
        return jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=batch_sharding)

    batch = {"image": batched(jnp.uint16, STORED_SIZE, STORED_SIZE),
             "scale": batched(jnp.float32), "offset": batched(jnp.float32),
             "targets": {h.name: batched(jnp.int32 if h.categorical else jnp.float32)
                         for h in encoding.heads},
             "masks": {h.name: batched(jnp.float32) for h in encoding.heads}}
    return step.lower(sharding_lib.with_shardings(abstract_state, state_shardings), batch), abstract_state


@pytest.fixture(scope="module")
def step(train_dataset_dir):
    lowered, abstract_state = lower_step(train_dataset_dir, 16)
    # StableHLO as lowered: what the program asks of any backend, before the CPU's own
    # rewrites (XLA's CPU backend upcasts bf16 convolutions to f32, which a GPU does not).
    return dict(lowered=lowered, stablehlo=lowered.as_text(debug_info=False),
                compiled=lowered.compile(), state=abstract_state)


def _named(tree, key: str, ndim: int) -> list:
    """The leaves called `key` of rank `ndim` (conv kernels: 4; BatchNorm means: 1)."""
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if getattr(path[-1], "key", None) == key and leaf.ndim == ndim]


def test_convolutions_take_bfloat16(step):
    convs = re.findall(rf"stablehlo\.convolution\(.* : \(({TENSOR}), ({TENSOR})\) -> ({TENSOR})",
                       step["stablehlo"])
    # Forward, weight- and input-gradient convolutions: about 3 per kernel (not vacuous).
    assert len(convs) >= 2 * len(_named(step["state"].params, "kernel", 4))
    for lhs, rhs, out in convs:
        assert lhs.endswith("xbf16>") and rhs.endswith("xbf16>"), (lhs, rhs)
        # HLO has no accumulation type of its own: a bf16 result is the default, and on the
        # GPU XLA gives cuDNN float32 compute for bf16 data (stream_executor's
        # ConvDoFP32ComputationFP16Input, on by default); preferred_element_type=float32
        # would show here as an f32 result. Either accumulates in f32.
        assert out.endswith(("xbf16>", "xf32>")), out


def test_batch_norm_statistics_are_float32(step):
    # Sums over batch, height and width of a 4-D map: BatchNorm's mean and mean of squares
    # and, in the backward pass, its scale and bias gradients.
    sums = re.findall(rf"applies stablehlo\.add across dimensions = \[0, 1, 2\] : "
                      rf"\(({TENSOR}), ({TENSOR})\) -> ({TENSOR})", step["stablehlo"])
    assert len(sums) >= 2 * len(_named(step["state"].batch_stats, "mean", 1))
    for operand, init, out in sums:
        assert operand.endswith("xf32>") and init == "tensor<f32>" and out.endswith("xf32>"), \
            (operand, out)
    new_state, _ = step["compiled"].out_info
    assert {x.dtype for x in jax.tree.leaves(new_state.batch_stats)} == {jnp.dtype(jnp.float32)}


# Host callbacks (jax.debug.print / callback, io_callback, pure_callback), host offloading,
# infeed / outfeed and host send / recv: each one a device-host round trip inside the step.
HOST_TRAFFIC = re.compile(r'custom_call_target="[^"]*(callback|host|MoveTo)|is_host_transfer=true'
                          r"|\b(outfeed|infeed|send|recv)(-done)?\(", re.IGNORECASE)


def test_nothing_goes_to_the_host_inside_the_step(step):
    text = step["compiled"].as_text()
    assert "convolution" in text  # the optimised step itself
    assert not HOST_TRAFFIC.search(text), HOST_TRAFFIC.search(text).group(0)


def test_step_outputs_besides_the_state_are_scalars(step):
    new_state, logs = step["compiled"].out_info
    larger = {name: x.shape for name, x in logs.items() if x.shape != ()}
    assert "loss" in logs and not larger, larger
    assert jax.tree.structure(new_state) == jax.tree.structure(step["state"])


class Watched:
    """One of a step's metrics as the loop sees it: records the step whenever it is read on
    the host, however (jax.device_get, np.asarray, float, format, item); it stays usable
    on the device (__jax_array__) without a read."""

    def __init__(self, value, step: int, reads: set):
        self.value, self.step, self.reads = value, step, reads

    def _read(self):
        self.reads.add(self.step)
        return np.asarray(self.value)

    def __array__(self, dtype=None, copy=None):
        return self._read() if dtype is None else self._read().astype(dtype)

    def __float__(self):
        return float(self._read())

    def __format__(self, spec):
        return format(self._read()[()], spec)

    def item(self):
        return self._read().item()

    def __jax_array__(self):
        return self.value


@pytest.mark.slow
def test_the_loop_reads_metrics_only_at_log_steps(train_dataset_dir, tmp_path, monkeypatch):
    """A real run: 64 examples in batches of 16, 2 epochs = 8 steps, logged every 3."""
    steps, reads = [], set()
    call = jax.stages.Compiled.__call__  # train.py runs its AOT-compiled step

    def watched_call(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        if isinstance(out, tuple) and isinstance(out[-1], dict) and "loss" in out[-1]:
            steps.append(len(steps) + 1)
            out = out[0], {k: Watched(v, steps[-1], reads) for k, v in out[1].items()}
        return out

    monkeypatch.setattr(jax.stages.Compiled, "__call__", watched_call)
    result = train.train_and_evaluate(tiny_config(train_dataset_dir, log_every_steps=3),
                                      str(tmp_path))
    assert result["step"] == len(steps) == 8
    assert reads == {3, 6, 8}  # the log steps and the last


@pytest.mark.slow
def test_flops_per_image_are_linear_in_the_batch(train_dataset_dir, step):
    # XLA's count of the compiled step, per image, at two batch sizes: nearly all of a
    # step's work is per image (the optimizer's update is a few percent of it here).
    large = lower_step(train_dataset_dir, 32)[0].compile()
    per_image = [compiled.cost_analysis()["flops"] / batch
                 for compiled, batch in ((step["compiled"], 16), (large, 32))]
    assert per_image[0] > 0 and per_image[1] == pytest.approx(per_image[0], rel=0.1)


@pytest.mark.slow
def test_bench_rows_record_flops_per_image():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # A jax_xla row of bench/train.py for this model (one timed step), as its worker makes it.
    row = bench.VARIANTS["jax_xla"]((STORED_SIZE, 16, 1, "bfloat16", "configs/gpu.py", "tiny"))
    assert row["flops_per_image"] > 0
    assert row["flops_per_image"] == pytest.approx(row["flops_per_step"] / 16)
