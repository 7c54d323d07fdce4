"""Pipeline efficiency of one training worker: the real input path against in-memory batches.

Both paths run the identical training step, built like raymoll.train.loop's from the default
Config: Mollifier -> model under inference.autocast (bf16 on CUDA) -> soft-label cross-entropy
-> SGD. They differ only in where the batches come from:
  real       the FFCV loader over the prepared .beton, with BatchAugment(data.augment) and the
             normalisation on the device, built by make_loader exactly as training builds it;
  in memory  the same number of pre-made normalised float batches already on the device
             (copies of the loader's warm-up epoch): no loader, no augmentation.
real / in-memory images per second is the share of the step rate that the input path keeps.
Each timed epoch covers the first --subset training images; the paths alternate for --rounds
rounds so that load from other processes hits both alike.

    PYTHONPATH=. python jobs/bench/pipeline.py --device cpu    # smallcnn, batch 256
    PYTHONPATH=. python jobs/bench/pipeline.py --device cpu --augment fcr  # crop + flip only
    PYTHONPATH=. python jobs/bench/pipeline.py --device cuda   # preactresnet18, batch 512, bf16
Target: real / in-memory >= 0.9 with fcr + trivialaugment.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Iterable, Iterator

import torch

from common import Step, device_name, images_per_second, report_result
from raymoll.config import Config
from raymoll.data import BatchAugment, make_loader, prepare, read_meta
from raymoll.train.loop import build_trainee, train_step

TARGET = 0.9
DEFAULTS = {"cpu": {"model": "smallcnn", "batch": 256, "subset": 10240},
            "cuda": {"model": "preactresnet18", "batch": 512, "subset": 51200}}


def make_step(cfg: Config, meta: dict, device: torch.device, steps_per_epoch: int) -> Step:
    """raymoll.train.loop's training step on one worker (the same Trainee and train_step), for
    batches of normalised float32 (N,3,H,W) images and int64 (N,) labels on `device`."""
    trainee = build_trainee(cfg, meta, device, rank=0, steps_per_epoch=steps_per_epoch,
                            in_ray_train=False)
    return lambda x, y: train_step(trainee, x, y, bf16=cfg.optim.bf16)


def pinned_epoch(loader: Iterable, threads: int) -> Iterator:
    """One whole epoch of an FFCV loader with torch's CPU threads set to `threads`.

    Starting an epoch sets them to the loader's num_workers; resetting them after that gives
    the step the same threads as on the in-memory path. Epochs always run to the end: leaving
    an FFCV epoch iterator unfinished at exit aborts the process.
    """
    batches = iter(loader)
    torch.set_num_threads(threads)
    yield from batches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="runs/data/fashion-mnist")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--model", help="default: smallcnn on cpu, preactresnet18 on cuda")
    parser.add_argument("--batch", type=int, help="default: 256 on cpu, 512 on cuda")
    parser.add_argument("--subset", type=int,
                        help="training images per timed epoch; default: 10240 cpu, 51200 cuda")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed epochs of each")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the step")
    parser.add_argument("--augment", nargs="+", default=["fcr", "trivialaugment"], metavar="OP",
                        help="data.augment of the real path (default: fcr trivialaugment, what "
                        "every ablation of the paper trains with)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = DEFAULTS[device.type]
    model, batch = args.model or defaults["model"], args.batch or defaults["batch"]
    subset = args.subset or defaults["subset"]
    if subset < batch:
        parser.error(f"--subset {subset} holds no whole batch of --batch {batch}: "
                     f"give a subset of at least one batch.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not (Path(args.data) / "meta.json").is_file():
        prepare("fashion-mnist", args.data)
    meta = read_meta(args.data)
    cfg = Config()
    cfg.model.name = model
    cfg.data.augment = args.augment

    loader = make_loader(args.data, "train", batch, device, train=True,
                         num_workers=cfg.data.num_workers, subset=subset,
                         os_cache=cfg.data.os_cache, augment=BatchAugment(cfg.data.augment))
    # The untimed first epoch compiles FFCV's pipeline, warms the step up (allocations, cuDNN
    # choices) and yields the in-memory batches.
    step = make_step(cfg, meta, device, len(loader))
    in_memory = []
    for x, y in pinned_epoch(loader, args.threads):
        in_memory.append((x.clone(), y.clone()))
        step(x, y)

    paths = {"real": lambda: images_per_second(pinned_epoch(loader, args.threads), device, step),
             "in memory": lambda: images_per_second(in_memory, device, step)}
    rates = {name: [] for name in paths}
    for r in range(args.rounds):
        for name in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            rates[name].append(paths[name]())
    best = {name: max(values) for name, values in rates.items()}
    median = {name: statistics.median(values) for name, values in rates.items()}
    ratio = best["real"] / best["in memory"]
    passed = ratio >= TARGET

    bf16 = device.type == "cuda" and cfg.optim.bf16
    setup = (f"{model}, batch {batch}, {len(in_memory) * batch} images per epoch, "
             f"augment {cfg.data.augment}, {cfg.data.num_workers} loader workers, torch threads "
             f"{args.threads}, bf16={bf16}, {args.rounds} rounds")
    print(f"{device_name(device)}: {setup}")
    for name in paths:
        print(f"{name:<10} {best[name]:9.0f} img/s best, {median[name]:9.0f} median; rounds: "
              + " ".join(f"{rate:.0f}" for rate in rates[name]))
    print(f"ratio real / in memory: {ratio:.3f} best, {median['real'] / median['in memory']:.3f} "
          f"median (target >= {TARGET}): {'met' if passed else 'NOT met'}")
    report_result("pipeline", f"real path (FFCV + augment + mollifier + step) / in-memory "
                  f"batches, images/s, {model} batch {batch}", ratio, "x", f">= {TARGET}",
                  passed, device_name(device),
                  f"{setup}; img/s best real {best['real']:.0f}, in memory "
                  f"{best['in memory']:.0f}")


if __name__ == "__main__":
    main()
