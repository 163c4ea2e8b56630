"""One GPU node (or several, under SLURM: launch/slurm_gpu.sbatch): bf16 compute, data
parallel over all GPUs, parameters replicated (ResNet-18 is small)."""
import os
import runpy

_default = runpy.run_path(os.path.join(os.path.dirname(__file__), "default.py"))


def get_config(arg: str = ""):
    config = _default["get_config"](arg)
    config.model.dtype = "bfloat16"
    config.model.conv_impl = "xla"
    config.input.image_size = 224
    config.input.workers = 8  # reader processes when the split does not fit the cache
    config.input.logical_shards = 64  # up to 64 nodes; the batch must be a multiple
    config.batch_size = config.eval_batch_size = 512
    config.num_epochs = 100
    config.mesh.data = -1
    config.mesh.fsdp = 1
    if "runlocal" in arg:
        _default["apply_runlocal"](config)
        config.model.dtype = "float32"
        config.model.conv_impl = "auto"
    return config
