"""MixUp and CutMix on a batch, every draw from a given generator (so a run can be resumed).

The definitions are torchvision's v2.MixUp / v2.CutMix: one lambda ~ Beta(alpha, alpha) per
batch; sample i is mixed with sample i - 1 (the batch rolled by one); CutMix pastes one box of
the rolled batch, its centre uniform over the image and its half-sides int(0.5 sqrt(1 - lambda)
* side), clipped to the image, and weights the labels by the area that stays (lambda corrected
by the box). tests/test_data.py checks both against torchvision at the same lambda and box.

The draws are a handful of scalars per batch, so they come from a CPU generator: no device
sync, even when the images are on a GPU.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raymoll.mollify import sample_beta

MIXES = ("mixup", "cutmix")


class BatchMix:
    """MixUp and/or CutMix (one picked uniformly per batch when both are on).

    Call with images float (N,C,H,W) and labels int64 (N,) or soft float (N,K); returns images
    of the same shape and dtype, and soft labels float32 (N,K). generator: a CPU
    torch.Generator, the source of every draw (public: the training loop reseeds it).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 generator: torch.Generator | None = None):
        self.num_classes = num_classes
        self.alphas = {name: alpha for name, alpha in zip(MIXES, (mixup_alpha, cutmix_alpha))
                       if alpha > 0}
        if not self.alphas:
            raise ValueError("BatchMix needs mixup_alpha > 0 or cutmix_alpha > 0.")
        self.generator = generator if generator is not None else torch.Generator()

    def sample(self, height: int, width: int) -> dict:
        """One batch's parameters: {"mix", "lam"} and, for CutMix, "box" (x1, y1, x2, y2) in
        pixels and "lam_adjusted" (1 - box area / image area)."""
        g = self.generator
        names = list(self.alphas)
        name = names[int(torch.randint(len(names), (1,), generator=g))] if len(names) > 1 \
            else names[0]
        alpha = self.alphas[name]
        lam = float(sample_beta(alpha, alpha, 1, g, "cpu")[0])
        if name == "mixup":
            return {"mix": name, "lam": lam}
        r_x = int(torch.randint(width, (1,), generator=g))
        r_y = int(torch.randint(height, (1,), generator=g))
        r = 0.5 * math.sqrt(1.0 - lam)
        r_w_half, r_h_half = int(r * width), int(r * height)
        box = (max(r_x - r_w_half, 0), max(r_y - r_h_half, 0),
               min(r_x + r_w_half, width), min(r_y + r_h_half, height))
        x1, y1, x2, y2 = box
        return {"mix": name, "lam": lam, "box": box,
                "lam_adjusted": 1.0 - (x2 - x1) * (y2 - y1) / (width * height)}

    def apply(self, x: torch.Tensor, y: torch.Tensor,
              params: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix (x, y) with the given parameters (from `sample`)."""
        y = F.one_hot(y, self.num_classes).float() if y.ndim == 1 else y.float()
        if params["mix"] == "mixup":
            lam = params["lam"]
            return x.roll(1, 0).mul_(1.0 - lam).add_(x.mul(lam)), \
                y.roll(1, 0).mul_(1.0 - lam).add_(y.mul(lam))
        x1, y1, x2, y2 = params["box"]
        out = x.clone()
        out[..., y1:y2, x1:x2] = x.roll(1, 0)[..., y1:y2, x1:x2]
        lam = params["lam_adjusted"]
        return out, y.roll(1, 0).mul_(1.0 - lam).add_(y.mul(lam))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(x, y, self.sample(x.shape[-2], x.shape[-1]))


def batch_mix(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              generator: torch.Generator | None = None) -> BatchMix | None:
    """A BatchMix, or None when both alphas are 0 (DataConfig.mixup_alpha, cutmix_alpha)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return BatchMix(num_classes, mixup_alpha, cutmix_alpha, generator)
