import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from raymoll.metrics import (MetricAccumulator, accuracy, brier_score,
                             expected_calibration_error, negative_log_likelihood)


def reference_ece(probs, labels, n_bins=15):
    """The definition, one sample and one bin at a time: bins (b/B, (b+1)/B]."""
    probs, labels = probs.tolist(), labels.tolist()
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        members = [(max(p), p.index(max(p)) == y) for p, y in zip(probs, labels)
                   if low < max(p) <= high]
        if members:
            acc = sum(correct for _, correct in members) / len(members)
            conf = sum(c for c, _ in members) / len(members)
            total += len(members) / len(probs) * abs(acc - conf)
    return total


def random_logits(n, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("n_bins", [15, 7])
def test_ece_matches_its_definition(n_bins):
    logits, labels = random_logits(500)
    probs = logits.double().softmax(1)
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(
        reference_ece(probs, labels, n_bins), abs=1e-12)


def test_ece_puts_a_confidence_on_an_edge_in_the_bin_below():
    # 8/15 is the upper edge of bin (7/15, 8/15], which also holds the wrong 0.52 sample.
    probs = torch.tensor([[8 / 15, 7 / 15], [0.52, 0.48]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    together = abs(1 - (8 / 15 + 0.52)) / 2
    assert expected_calibration_error(probs, labels) == pytest.approx(together, abs=1e-12)
    assert reference_ece(probs, labels) == pytest.approx(together, abs=1e-12)


def test_ece_is_zero_when_confidence_equals_accuracy():
    # Ten samples at confidence 0.6 with six right, ten at 0.9 with nine right.
    probs = torch.tensor([[0.6, 0.4]] * 10 + [[0.1, 0.9]] * 10)
    labels = torch.tensor([0] * 6 + [1] * 4 + [1] * 9 + [0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)


def test_ece_is_small_for_labels_drawn_from_the_predictions():
    logits, _ = random_logits(20000)
    probs = logits.softmax(1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)).squeeze(1)
    assert expected_calibration_error(probs, labels) < 0.02
    # Sanity: the same predictions against unrelated labels are badly calibrated.
    assert expected_calibration_error(probs, torch.roll(labels, 1)) > 0.2


def test_nll_equals_cross_entropy_on_logits():
    logits, labels = random_logits(300)
    assert negative_log_likelihood(logits.softmax(1), labels) == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-5)


def test_hand_case():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    labels = torch.tensor([0, 2, 1, 1])
    assert accuracy(scores, labels) == 0.5
    assert accuracy(scores.log(), labels) == 0.5
    brier = [0.09 + 0.04 + 0.01, 0.01 + 0.09 + 0.16, 0.25 + 0.36 + 0.01, 0.04 + 0.64 + 0.36]
    assert brier_score(scores, labels) == pytest.approx(sum(brier) / 4)


def whole_set_metrics(logits, labels):
    probs = logits.float().softmax(1)
    return {"accuracy": accuracy(logits, labels), "nll": negative_log_likelihood(probs, labels),
            "ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels),
            "n": len(labels)}


def test_accumulator_over_batches_equals_the_functions_on_the_whole_set():
    logits, labels = random_logits(1000)
    acc = MetricAccumulator()
    for start, stop in [(0, 1), (1, 128), (128, 500), (500, 1000)]:
        acc.update(logits[start:stop], labels[start:stop])
    assert acc.compute() == pytest.approx(whole_set_metrics(logits, labels), rel=1e-6, abs=1e-7)


def test_merged_halves_equal_the_whole():
    logits, labels = random_logits(600)
    whole, first, second = MetricAccumulator(), MetricAccumulator(), MetricAccumulator()
    whole.update(logits, labels)
    first.update(logits[:250], labels[:250])
    second.update(logits[250:], labels[250:])
    merged = MetricAccumulator.from_state(first.state()).merge(second)
    assert torch.allclose(merged.state(), whole.state(), rtol=1e-9, atol=1e-9)
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-9)


def test_bins_are_the_reliability_diagram_of_the_definition():
    logits, labels = random_logits(400)
    acc = MetricAccumulator(n_bins=10)
    acc.update(logits, labels)
    bins = acc.bins()
    probs = logits.softmax(1)
    confidence, correct = probs.max(1).values.tolist(), (probs.argmax(1) == labels).tolist()
    for b in range(10):
        members = [(c, ok) for c, ok in zip(confidence, correct) if b / 10 < c <= (b + 1) / 10]
        assert bins["count"][b] == len(members)
        if members:
            assert bins["confidence"][b] == pytest.approx(sum(c for c, _ in members) / len(members))
            assert bins["accuracy"][b] == pytest.approx(sum(ok for _, ok in members) / len(members))
        else:
            assert bins["confidence"][b].isnan() and bins["accuracy"][b].isnan()


def _all_reduce_worker(rank, path, logits, labels):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    acc = MetricAccumulator()
    acc.update(logits[rank::2], labels[rank::2])
    torch.save(acc.all_reduce_().state(), f"{path}.{rank}")
    dist.destroy_process_group()


def test_all_reduce_sums_the_ranks(tmp_path):
    logits, labels = random_logits(200)
    path = os.fspath(tmp_path / "store")
    mp.spawn(_all_reduce_worker, args=(path, logits, labels), nprocs=2)
    whole = MetricAccumulator()
    whole.update(logits, labels)
    for rank in range(2):
        assert torch.allclose(torch.load(f"{path}.{rank}"), whole.state(), rtol=1e-9)


def test_bad_inputs_are_rejected():
    probs = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="shapes"):
        accuracy(probs, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        expected_calibration_error(probs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="no samples"):
        MetricAccumulator().compute()
    with pytest.raises(ValueError, match="bins"):
        MetricAccumulator(15).merge(MetricAccumulator(10))
