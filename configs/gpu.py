"""iap-train --config=configs/gpu.py --workdir=W --config.dataset_dir=D
(several nodes under SLURM: sbatch --nodes=N launch/slurm_gpu.sbatch D W)

One GPU node, or several: bf16 compute, data parallel over all GPUs, parameters
replicated (ResNet-18 is small). runlocal also goes back to float32 and the CPU's
convolutions.
"""
from configs import default


def get_config(arg: str = ""):
    return default.build(arg, overrides)


def overrides(config, args):
    del args  # no switches of its own
    config.model.dtype = "bfloat16"
    config.model.conv_impl = "xla"
    config.input.image_size = 224
    config.input.workers = 8  # reader processes when the split does not fit the cache
    config.input.logical_shards = 64  # up to 64 nodes; the batch must be a multiple
    config.batch_size = config.eval_batch_size = 512
    config.num_epochs = 100
    config.mesh.data = -1
    config.mesh.fsdp = 1
