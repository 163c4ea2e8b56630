"""Command line: python -m iap_jax.main --config=configs/X.py --workdir=W [--config.key=value ...]

Multi-process runs call jax.distributed.initialize() first: with an explicit coordinator
from config.distributed (local multi-process, launch/local_multiprocess.py), or with
cluster auto-detection under SLURM or on a TPU VM pod (launch/).
"""
import logging as std_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from iap_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def initialise_distributed(config) -> None:
    """jax.distributed for multi-process runs; a no-op for one process."""
    dist = config.distributed
    cluster = "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1
    tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if dist.num_processes <= 1 and not (dist.auto or cluster or tpu_pod):
        return
    if dist.cpu_collectives:  # before any backend starts; CPU arrays need it to talk
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    if dist.coordinator:
        jax.distributed.initialize(coordinator_address=dist.coordinator,
                                   num_processes=dist.num_processes, process_id=dist.process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())


class _LibraryInfoFilter(std_logging.Filter):
    """Keeps the run log about the run: Orbax and TFDS log every save and read at INFO."""

    NOISY = ("/orbax/", "/tensorflow_datasets/")

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in self.NOISY)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_LibraryInfoFilter())
    initialise_distributed(FLAGS.config)
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run():
    """Console script entry (iap-train)."""
    app.run(main)


if __name__ == "__main__":
    run()
