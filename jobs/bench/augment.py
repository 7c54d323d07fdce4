"""Augmentation policies: raymoll's batched BatchAugment against torchvision v2 per image.

For each policy, images per second of BatchAugment(policy) on a uint8 batch and of the
torchvision transform applied image by image (what BatchAugment did before). A timing is
--calls consecutive calls of one side, as a training loop makes them (a single batched call
is a few milliseconds, which one scheduler hiccup doubles). The two sides alternate in rounds,
so load from other processes hits both alike; the median of the paired per-round ratios is
the speed-up. One RESULT line per policy.

    PYTHONPATH=. python jobs/bench/augment.py --device cpu --batch 256 --size 32 --rounds 7
Targets (CPU, batch 256, 32 px): >= 10x for TrivialAugment and RandAugment, >= 5x for AugMix.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torchvision.transforms import v2

from common import device_name, report_result, synchronize
from raymoll.data import BatchAugment

TARGETS = {"trivialaugment": 10.0, "randaugment": 10.0, "augmix": 5.0}


def torchvision_policy(name: str, size: int) -> v2.Transform:
    """The torchvision transform BatchAugment(name) reproduces (same defaults and policy)."""
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10 if size <= 64
                              else v2.AutoAugmentPolicy.IMAGENET)
    return {"trivialaugment": v2.TrivialAugmentWide, "randaugment": v2.RandAugment,
            "augmix": v2.AugMix}[name]()


def seconds(fn: Callable[[], torch.Tensor], device: torch.device, calls: int) -> float:
    """Seconds per call of `fn`, over `calls` consecutive calls (queued GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="image width = height (pixels)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timings of each")
    parser.add_argument("--calls", type=int, default=5, help="consecutive calls per timing")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--policies", nargs="+", default=["trivialaugment", "randaugment",
                                                          "autoaugment", "augmix"])
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8,
                      device=device)
    print(f"batch {args.batch}, {args.size} px, {device.type}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.calls} calls")
    for name in args.policies:
        batched = BatchAugment(name, torch.Generator(device).manual_seed(0))
        reference = torchvision_policy(name, args.size)
        variants = {"batched": lambda: batched(x),
                    "per image": lambda: torch.stack([reference(image) for image in x])}
        for fn in variants.values():
            fn()  # warm-up
        times = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                times[v].append(seconds(variants[v], device, args.calls))
        per_round = [p / b for b, p in zip(times["batched"], times["per image"])]
        ratio = statistics.median(per_round)
        rates = {v: args.batch / statistics.median(t) for v, t in times.items()}
        target = TARGETS.get(name)
        print(f"{name:15s} batched {rates['batched']:9.0f} img/s, torchvision per image "
              f"{rates['per image']:7.0f} img/s: {ratio:.1f}x (rounds {min(per_round):.1f}.."
              f"{max(per_round):.1f}; target {'>= ' + str(target) if target else 'none'})")
        report_result(f"augment {name}", f"BatchAugment({name}) / torchvision v2 per image, "
                      f"batch {args.batch}, {args.size} px", ratio, "x",
                      f">= {target}" if target else "none",
                      ratio >= target if target and device.type == "cpu" else None,
                      device_name(device),
                      f"batched {rates['batched']:.0f} img/s vs {rates['per image']:.0f} img/s; "
                      f"median of {args.rounds} paired rounds x {args.calls} calls, per round "
                      f"{min(per_round):.1f}..{max(per_round):.1f}x; {args.threads} threads")


if __name__ == "__main__":
    main()
