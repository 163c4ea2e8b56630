"""The paper's network for the benchmarks: its heads, and the PyTorch twin of the Flax
ResNet (iap_jax/models/resnet.py) that bench/train.py and bench/predict.py compare against.
"""
from __future__ import annotations

# The paper's twelve heads with its class counts (Manufacturer 3, model 8, scan options 9,
# position 2, field 4, agent 6, matrix 10, slice thickness 21, flip angle 4, FOV 27);
# TE and TR are regressed (one output each).
HEAD_SIZES = {
    "Manufacturer": 3,
    "ManufacturerModelName": 8,
    "ScanOptions": 9,
    "PatientPosition": 2,
    "MagneticFieldStrength": 4,
    "ContrastBolusAgent": 6,
    "AcquisitionMatrix": 10,
    "SliceThickness": 21,
    "FlipAngle": 4,
    "FOV": 27,
    "EchoTime": 1,
    "RepetitionTime": 1,
}


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


# Basic-block ResNets by name, as iap_jax/models/resnet.py's ARCHITECTURES spells them.
TORCH_STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3), "tiny": (1, 1)}


def torch_resnet18(heads: dict, name: str = "resnet18", width: int = 64):
    """The PyTorch twin of the Flax ResNet (1 input channel, a head per IAP)."""
    import torch
    from torch import nn

    if name not in TORCH_STAGES:
        raise ValueError(f"no PyTorch twin of model {name!r} (have {sorted(TORCH_STAGES)})")

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.proj = None
            if stride != 1 or cin != cout:
                self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.proj is None else self.proj(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
            blocks, cin = [], width
            for stage, count in enumerate(TORCH_STAGES[name]):
                cout = width * 2 ** stage
                for index in range(count):
                    blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.heads = nn.ModuleDict({head: nn.Linear(cin, n) for head, n in heads.items()})

        def forward(self, x):
            features = self.blocks(self.stem(x)).mean(dim=(2, 3))
            return {head: layer(features) for head, layer in self.heads.items()}

    return ResNet()
