"""Scoring a model on uint8 images: the one evaluation path that training's per-epoch
validation and `raymoll evaluate` share."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from raymoll.metrics import MetricAccumulator


def autocast(device: torch.device, bf16: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (CPU bf16 is slower there and changes results)."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def batch_logits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 500,
                 bf16: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float32 logits (B, K), int64 labels (B,)) batch by batch on the model's device,
    for uint8 images (N,3,H,W) normalised there; the model is in eval mode while it runs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(images), batch_size):
            x = normalize(images[start:start + batch_size].to(device, non_blocking=True))
            y = labels[start:start + batch_size].to(device, non_blocking=True)
            with autocast(device, bf16):
                logits = model(x)
            yield logits.float(), y
    finally:
        model.train(was_training)


def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
          normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 500,
          bf16: bool = True, into: MetricAccumulator | None = None) -> MetricAccumulator:
    """Accumulate metrics of `model` on uint8 images (N,3,H,W) with int labels (N,).

    Images are normalised batch by batch on the model's device; returns the accumulator
    (merge or all-reduce it before `compute()` when the set is split across ranks).
    """
    acc = into if into is not None else MetricAccumulator()
    for logits, y in batch_logits(model, images, labels, normalize, batch_size, bf16):
        acc.update(logits, y)
    return acc
