"""iap-train --config=configs/default.py[:runlocal] --workdir=W --config.dataset_dir=D

The base config: every field a run reads (config.input's are those of
iap_jax.training.input_pipeline.InputConfig). The other files in configs/ are variants of it: each
calls `build` with its own overrides.

The text after the file name is a comma-separated list of switches (common.parse_arg):
"runlocal" shrinks the config, whichever variant, to run in a minute on a laptop's CPU.
"""
import ml_collections

from configs import common

from iap_jax.training.input_pipeline import InputConfig


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return build(arg)


def build(arg: str = "", overrides=None, **switches) -> ml_collections.ConfigDict:
    """The base config with `overrides(config, args)` applied, then runlocal if switched on.

    `arg` is parsed once, into `args`: runlocal and any switches a variant declares here by
    their defaults (e.g. res=224; common.parse_arg). runlocal is applied here, last, so it
    shrinks whatever the variant set."""
    args = common.parse_arg(arg, runlocal=False, **switches)
    config = base()
    if overrides is not None:
        overrides(config, args)
    if args.runlocal:
        apply_runlocal(config)
    return config


def base() -> ml_collections.ConfigDict:
    """Every field a run reads, at its default."""
    config = ml_collections.ConfigDict()
    config.dataset_dir = ""
    config.train_split = "train"
    config.eval_split = "validation"
    config.seed = 0

    # conv_impl: auto (XLA off the CPU; on the CPU oneDNN for one float32 device, else the
    # pure-JAX CPU convolution) | xla | cpu_fast | onednn. See iap_jax/models/factory.py.
    config.model = ml_collections.ConfigDict(dict(
        name="resnet18", width=64, dtype="float32", conv_impl="auto"))

    # Label encoding from the train split's stats. kinds: {IAP: "categorical"|"continuous"};
    # transforms: {IAP: "log"|"zscore"|"raw"} for continuous heads; aliases: join the
    # spellings of one scanner listed in iap_jax.core.iaps.ALIASES into one class.
    config.labels = ml_collections.ConfigDict(dict(
        iaps=(), min_count=1, always_other=True, aliases=False,
        kinds={}, transforms={"EchoTime": "log", "RepetitionTime": "log"}))

    # The input settings are the fields of iap_jax.training.input_pipeline.InputConfig, with their
    # defaults and meanings there (image_size, normalisation, percentiles, augment, prefetch,
    # workers, exclude, logical_shards, cache); training caches the decoded images.
    config.input = ml_collections.ConfigDict(InputConfig.config_fields())
    config.input.cache = True

    config.batch_size = 128  # global, over all processes
    config.eval_batch_size = 128
    config.num_epochs = 30
    config.halt_after_steps = 0  # > 0: save and stop there, as if preempted (for tests)

    config.loss = ml_collections.ConfigDict(dict(mode="default", huber_delta=0.0, weights={}))
    config.optim = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, weight_decay=1e-4, warmup_steps=200,
        clip_norm=1.0, b1=0.9, b2=0.999))

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.sharding = ml_collections.ConfigDict(dict(tactic="replicate", fsdp_min_size=2**14))

    # CPU only: split the CPU into this many data-parallel devices (0 = auto, see iap_jax/training/train_cli.py).
    config.cpu_devices = 0

    config.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=1000, keep=2, keep_best=1, best_metric="mean_top1", async_save=True))
    config.log_every_steps = 50
    config.progress_bar = True  # on a terminal; logs get a line per log step

    # Multi-process: num_processes > 1, auto=True (the cluster environment tells JAX the
    # rest), or a SLURM / TPU pod environment seen by iap-train calls jax.distributed.
    config.distributed = ml_collections.ConfigDict(dict(
        coordinator="", num_processes=1, process_id=-1, cpu_collectives="gloo", auto=False))

    # Resuming (a rerun in the same --workdir) refuses a config that changes one of the
    # `fixed` fields, or a field inside one, as the resumed run would then differ from an
    # uninterrupted one (more epochs would stretch the started schedule); the `free` ones
    # inside them change no batch and may change. iap_jax/training/train.py reads these lists.
    config.resume = ml_collections.ConfigDict(dict(
        fixed=("batch_size", "seed", "train_split", "model", "labels", "loss", "optim",
               "num_epochs", "input"),
        free=("input.workers", "input.prefetch", "input.cache")))
    return config


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
    """Shrinks a config to run in a minute on a laptop: a tiny float32 model at 32 px over
    the CPU's convolutions, one epoch, one process (build applies it, once)."""
    config.model.name = "tiny"
    config.model.width = 8
    config.model.dtype = "float32"
    config.model.conv_impl = "auto"
    config.input.image_size = 32
    config.batch_size = config.eval_batch_size = 16
    config.num_epochs = 1
    config.log_every_steps = 5
    config.checkpoint.every_steps = 50
    config.mesh.fsdp = 1
    config.distributed.auto = False
