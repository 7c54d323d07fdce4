"""EMA weights (optim.ema_decay > 0): torch.optim.swa_utils.AveragedModel with its EMA
averaging function, updated after every optimizer step.

use_buffers=True: BatchNorm's running statistics are averaged together with the parameters
(timm's ModelEmaV3 and torchvision's reference do the same), so the EMA model is usable as is,
without a pass over the training data to recompute them (swa_utils.update_bn).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """ema <- decay * ema + (1 - decay) * weights, per step; the first update copies them."""

    def __init__(self, model: nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                      use_buffers=True)

    @property
    def module(self) -> nn.Module:
        """The EMA model (same class and state-dict keys as the trained one)."""
        return self.averaged.module

    def update(self, model: nn.Module) -> None:
        """Average in `model`'s current weights and buffers (on the device, no host sync)."""
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA model's state dict, with the trained model's keys (checkpoint key `ema`)."""
        return self.averaged.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict()`; later updates average into it (no fresh copy)."""
        self.averaged.module.load_state_dict(state)
        self.averaged.n_averaged.fill_(1)  # EMA's update depends only on n_averaged > 0
