"""Orbax checkpoints of a training run: separate items in one step directory.

  model           {params, batch_stats}: all a predictor needs
  train           {opt_state, step, rng}
  config          the run's config (JSON)
  label_encoding  labels.LabelEncoding.to_json()
  pixel_spec      preprocess.PixelSpec.to_json(): how to make the model's input
  dataset         the dataset fingerprint (input_pipeline.dataset_fingerprint)
  input           the input position: {"step": next global step to read}

Saves are asynchronous. Kept: the latest `keep` steps and the `keep_best` steps with the
best validation metric (steps saved without metrics count only as "latest").
Restores go onto any mesh: the caller passes abstract arrays carrying target shardings.
A predictor restores the model and the JSON items only (restore_model), so a checkpoint
whose `train` item was deleted to save space still predicts.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from iap_jax.core import sharding as sharding_lib
from iap_jax.core.labels import LabelEncoding
from iap_jax.core.preprocess import PixelSpec
from iap_jax.io import storage

ARRAY_ITEMS = ("model", "train")
JSON_ITEMS = ("config", "label_encoding", "pixel_spec", "dataset", "input")


def _handlers() -> dict:
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
    return handlers


class Checkpointer:
    """CheckpointManager for `<workdir>/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str = "mean_top1", best_mode: str = "max",
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.join(storage.absolute(workdir), "checkpoints")
        self.best_metric = best_metric

        def metric(metrics: Mapping[str, float]) -> float:
            return float(metrics[best_metric])

        policy = checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=metric, reverse=best_mode == "min",
                                      n=keep_best, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            best_fn=metric, best_mode=best_mode, preservation_policy=policy,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=_handlers())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, *, model: Any, train: Any, config: Mapping, encoding: LabelEncoding,
             pixel_spec: PixelSpec, dataset: Mapping, input_position: Mapping,
             metrics: Mapping[str, float] | None = None) -> bool:
        """Starts an asynchronous save (no-op if this step is already saved)."""
        if step in self.manager.all_steps():
            return False
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            train=ocp.args.StandardSave(train),
            config=ocp.args.JsonSave(dict(config)),
            label_encoding=ocp.args.JsonSave(encoding.to_json()),
            pixel_spec=ocp.args.JsonSave(pixel_spec.to_json()),
            dataset=ocp.args.JsonSave(dict(dataset)),
            input=ocp.args.JsonSave(dict(input_position)),
        )
        return self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None,
                                 force=True)

    def restore(self, step: int, *, model_target: Any = None, train_target: Any = None,
                items: tuple[str, ...] = ARRAY_ITEMS + JSON_ITEMS) -> dict[str, Any]:
        """Restores the named items of one step. Array targets are trees of
        jax.ShapeDtypeStruct with shardings (see sharding.with_shardings)."""
        targets = {"model": model_target, "train": train_target}
        args = {}
        for name in items:
            if name in ARRAY_ITEMS:
                if targets[name] is None:
                    raise ValueError(f"restoring {name!r} needs a target tree with shardings")
                args[name] = ocp.args.StandardRestore(targets[name])
            else:
                args[name] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {name: restored[name] for name in items}

    def item_metadata(self, step: int, item: str) -> Any:
        return self.manager.item_metadata(step)[item]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_step(checkpointer: Checkpointer, step: int | str) -> int:
    """An int, "best" (by the validation metric; the latest if none) or "latest" -> a step
    that exists."""
    if step in ("best", "latest"):
        chosen = checkpointer.best_step() if step == "best" else None
        chosen = chosen if chosen is not None else checkpointer.latest_step()
        if chosen is None:
            raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint")
        return chosen
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise ValueError(f"step {step!r}: expected best, latest or a number") from None
    steps = checkpointer.manager.all_steps()
    if step not in steps:
        raise FileNotFoundError(f"{checkpointer.directory}: no checkpoint at step {step} "
                                f"(has {sorted(steps)})")
    return step


def restore_model(workdir: str, mesh=None, step: int | str = "best") -> dict[str, Any]:
    """The model alone, for prediction: {"params", "batch_stats", "label_encoding",
    "pixel_spec", "config", "step", "directory"}, arrays replicated over `mesh` (default:
    this process's devices). Never reads the optimizer state.

    step: an int, "best" (by the validation metric; the latest if none) or "latest"."""
    if not (epath.Path(workdir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir}: no checkpoints/ here; pass the training --workdir")
    checkpointer = Checkpointer(workdir, read_only=True)
    step = resolve_step(checkpointer, step)
    if mesh is None:
        mesh = sharding_lib.make_mesh({"data": -1}, devices=jax.local_devices())
    metadata = checkpointer.item_metadata(step, "model")
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), metadata)
    target = sharding_lib.with_shardings(abstract, sharding_lib.tree_shardings(abstract, mesh))
    restored = checkpointer.restore(step, model_target=target,
                                    items=("model", "config", "label_encoding", "pixel_spec"))
    checkpointer.close()
    return {"params": restored["model"]["params"],
            "batch_stats": restored["model"]["batch_stats"],
            "label_encoding": LabelEncoding.from_json(restored["label_encoding"]),
            "pixel_spec": PixelSpec.from_json(restored["pixel_spec"]),
            "config": restored["config"], "step": int(step),
            "directory": os.path.join(checkpointer.directory, str(step))}
