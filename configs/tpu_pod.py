"""launch/tpu_pod.sh TPU_NAME ZONE gs://.../dataset gs://.../run
(on every worker: iap-train --config=configs/tpu_pod.py --workdir=W --config.dataset_dir=D)

A TPU VM pod slice: bf16 compute, batch and parameters split over an fsdp axis within each
host's chips and data parallel across the rest. runlocal also goes back to float32, the
CPU's convolutions, no fsdp axis and one process.
"""
from configs import default


def get_config(arg: str = ""):
    return default.build(arg, overrides)


def overrides(config, args):
    del args  # no switches of its own
    config.model.name = "resnet50"
    config.model.dtype = "bfloat16"
    config.model.conv_impl = "xla"
    config.input.image_size = 224
    config.input.logical_shards = 256  # up to 256 hosts; the batch must be a multiple
    config.batch_size = config.eval_batch_size = 4096
    config.num_epochs = 100
    config.optim.learning_rate = 4e-3
    config.optim.warmup_steps = 1000
    config.mesh.data = -1
    config.mesh.fsdp = 4
    config.sharding.tactic = "fsdp"
    config.checkpoint.every_steps = 2000
    config.distributed.auto = True  # every worker joins the pod, found by jax.distributed
