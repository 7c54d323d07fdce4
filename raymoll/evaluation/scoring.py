"""Scoring one set, raw and temperature-scaled, and fitting the temperature.

Post-hoc temperature scaling (Guo et al. 2017; docs/protocol.md): one T > 0 per checkpoint,
fitted on the clean validation split by minimising the mean NLL of softmax(logits / T) over
log T. Accuracy does not change under T (argmax is invariant), so only NLL, ECE, Brier and the
reliability bins are reported twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoll.corruptions import corrupt
from raymoll.evaluation.sets import EvalSet, set_seed
from raymoll.inference import batch_logits
from raymoll.metrics import MetricAccumulator

CHUNK = 1000  # images corrupted at once: bounds memory, and keeps results independent of batch_size


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising mean NLL of softmax(logits / T); logits (N, K), labels int (N,).

    1-D over log T with L-BFGS (strong Wolfe line search) in float64: NLL is convex in 1/T, so
    it is unimodal in log T and the search converges to the one minimum from T = 1."""
    logits, labels = logits.detach().double(), labels.detach()
    log_t = torch.zeros(1, dtype=torch.float64, device=logits.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return math.exp(log_t.item())


class SetScorer:
    """The model, its normalisation and the clean test split on one device; scores any set."""

    def __init__(self, model: nn.Module, normalize: nn.Module, images: torch.Tensor,
                 labels: torch.Tensor, device: str | torch.device, batch_size: int,
                 bf16: bool, seed: int):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.normalize = normalize.to(self.device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)
        self.batch_size, self.bf16, self.seed = batch_size, bf16, seed

    def _batches(self, images: torch.Tensor, labels: torch.Tensor):
        return batch_logits(self.model, images, labels, self.normalize, self.batch_size,
                            self.bf16)

    def fit_temperature(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """T fitted on the uint8 images (N,3,H,W) and labels (N,) of the validation split."""
        pairs = list(self._batches(images, labels))
        return fit_temperature(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))

    def __call__(self, spec: EvalSet, temperature: float | None,
                 official: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[MetricAccumulator, MetricAccumulator | None]:
        """Metrics of one set, raw and with logits / temperature (None: not scaled), on the
        given official -C images and labels, or the clean test images corrupted here
        (uint8 (N,3,H,W), int64 (N,))."""
        raw = MetricAccumulator()
        scaled = MetricAccumulator() if temperature is not None else None

        def add(images: torch.Tensor, labels: torch.Tensor) -> None:
            for logits, y in self._batches(images, labels):
                raw.update(logits, y)
                if scaled is not None:
                    scaled.update(logits / temperature, y)

        if official is not None:
            add(*official)
            return raw, scaled
        generator = torch.Generator(self.device).manual_seed(
            set_seed(self.seed, spec.corruption, spec.severity))
        for start in range(0, len(self.images), CHUNK):
            x = self.images[start:start + CHUNK]
            if spec.severity:
                x = corrupt(x, spec.corruption, spec.severity, generator=generator)
            add(x, self.labels[start:start + CHUNK])
        return raw, scaled
