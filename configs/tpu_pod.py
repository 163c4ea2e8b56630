"""A TPU VM pod slice (launch/tpu_pod.sh): bf16 compute, batch and parameters split over
an fsdp axis within each host's chips and data parallel across the rest."""
import os
import runpy

_default = runpy.run_path(os.path.join(os.path.dirname(__file__), "default.py"))


def get_config(arg: str = ""):
    config = _default["get_config"](arg)
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
    if "runlocal" in arg:
        _default["apply_runlocal"](config)
        config.model.dtype = "float32"
        config.model.conv_impl = "auto"
        config.mesh.fsdp = 1
        config.distributed.auto = False
    return config
