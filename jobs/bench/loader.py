"""Training-loader throughput: FFCV + BatchAugment("fcr") against a torch DataLoader.

Both deliver the same thing: normalised float32 (N,3,32,32) batches of Fashion-MNIST (32x32,
prepared into --data if missing) on the device, after a per-sample random flip, crop with 4-px
zero padding and rotation up to 15 degrees. The baseline is the usual recipe: torchvision v2
transforms per sample in 2 DataLoader worker processes. Each loader runs one untimed epoch
(FFCV compiles its pipeline then), then timed epochs over the first --subset images, the
loaders alternating for --rounds rounds (best of each reported).

It then times a smallcnn training step on such batches, alone and fed by the FFCV loader: the
loader is not the bottleneck when fed training runs about as fast as training on batches that
are already in memory.

    PYTHONPATH=. python jobs/bench/loader.py --device cpu
Target: FFCV / DataLoader >= 5x.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from raymoll.data import (BatchAugment, load_source, make_loader, normalizer, prepare,
                          read_meta)
from raymoll.models import build_model

TARGET = 5.0


class TorchvisionSet(Dataset):
    """The baseline: uint8 (3,32,32) tensors through torchvision transforms, one by one."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, meta: dict):
        self.images, self.labels = images, labels
        self.transform = v2.Compose([
            v2.RandomHorizontalFlip(), v2.RandomCrop(32, padding=4), v2.RandomRotation(15),
            v2.ToDtype(torch.float32), v2.Normalize(meta["mean"], meta["std"])])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def images_per_second(batches, device: torch.device, step=None) -> float:
    """Images per second over one pass of `batches` (moved to `device`, fed to `step`)."""
    count, start = 0, time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step is not None:
            step(x, y)
        count += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - start)


def best_of(rounds: int, measures: dict) -> dict:
    """The best rate of each measure over `rounds` alternating rounds: load from other
    processes on a shared machine then hits all of them alike and only slows them."""
    results = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            results[name].append(measure())
    return {name: max(values) for name, values in results.items()}


def make_step(num_classes: int, device: torch.device):
    model = build_model("smallcnn", num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/data/fashion-mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--subset", type=int, default=20000, help="images per timed epoch")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds")
    args = parser.parse_args()
    device = torch.device(args.device)
    if not (Path(args.data) / "meta.json").is_file():
        prepare("fashion-mnist", args.data)
    meta = read_meta(args.data)

    ffcv = make_loader(args.data, "train", args.batch_size, device, train=True,
                       subset=args.subset, augment=BatchAugment("fcr"))
    source = load_source("fashion-mnist").train
    images = torch.from_numpy(source.images[:args.subset]).permute(0, 3, 1, 2).contiguous()
    baseline = DataLoader(TorchvisionSet(images, torch.from_numpy(source.labels[:args.subset]),
                                         meta),
                          batch_size=args.batch_size, shuffle=True, num_workers=2,
                          drop_last=True, pin_memory=device.type == "cuda",
                          persistent_workers=True)
    loaders = {"ffcv": ffcv, "dataloader": baseline}
    for loader in loaders.values():
        images_per_second(loader, device)  # warm-up: FFCV compiles, workers start
    rates = best_of(args.rounds, {name: (lambda loader=loader: images_per_second(loader, device))
                                  for name, loader in loaders.items()})
    ratio = rates["ffcv"] / rates["dataloader"]
    print(f"device {device}, batch {args.batch_size}, {args.subset} images per epoch, "
          f"torch threads {torch.get_num_threads()}")
    print(f"FFCV + BatchAugment(fcr): {rates['ffcv']:10.0f} img/s")
    print(f"torch DataLoader (2 w.): {rates['dataloader']:10.0f} img/s")
    print(f"ratio {ratio:.1f}x (target >= {TARGET:.0f}x): {'PASS' if ratio >= TARGET else 'FAIL'}")

    step = make_step(meta["num_classes"], device)
    # The loader-free reference: distinct batches already normalised on the device (training
    # on one repeated batch drifts into denormal floats, which slows CPU steps down).
    normalize, labels = normalizer(meta).to(device), torch.from_numpy(source.labels)
    fixed = [(normalize(images[i:i + args.batch_size].to(device)),
              labels[i:i + args.batch_size].to(device))
             for i in range(0, args.subset - args.batch_size + 1, args.batch_size)]
    images_per_second(fixed[:3], device, step)  # warm-up
    steps = best_of(args.rounds, {"alone": lambda: images_per_second(fixed, device, step),
                                  "fed": lambda: images_per_second(ffcv, device, step)})
    alone, fed = steps["alone"], steps["fed"]
    print(f"smallcnn train step on in-memory batches:{alone:10.0f} img/s")
    print(f"smallcnn train step fed by FFCV:      {fed:10.0f} img/s ({fed / alone:.2f} of "
          f"the in-memory rate; loader alone {rates['ffcv'] / alone:.1f}x the step)")


if __name__ == "__main__":
    main()
