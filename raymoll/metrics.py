"""Classification metrics: accuracy, NLL, Brier score and top-label ECE, whole-set or streaming.

ECE (docs/protocol.md §4): 15 equal-width bins on the top-label confidence, bin b = (b/B, (b+1)/B]
(a confidence exactly on an edge belongs to the bin whose upper edge it is), L1 over the whole
evaluated set: sum_b |B_b| / N * |acc_b - conf_b|. `MetricAccumulator` keeps per-bin sums, not
per-batch ECEs, so its ECE is the whole-set ECE, and its state can be summed across DDP ranks.

Pure PyTorch; works on any device (state lives on the device of the logits).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from raymoll.errors import RaymollError


class MetricError(RaymollError):
    """Inputs of the wrong shape or range for a metric."""


def _check(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 1) -> None:
    if probs.ndim != 2 or labels.shape != probs.shape[:1] or probs.shape[0] == 0:
        raise MetricError(f"expected scores (N, K) and integer labels (N,) with N > 0, got "
                          f"shapes {tuple(probs.shape)} and {tuple(labels.shape)}")
    low, high = labels.min().item(), labels.max().item()
    if labels.is_floating_point() or low < 0 or high >= probs.shape[1]:
        raise MetricError(f"labels must be integer class indices in [0, {probs.shape[1]}), got "
                          f"dtype {labels.dtype} with values in [{low}, {high}]")
    if n_bins < 1:
        raise MetricError(f"n_bins must be a positive integer, got {n_bins}")


def _log(probs: torch.Tensor) -> torch.Tensor:
    # A probability of exactly 0 on the true class would make NLL infinite; cap it instead.
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def _sums(probs: torch.Tensor, log_probs: torch.Tensor, labels: torch.Tensor,
          n_bins: int) -> torch.Tensor:
    """The accumulator state of one batch, float64 (3 * n_bins + 2,): per-bin sample counts,
    per-bin sums of confidence, per-bin counts of correct predictions, sum of NLL, sum of Brier."""
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels).double()
    # Interior edges k / n_bins rounded to the scores' dtype, so that a score exactly on an edge
    # in that dtype lands in the bin below it (bucketize right=False: edge[i-1] < x <= edge[i]).
    edges = torch.arange(1, n_bins, dtype=torch.float64, device=probs.device) / n_bins
    bins = torch.bucketize(confidence, edges.to(confidence.dtype))
    per_bin = torch.zeros(3, n_bins, dtype=torch.float64, device=probs.device)
    per_bin[0].index_add_(0, bins, torch.ones_like(correct))
    per_bin[1].index_add_(0, bins, confidence.double())
    per_bin[2].index_add_(0, bins, correct)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    nll = -log_probs.gather(1, labels[:, None]).double().sum()
    # sum_k (p_k - onehot_k)^2 = sum_k p_k^2 - 2 p_true + 1
    brier = (probs.double().square().sum(1) - 2 * p_true.double() + 1).sum()
    return torch.cat([per_bin.flatten(), torch.stack([nll, brier])])


def _ece(per_bin: torch.Tensor) -> float:
    """ECE from (3, n_bins) per-bin counts, confidence sums, correct counts.

    |B_b| / N * |acc_b - conf_b| = |correct_b - confidence_b| / N, so empty bins add 0."""
    count, confidence, correct = per_bin
    return ((correct - confidence).abs().sum() / count.sum()).item()


def accuracy(logits_or_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label; scores (N, K), labels int (N,)."""
    _check(logits_or_probs, labels)
    return (logits_or_probs.argmax(dim=1) == labels).double().mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean -log p(true label) in nats; probs (N, K) rows on the simplex, labels int (N,)."""
    _check(probs, labels)
    return -_log(probs).gather(1, labels[:, None]).double().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of sum_k (p_k - onehot_k)^2, in [0, 2]; probs (N, K), labels int (N,)."""
    _check(probs, labels)
    onehot = F.one_hot(labels, probs.shape[1])
    return (probs.double() - onehot).square().sum(1).mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor,
                               n_bins: int = 15) -> float:
    """Top-label L1 ECE with `n_bins` equal-width confidence bins; probs (N, K), labels int (N,)."""
    _check(probs, labels, n_bins)
    state = _sums(probs, _log(probs), labels, n_bins)
    return _ece(state[:3 * n_bins].view(3, n_bins))


class MetricAccumulator:
    """Streaming accuracy, NLL, ECE and Brier over batches of logits.

    State is one float64 vector of 3 * n_bins + 2 sums, so ranks combine by adding states
    (`merge`, `all_reduce_`), and the result equals the metric functions on the whole set.
    """

    def __init__(self, n_bins: int = 15):
        if n_bins < 1:
            raise MetricError(f"n_bins must be a positive integer, got {n_bins}")
        self.n_bins = n_bins
        self._state = torch.zeros(3 * n_bins + 2, dtype=torch.float64)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch: logits (N, K) of any float dtype, labels int (N,) on the same device."""
        _check(logits, labels, self.n_bins)
        # float32 softmax: bf16 logits from autocast would round confidences to 3 digits.
        log_probs = F.log_softmax(logits.float(), dim=1)
        batch = _sums(log_probs.exp(), log_probs, labels, self.n_bins)
        self._state = self._state.to(batch.device) + batch

    def state(self) -> torch.Tensor:
        """A copy of the state: float64 (3 * n_bins + 2,)."""
        return self._state.clone()

    @classmethod
    def from_state(cls, state: torch.Tensor, n_bins: int = 15) -> "MetricAccumulator":
        if state.shape != (3 * n_bins + 2,):
            raise MetricError(f"a state for {n_bins} bins has shape ({3 * n_bins + 2},), "
                              f"got {tuple(state.shape)}")
        acc = cls(n_bins)
        acc._state = state.to(torch.float64).clone()
        return acc

    def merge(self, other: "MetricAccumulator") -> "MetricAccumulator":
        """Add another accumulator's samples to this one (in place); returns self."""
        if other.n_bins != self.n_bins:
            raise MetricError(f"cannot merge accumulators with {self.n_bins} and "
                              f"{other.n_bins} bins")
        self._state = self._state + other._state.to(self._state.device)
        return self

    def all_reduce_(self) -> "MetricAccumulator":
        """Sum the state over all ranks when torch.distributed is initialised; returns self.

        With the NCCL backend call it after at least one `update` on the GPU (or move the state
        there), since NCCL reduces only CUDA tensors."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._state)
        return self

    def bins(self) -> dict[str, torch.Tensor]:
        """The reliability diagram: float64 (n_bins,) tensors "count" (samples per confidence
        bin), "confidence" (their mean top-label confidence) and "accuracy" (their fraction
        correct); confidence and accuracy are NaN in empty bins."""
        count, confidence, correct = self._state[:3 * self.n_bins].view(3, self.n_bins).cpu()
        # 0 / 0 = NaN marks an empty bin, which a plot skips and a mean must not count as 0.
        return {"count": count.clone(), "confidence": confidence / count,
                "accuracy": correct / count}

    def compute(self) -> dict[str, float]:
        """{"accuracy", "nll", "ece", "brier": float, "n": int} over every sample seen."""
        per_bin = self._state[:3 * self.n_bins].view(3, self.n_bins)
        n = per_bin[0].sum().item()
        if n == 0:
            raise MetricError("no samples: call update() before compute()")
        nll, brier = self._state[3 * self.n_bins:].tolist()
        return {"accuracy": per_bin[2].sum().item() / n, "nll": nll / n, "ece": _ece(per_bin),
                "brier": brier / n, "n": int(n)}
