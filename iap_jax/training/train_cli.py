"""iap-train: train (or resume) a multi-task ResNet on a dataset made by iap-prep.

  iap-train --config=configs/X.py[:switches] --workdir=W --config.dataset_dir=D [--config.key=value ...]
  python -m iap_jax.training.train_cli (the same flags)

Every field of the config file can be overridden with --config.<key>=<value>, e.g.
--config.num_epochs=30 --config.model.name=resnet50; the configs are in configs/ (default.py
lists every field; switches such as :runlocal follow the file name). A rerun with the same
--workdir resumes from its latest checkpoint.

Exit status: 0 when the run is done (or halted by config.halt_after_steps), 2 for a bad
dataset, EXIT_PREEMPTED (75, EX_TEMPFAIL) when a preemption notice (SIGTERM) stopped it
after saving: run the same command again to continue (launch/slurm_gpu.sbatch requeues
itself on it).

Multi-process runs call jax.distributed.initialize() first: with an explicit coordinator
from config.distributed (local multi-process, launch/local_multiprocess.py), or with
cluster auto-detection under SLURM or on a TPU VM pod (launch/).
"""
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from iap_jax.core import console, distributed
from iap_jax.models import factory
from iap_jax.training import train

FLAGS = flags.FLAGS
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: stopped early, saved; run again to resume
config_flags.DEFINE_config_file("config", None, "Training config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def cpu_device_count(config, cpu_count: int | None, xla_flags: str, multi_process: bool,
                     onednn_convs: bool = False) -> int:
    """How many host devices to split the CPU into (1 = leave JAX's default).

    oneDNN's convolutions use every core from one device, and they run on a single device
    only, so "auto" (0) keeps one device when they are in use. Without them, data parallel
    over two CPU devices trained 1.15x (128 px) to 1.25x (224 px) faster than one device
    using both cores (bench/train.py, variant jax_cpu_fast_2dev): XLA's CPU convolutions
    gain little from a second thread; "auto" applies that to single-process runs whose
    batches divide. An XLA_FLAGS device count set by the user always wins."""
    if "xla_force_host_platform_device_count" in xla_flags:
        return 1
    count = config.cpu_devices
    if count == 0:
        if multi_process or onednn_convs:
            return 1
        count = min(2, cpu_count or 1)
        if config.batch_size % count or config.eval_batch_size % count:
            return 1
    return max(count, 1)


def is_multi_process(config) -> bool:
    return distributed.is_multi_process(config.distributed.num_processes, config.distributed.auto)


def initialise_distributed(config) -> None:
    """jax.distributed for multi-process runs; a no-op for one process."""
    dist = config.distributed
    distributed.initialise(dist.coordinator, dist.num_processes, dist.process_id,
                           dist.cpu_collectives, dist.auto)


class _LibraryInfoFilter(std_logging.Filter):
    """Keeps the run log about the run: Orbax logs every save and restore at INFO."""

    NOISY = ("/orbax/",)
    # Saves between evaluations carry no metric by design (they count as "latest" only).
    EXPECTED = ("did not provide metrics",)

    def filter(self, record: std_logging.LogRecord) -> bool:
        library = any(part in record.pathname for part in self.NOISY)
        if library and any(text in record.getMessage() for text in self.EXPECTED):
            return False
        return record.levelno >= std_logging.WARNING or not library


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    # The run's lines with their time, not absl's level, date, thread and source prefix.
    logging.get_absl_handler().setFormatter(std_logging.Formatter("%(asctime)s %(message)s",
                                                                  "%H:%M:%S"))
    config = FLAGS.config
    multi_process = is_multi_process(config)
    # Asked before any backend starts (the count only matters to the CPU backend).
    onednn_convs = not multi_process and factory.wants_one_cpu_device(
        config.model.conv_impl, config.model.dtype)
    devices = cpu_device_count(config, os.cpu_count(), os.environ.get("XLA_FLAGS", ""),
                               multi_process, onednn_convs)
    if devices > 1:  # before any backend starts; only the CPU backend reads it
        jax.config.update("jax_num_cpu_devices", devices)
    try:  # a one-line error, before anything is written
        train.check_dataset(config)
    except (ValueError, FileNotFoundError) as err:
        print(f"iap-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    initialise_distributed(config)
    result = train.train_and_evaluate(config, FLAGS.workdir)
    if result["preempted"]:
        sys.exit(EXIT_PREEMPTED)


def run():
    """Console script entry (iap-train)."""
    console.quiet_libraries()
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        # absl's --help lists the flags of the script's own module, which here is the
        # console-script stub: print this module's usage and flags instead.
        print(__doc__)
        print(FLAGS.module_help(__name__))
        sys.exit(0)
    app.run(main)


if __name__ == "__main__":
    run()
