"""Per-sample batch augmentation on the batch's device (MixUp/CutMix: raymoll.data.mix).

"fcr" (the paper's base: flip, crop with 4-px zero padding, rotation up to 15 degrees) is one
batched affine warp: fully vectorised, works on uint8 or float. The torchvision policies
(TrivialAugmentWide, RandAugment, AutoAugment, AugMix) are batched too (raymoll.data.policies:
per-sample ops and magnitudes, no loop over images, no host sync); they need uint8 images, i.e.
run them before the normalisation (make_loader(augment=...) does).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raymoll.data.policies import POLICIES, to_uint8
from raymoll.errors import RaymollError

AUGMENTS = ("none", "fcr", "trivialaugment", "randaugment", "autoaugment", "augmix")


def flip_crop_rotate(x: torch.Tensor, pad: int = 4, max_degrees: float = 15.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample: horizontal flip (p=0.5), shift by up to `pad` px per axis (the random crop of
    a zero-padded image), rotation by U(-max_degrees, max_degrees) about the centre.

    x: (N,C,H,W) uint8 or float on any device; returns the same shape, dtype and device.
    The three are composed into one 2x3 matrix per sample and sampled once (nearest, zeros
    outside), so shifts and flips copy pixels exactly; unlike three sequential warps, corners
    that a rotation brings in come from the image where it has pixels there. Every draw comes
    from `generator` (on x's device; the global RNG when None).
    """
    n, _, h, w = x.shape
    g, dev = generator, x.device
    flip = torch.where(torch.rand(n, device=dev, generator=g) < 0.5, -1.0, 1.0)
    shift = torch.randint(-pad, pad + 1, (n, 2), device=dev, generator=g).float()
    angle = (torch.rand(n, device=dev, generator=g) * 2 - 1) * math.radians(max_degrees)
    cos, sin = angle.cos(), angle.sin()
    # Output pixel u (from the centre) reads input pixel Flip @ Rot @ u + shift; affine_grid
    # wants that map in coordinates normalised by the half-sizes, hence the h/w factors.
    theta = torch.stack([torch.stack([flip * cos, -flip * sin * h / w, 2 * shift[:, 0] / w], 1),
                         torch.stack([sin * w / h, cos, 2 * shift[:, 1] / h], 1)], 1)
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    source = x if x.is_floating_point() else x.float()
    out = F.grid_sample(source, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return to_uint8(out) if x.dtype == torch.uint8 else out.to(x.dtype)


class BatchAugment(nn.Module):
    """Random augmentations drawn independently for every image of a batch, applied in order.

    names: one of AUGMENTS or a sequence of them (DataConfig.augment), e.g. ["fcr",
    "trivialaugment"]. The policies have torchvision's defaults (RandAugment N=2, M=9; AugMix
    severity 3, width 3, depth 1-3, alpha 1); "autoaugment" uses torchvision's CIFAR-10 policy
    for images up to 64 px and its ImageNet policy above. generator: the source of every random
    draw (public: the training loop reseeds it each epoch with `augment.generator.manual_seed(
    ...)`); it must live on the batch's device; None = the global RNG. Input (N,3,H,W) on any
    device; output has the same shape, dtype and device. fcr takes uint8 or float; the
    policies need uint8.
    """

    def __init__(self, names: str | Sequence[str], generator: torch.Generator | None = None):
        super().__init__()
        self.names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [n for n in self.names if n not in AUGMENTS]
        if unknown:
            raise RaymollError(f"unknown augmentation {unknown[0]!r}: choose one of "
                               f"{', '.join(AUGMENTS)}.")
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            if name == "fcr":
                x = flip_crop_rotate(x, generator=self.generator)
            elif name == "autoaugment":
                policy = "cifar10" if max(x.shape[-2:]) <= 64 else "imagenet"
                x = POLICIES[name](self._uint8(name, x), self.generator, policy=policy)
            elif name != "none":
                x = POLICIES[name](self._uint8(name, x), self.generator)
        return x

    @staticmethod
    def _uint8(name: str, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise RaymollError(f"augmentation {name!r} needs uint8 images, got {x.dtype}: "
                               f"apply it before the normalisation.")
        return x

    def extra_repr(self) -> str:
        return ", ".join(self.names)

