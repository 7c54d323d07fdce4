"""Image classifiers by name: PreActResNet-18/50, WRN-40-2, a small CNN for CPU runs, and
torchvision's ImageNet ResNet-50.

Every model maps float images (N, C, H, W) to logits (N, num_classes). The ResNets use the
CIFAR stem (3x3 conv, stride 1, no max-pool) and global average pooling, so 32 px and 64 px
inputs both work. WRN-40-2 is a pre-activation ResNet too (Zagoruyko & Komodakis 2016), so all
three share `PreActBlock` and `PreActResNet`. "resnet50" is torchvision's (ImageNet stem:
7x7 stride-2 conv and max-pool), for images of 128 px and more.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F
import torchvision


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed (directly or after the residual add) by a BatchNorm.
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                     padding=kernel_size // 2, bias=False)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): a chain of BN-ReLU-conv units plus a skip.

    Basic: 3x3 -> 3x3. Bottleneck: 1x1 -> 3x3 -> 1x1 with out_channels // 4 in the middle.
    The stride sits on the 3x3 conv; the skip is a strided 1x1 conv on the pre-activated input
    when the shape changes, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, bottleneck: bool):
        super().__init__()
        if bottleneck:
            mid = out_channels // 4
            convs = [_conv(in_channels, mid, 1), _conv(mid, mid, 3, stride),
                     _conv(mid, out_channels, 1)]
        else:
            convs = [_conv(in_channels, out_channels, 3, stride),
                     _conv(out_channels, out_channels, 3)]
        self.norms = nn.ModuleList(nn.BatchNorm2d(conv.in_channels) for conv in convs)
        self.convs = nn.ModuleList(convs)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = _conv(in_channels, out_channels, 1, stride) if reshapes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norms[0](x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.convs[0](out)
        for norm, conv in zip(self.norms[1:], self.convs[1:]):
            out = conv(F.relu(norm(out)))
        return out + skip


class PreActResNet(nn.Module):
    """Stem conv, stages of `PreActBlock`s (stride 2 at the start of every stage but the first),
    final BN-ReLU, global average pool, linear."""

    def __init__(self, stem_width: int, stage_widths: tuple[int, ...],
                 blocks_per_stage: tuple[int, ...], bottleneck: bool, num_classes: int,
                 in_channels: int):
        super().__init__()
        self.stem = _conv(in_channels, stem_width, 3)
        blocks, width = [], stem_width
        for stage, (out_width, n_blocks) in enumerate(zip(stage_widths, blocks_per_stage)):
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(width, out_width, stride, bottleneck))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (width, 2 width, 4 width) with a 2x2 max-pool after the first two,
    global average pool, linear. At 32 px and width 32 the forward pass costs about 20 MFLOPs
    per image (forward + backward about 60 MFLOPs; tests/test_models.py measures it)."""

    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        widths = (in_channels, width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [_conv(w_in, w_out, 3), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
            if i < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _init_weights(model: nn.Module) -> nn.Module:
    # He init for ReLU nets, as in torchvision's ResNet; BN starts as the identity.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def _imagenet_resnet50(num_classes: int, in_channels: int) -> nn.Module:
    model = torchvision.models.resnet50(num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "smallcnn": lambda k, c, w: SmallCNN(k, c, w),
    "preactresnet18": lambda k, c, w: PreActResNet(64, (64, 128, 256, 512), (2, 2, 2, 2),
                                                   False, k, c),
    "preactresnet50": lambda k, c, w: PreActResNet(64, (256, 512, 1024, 2048), (3, 4, 6, 3),
                                                   True, k, c),
    # WRN-40-2: (40 - 4) / 6 = 6 basic blocks per stage, widths 16 * 2, 32 * 2, 64 * 2; no dropout.
    "wrn40_2": lambda k, c, w: PreActResNet(16, (32, 64, 128), (6, 6, 6), False, k, c),
    "resnet50": lambda k, c, w: _imagenet_resnet50(k, c),
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, in_channels: int = 3, width: int = 32) -> nn.Module:
    """A freshly initialised model from the registry; `width` only affects "smallcnn".

    The model maps float (N, in_channels, H, W) to logits (N, num_classes), any H, W >= 8.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("width", width)):
        if value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value}")
    return _init_weights(_BUILDERS[name](num_classes, in_channels, width))
