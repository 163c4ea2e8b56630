"""iap-train --config=configs/paper_dbc.py --workdir=W --config.dataset_dir=D

The paper's recipe (Konz & Mazurowski 2023) on the Duke pre-contrast fat-sat slices:
ResNet-18 from scratch, 1 channel, 224x224, per-image max scaling to [0, 255], batch 512,
Adam lr 1e-3 with coupled L2 1e-4, 100 epochs, sum of cross-entropies plus MSE on raw
TE/TR milliseconds. Slice thickness, flip angle and FOV are classified.
"""
from configs import default


def get_config(arg: str = ""):
    return default.build(arg, overrides)


def overrides(config, args):
    del args  # no switches of its own
    config.model.name = "resnet18"
    config.model.width = 64
    config.input.image_size = 224
    config.input.normalisation = "max"
    config.input.augment = False
    config.labels.always_other = False
    config.labels.transforms = {"EchoTime": "raw", "RepetitionTime": "raw"}
    config.loss.mode = "paper"
    config.batch_size = config.eval_batch_size = 512
    config.num_epochs = 100
    config.optim.name = "paper"
    config.optim.learning_rate = 1e-3
    config.optim.weight_decay = 1e-4
    config.optim.clip_norm = 0.0
