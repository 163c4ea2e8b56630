"""iap-train --config=configs/synthetic_cpu.py --workdir=W --config.dataset_dir=D
(D: the synthetic dataset iap-synth and iap-prep make, `make train` runs it)

The demo: a small ResNet on the synthetic cohort, a few minutes on 2 CPU cores.
"""
from configs import default


def get_config(arg: str = ""):
    return default.build(arg, overrides)


def overrides(config, args):
    del args  # no switches of its own
    config.model.name = "resnet18"
    config.model.width = 16
    config.input.image_size = 64
    # Robust percentiles rather than the paper's max: measured better on every head here.
    config.input.normalisation = "percentile"
    config.batch_size = config.eval_batch_size = 32
    config.num_epochs = 12
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 20
    config.log_every_steps = 10
    config.checkpoint.every_steps = 200
