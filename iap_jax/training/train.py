"""Training: one linear train_and_evaluate(config, workdir), in labelled sections.

The state (params, batch_stats, opt_state, step, rng) lives on a device mesh laid out by
the config's sharding tactic; one jitted step updates it in place (donated). Each
process feeds its share of every global batch. Validation runs at each epoch's end.
Checkpoints (Orbax) carry the input position, so a killed run resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from tqdm import tqdm

from iap_jax.core import metrics as metrics_lib
from iap_jax.core import sharding as sharding_lib
from iap_jax.core.iaps import IAP_NAMES
from iap_jax.core.labels import LabelEncoding
from iap_jax.core.preprocess import PixelSpec, model_input
from iap_jax.io import checkpoints as checkpoints_lib
from iap_jax.io import event_log
from iap_jax.io import plots
from iap_jax.io import storage
from iap_jax.io.dataset_info import DatasetInfo
from iap_jax.models.factory import build_model, describe_convolutions
from iap_jax.training import input_pipeline
from iap_jax.training import losses
from iap_jax.training import optim
from iap_jax.training.augment import augment


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def make_init_fn(model, tx, image_size: int) -> Callable[[jax.Array], TrainState]:
    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init(init_rng, jnp.zeros((1, image_size, image_size, 1)), train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params), rng=state_rng)
    return init


def make_train_step(model, tx, loss_fn, spec: PixelSpec, augmented: bool):
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        next_rng, augment_rng = jax.random.split(state.rng)
        images = model_input(batch["image"], batch["scale"], batch["offset"], spec)
        if augmented:
            images = augment(images, augment_rng)

        def objective(params):
            outputs, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images,
                train=True, mutable=["batch_stats"])
            total, per_head = loss_fn(outputs, batch["targets"], batch["masks"])
            return total, (per_head, updates["batch_stats"])

        (loss, (per_head, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                  batch_stats=batch_stats, opt_state=opt_state, rng=next_rng)
        logs = {"loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads)}
        logs.update({f"loss/{name}": value for name, value in per_head.items()})
        return new_state, logs
    return train_step


def make_eval_step(model, encoding: LabelEncoding, spec: PixelSpec):
    def eval_step(state: TrainState, batch: dict) -> dict:
        images = model_input(batch["image"], batch["scale"], batch["offset"], spec)
        outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              images, train=False)
        return metrics_lib.metric_sums(outputs, batch["targets"], batch["masks"], encoding)
    return eval_step


@dataclasses.dataclass(frozen=True)
class Steps:
    """A run's model and its jitted steps on a mesh, built in one place (build_steps) for
    the training loop and bench/train.py alike."""

    model: Any
    init_fn: Callable[[jax.Array], TrainState]
    abstract_state: TrainState  # shapes and dtypes (jax.eval_shape), for shardings and restores
    state_shardings: Any
    batch_sharding: Any
    train_step: Any  # jitted (state, batch) -> (state, logs); the state is donated
    eval_step: Any  # jitted (state, batch) -> metric sums


def build_steps(config: ml_collections.ConfigDict, encoding: LabelEncoding, spec: PixelSpec,
                mesh, total_steps: int, seed: int = 0) -> Steps:
    """The model the config names, its optimizer over total_steps, the state's shardings by
    the config's tactic, and the jitted train and eval steps."""
    model = build_model(config.model, encoding.head_sizes(), device_count=mesh.size)
    tx = optim.make_optimizer(config.optim, total_steps)
    init_fn = make_init_fn(model, tx, spec.input_size)
    abstract_state = jax.eval_shape(init_fn, jax.random.PRNGKey(seed))
    state_shardings = sharding_lib.tree_shardings(
        abstract_state, mesh, config.sharding.tactic, config.sharding.fsdp_min_size)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = sharding_lib.replicated(mesh)
    loss_fn = losses.make_loss_fn(encoding, mode=config.loss.mode, weights=dict(config.loss.weights),
                                  huber_delta=config.loss.huber_delta)
    augmented = input_pipeline.InputConfig.from_config(config.input).augment
    train_step = jax.jit(make_train_step(model, tx, loss_fn, spec, augmented),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model, encoding, spec),
                        in_shardings=(state_shardings, batch_sharding), out_shardings=replicated)
    return Steps(model, init_fn, abstract_state, state_shardings, batch_sharding, train_step,
                 eval_step)


def config_to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


class Preemption:
    """Whether to save and stop now because the job is being stopped.

    Several processes: JAX's preemption service (jax.distributed starts it; it listens for
    SIGTERM, the notice SLURM and TPU VMs give) tells every process the same step to stop
    at, checked with Orbax's CheckpointManager.reached_preemption at every step. One
    process: a SIGTERM handler of its own."""

    def __init__(self, manager):
        self.manager = manager
        self.requested = False
        self.multi_process = jax.process_count() > 1
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return self.manager.reached_preemption(step)
        return self.requested


def _resume_view(config: dict, fixed, free) -> dict:
    """The fields a resume must keep (config.resume, declared with the config's fields): each
    of `fixed`, or each field inside it, by dotted name, less those named in `free`."""
    view = {}
    for name in fixed:
        value = _lookup(config, name)
        if isinstance(value, dict):
            view.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            view[name] = value
    return {k: v for k, v in view.items()
            if not any(k == f or k.startswith(f + ".") for f in free)}


def _check_resumable(current: dict, saved: dict, resume) -> None:
    """Refuses to resume with settings that would make a different run (the current
    config's resume.fixed fields). More epochs would stretch the started learning-rate
    schedule, so they are refused too."""
    fixed, free = tuple(resume.fixed), tuple(resume.free)
    now, then = _resume_view(current, fixed, free), _resume_view(saved, fixed, free)
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if changed:
        detail = "; ".join(f"{k}: {_lookup(saved, k)!r} -> {_lookup(current, k)!r}"
                           for k in changed[:6])
        raise ValueError(f"the checkpoint in this workdir was made with other settings "
                         f"({detail}); resume with the run's own config, or start a new "
                         "--workdir (a longer run needs a new schedule, so a new workdir too)")


def _lookup(config: dict, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


class MetricsLog:
    """metrics.jsonl, written by process 0: a JSON row per log step and evaluation.

    Opening it drops the rows logged after the step the run starts from (they will be
    logged again). Locally each row is appended as it comes. A bucket (gs://) has no
    appends: the file is rewritten whole at every checkpoint and at the end, which loses
    nothing a resume would keep."""

    def __init__(self, path: str, start_step: int):
        self.path = path
        self.remote = storage.is_remote(path)
        self.lines: list[str] = []
        if epath.Path(path).exists():
            with storage.open_file(path) as f:
                self.lines = [line for line in f
                              if line.strip() and json.loads(line)["step"] <= start_step]
        storage.write_text_atomic(path, "".join(self.lines))

    def write(self, step: int, scalars: dict) -> None:
        row = {k: None if np.isnan(v) else v for k, v in scalars.items()}  # strict JSON
        line = json.dumps({"step": step, **row}) + "\n"
        if self.remote:
            self.lines.append(line)
        else:
            with open(self.path, "a") as f:
                f.write(line)

    def flush(self) -> None:
        if self.remote:
            storage.write_text_atomic(self.path, "".join(self.lines))


def check_dataset(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line error when config.dataset_dir is missing or not a prepared dataset."""
    if not config.dataset_dir:
        raise ValueError("no dataset: pass --config.dataset_dir=<the dataset dir iap-prep printed>")
    DatasetInfo.load(config.dataset_dir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) in workdir; returns {"step", "validation", "state", "preempted"}
    (preempted: stopped by a preemption notice before the end, see Preemption)."""
    check_dataset(config)  # before anything is written
    storage.makedirs(workdir)
    is_chief = jax.process_index() == 0

    # ---------------------------------------------------------------- mesh ----------
    mesh = sharding_lib.make_mesh(dict(config.mesh))
    num_processes = jax.process_count()
    for name, size in (("batch_size", config.batch_size), ("eval_batch_size", config.eval_batch_size)):
        if size % mesh.size or size % num_processes:
            raise ValueError(f"{name}={size} must divide over {mesh.size} devices and "
                             f"{num_processes} processes")
    local_batch = config.batch_size // num_processes
    local_eval_batch = config.eval_batch_size // num_processes
    logging.info("mesh %s over %d processes", dict(mesh.shape), num_processes)

    # ---------------------------------------------------------------- input ---------
    input_config = input_pipeline.InputConfig.from_config(config.input)
    readers = {split: input_pipeline.SplitReader(
        config.dataset_dir, split, input_config, process_index=jax.process_index(),
        process_count=num_processes) for split in (config.train_split, config.eval_split)}
    steps_per_epoch = input_pipeline.steps_per_epoch(readers[config.train_split], local_batch)
    if steps_per_epoch == 0:
        raise ValueError(f"{config.dataset_dir}: split {config.train_split!r} is smaller than "
                         f"one batch of {config.batch_size}")
    total_steps = steps_per_epoch * config.num_epochs
    spec = input_pipeline.pixel_spec(readers[config.train_split])
    fingerprint = input_pipeline.dataset_fingerprint(config.dataset_dir,
                                                     readers[config.train_split].info)
    train_stats = input_pipeline.load_split_stats(config.dataset_dir, config.train_split)
    config_json = config_to_json(config)

    # ---------------------------------------------------------------- label encoding -
    encoding = LabelEncoding.from_stats(
        train_stats,
        iaps=tuple(config.labels.iaps) or IAP_NAMES,
        kinds=dict(config.labels.kinds), transforms=dict(config.labels.transforms),
        min_count=config.labels.min_count, always_other=config.labels.always_other,
        aliases=bool(config.labels.get("aliases", False)))
    checkpointer = checkpoints_lib.Checkpointer(
        workdir, keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
        best_metric=config.checkpoint.best_metric, async_save=config.checkpoint.async_save)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:  # the run's own encoding, even if the stats file changed
        saved = checkpointer.restore(resume_step, items=("label_encoding", "config"))
        _check_resumable(config_json, saved["config"], config.resume)
        encoding = LabelEncoding.from_json(saved["label_encoding"])
    logging.info("heads %s", encoding.head_sizes())

    # ---------------------------------------------------------------- model, shardings, jitted steps
    steps = build_steps(config, encoding, spec, mesh, total_steps, config.seed)
    init_fn, abstract_state = steps.init_fn, steps.abstract_state
    state_shardings, batch_sharding = steps.state_shardings, steps.batch_sharding
    train_step, eval_step = steps.train_step, steps.eval_step
    logging.info("convolutions: %s", describe_convolutions(config.model.conv_impl, config.model.dtype,
                                                          device_count=mesh.size))
    num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
    logging.info("model %s: %.2fM parameters", config.model.name, num_params / 1e6)

    # ---------------------------------------------------------------- checkpoint / resume
    target = sharding_lib.with_shardings(abstract_state, state_shardings)
    if resume_step is not None:
        restored = checkpointer.restore(
            resume_step, items=("model", "train", "input", "dataset"),
            model_target={"params": target.params, "batch_stats": target.batch_stats},
            train_target={"opt_state": target.opt_state, "step": target.step, "rng": target.rng})
        if restored["dataset"]["sha256"] != fingerprint["sha256"]:
            raise ValueError(f"{config.dataset_dir}: not the dataset this run started on "
                             f"(fingerprint of {restored['dataset']['dataset_dir']} differs); "
                             "resume on the same dataset or start a new --workdir")
        state = TrainState(params=restored["model"]["params"],
                           batch_stats=restored["model"]["batch_stats"], **restored["train"])
        start_step = int(restored["input"]["step"])
        logging.info("resumed from step %d", start_step)
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(config.seed))
        start_step = 0  # rows of a run killed before its first checkpoint are logged again
    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), start_step) if is_chief else None

    def save(step: int, metrics: dict | None = None) -> None:
        checkpointer.save(step, model={"params": state.params, "batch_stats": state.batch_stats},
                          train={"opt_state": state.opt_state, "step": state.step, "rng": state.rng},
                          config=config_json, encoding=encoding, pixel_spec=spec,
                          dataset=fingerprint, input_position={"step": step}, metrics=metrics)
        if metrics_log is not None:
            metrics_log.flush()

    # ---------------------------------------------------------------- AOT compile ---
    stored = (config.batch_size, spec.stored_size, spec.stored_size)
    abstract_batch = {
        "image": jax.ShapeDtypeStruct(stored, jnp.uint16, sharding=batch_sharding),
        "scale": jax.ShapeDtypeStruct(stored[:1], jnp.float32, sharding=batch_sharding),
        "offset": jax.ShapeDtypeStruct(stored[:1], jnp.float32, sharding=batch_sharding),
        "targets": {h.name: jax.ShapeDtypeStruct((config.batch_size,),
                                                 jnp.int32 if h.categorical else jnp.float32,
                                                 sharding=batch_sharding) for h in encoding.heads},
        "masks": {h.name: jax.ShapeDtypeStruct((config.batch_size,), jnp.float32,
                                               sharding=batch_sharding) for h in encoding.heads},
    }
    compile_start = time.time()
    compiled_train_step = train_step.lower(target, abstract_batch).compile()
    memory = compiled_train_step.memory_analysis()
    logging.info("train step compiled in %.1fs; memory per device: %s", time.time() - compile_start,
                 None if memory is None else
                 f"args {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
                 f"temp {memory.temp_size_in_bytes / 2**20:.1f} MiB")

    # ---------------------------------------------------------------- evaluation ----
    confusions: dict = {}  # of the latest evaluation, for the pictures at the end

    def evaluate() -> dict:
        sums = metrics_lib.MetricSums()
        pending = [eval_step(state, sharding_lib.global_batch(batch, mesh)) for batch in
                   input_pipeline.eval_batches(readers[config.eval_split], encoding, local_eval_batch)]
        for batch_sums in jax.device_get(pending):  # one transfer, not one sync per batch
            sums.add(batch_sums)
        confusions.update({h.name: sums.confusion(h.name) for h in encoding.heads if h.categorical})
        return sums.summary(encoding)

    # ---------------------------------------------------------------- writers -------
    summary_writer = event_log.EventLog(os.path.join(workdir, "tensorboard")) if is_chief else None

    def write_metrics(step: int, scalars: dict) -> None:
        if not is_chief:
            return
        metrics_log.write(step, scalars)
        for key, value in scalars.items():
            summary_writer.scalar(key, value, step)
        summary_writer.flush()

    def flatten(summary: dict) -> dict:
        flat = {f"val/{name}/{key}": float(v) for name, m in summary.items()
                for key, v in m.items() if key != "unit"}
        flat["val/mean_top1"] = metrics_lib.mean_top1(summary)
        return flat

    # ---------------------------------------------------------------- loop ----------
    batches = input_pipeline.train_batches(readers[config.train_split], encoding, local_batch,
                                           seed=config.seed, start_step=start_step)
    # The next global batch is sent to the devices while the current step runs.
    device_batches = sharding_lib.prefetch_to_mesh(batches, mesh)
    preemption = Preemption(checkpointer.manager)
    preempted = False
    # A batch job's log gets a line per log step instead of a bar redrawn with carriage returns.
    use_bar = config.progress_bar and sys.stderr.isatty()
    progress = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                    disable=not (is_chief and use_bar))
    validation: dict = {}
    step = start_step
    window_start, window_steps = time.time(), 0
    run_start = time.time()
    while step < total_steps:
        state, logs = compiled_train_step(state, next(device_batches))
        step += 1
        window_steps += 1
        progress.update(1)

        if step % config.log_every_steps == 0 or step == total_steps:
            logs = jax.device_get(logs)
            rate = window_steps * config.batch_size / max(time.time() - window_start, 1e-9)
            scalars = {f"train/{k}": float(v) for k, v in logs.items()}
            scalars["train/images_per_s"] = rate
            progress.set_postfix(loss=f"{logs['loss']:.3f}", img_s=f"{rate:.1f}")
            if not use_bar and is_chief:
                eta = (total_steps - step) * config.batch_size / max(rate, 1e-9)
                logging.info("step %d/%d loss %.4f %.1f img/s ETA %.0fs", step, total_steps,
                             logs["loss"], rate, eta)
            write_metrics(step, scalars)
            window_start, window_steps = time.time(), 0

        epoch_end = step % steps_per_epoch == 0
        if epoch_end:
            validation = evaluate()
            flat = flatten(validation)
            write_metrics(step, flat)
            if is_chief:
                progress.write(f"epoch {step // steps_per_epoch} (step {step}): "
                               f"mean top-1 {flat['val/mean_top1']:.3f}")
            save(step, {checkpointer.best_metric: flat[f"val/{checkpointer.best_metric}"]})
        elif step % config.checkpoint.every_steps == 0:
            save(step)

        halted = config.halt_after_steps and step >= config.halt_after_steps
        preempted = step < total_steps and preemption.reached(step)
        if halted or preempted:
            if preempted:
                logging.warning("preempted: saving step %d and stopping", step)
            save(step)
            break
    progress.close()
    device_batches.close()  # stops the readers
    if step == total_steps and not validation:  # a finished run started again: report
        validation = evaluate()
    checkpointer.close()
    if metrics_log is not None:
        metrics_log.flush()

    # ---------------------------------------------------------------- summary -------
    if is_chief and validation:
        elapsed = time.time() - run_start
        print(f"\nValidation ({config.eval_split}) at step {step}, {elapsed:.0f}s of training:")
        baseline = metrics_lib.majority_baseline(
            encoding, train_stats, input_pipeline.load_split_stats(config.dataset_dir, config.eval_split))
        # 'majority': the top-1 of always answering the train split's commonest class.
        print(metrics_lib.score_table(validation, baseline))
        plot_dir = os.path.join(workdir, "plots")
        plots.write_confusion_matrices(confusions, encoding, plot_dir)
        print(f"confusion matrices: {plot_dir}")
    return {"step": step, "validation": validation, "state": state, "preempted": preempted}
