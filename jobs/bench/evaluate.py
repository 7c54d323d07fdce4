"""End-to-end seconds of `raymoll evaluate`: clean + 15 x 5 test + 4 x 5 validation sets.

Times `raymoll.evaluate.evaluate` on a prepared synthetic 32 px test set of --n images with an
untrained checkpoint (accuracy does not change the cost): reading the split, generating every
corruption on the device, scoring, writing the Parquet table. Runs in one process (no Ray).

    PYTHONPATH=. python jobs/bench/evaluate.py --device cuda                  # the target run
    PYTHONPATH=. python jobs/bench/evaluate.py --device cpu --n 200 --model smallcnn
Target: < 60 s on one H100 for 10,000 images, PreActResNet-18 (96 sets, 960,000 images scored).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import device_name, report_result
from raymoll.checkpoint import save_checkpoint
from raymoll.config import Config, to_dict
from raymoll.data import prepare, read_meta
from raymoll.evaluate import eval_sets, evaluate
from raymoll.models import build_model

TARGET_SECONDS = 60.0  # cuda, n = 10,000, preactresnet18


def make_checkpoint(folder: Path, meta: dict, model: str, width: int) -> Path:
    cfg = to_dict(Config())
    cfg["model"].update(name=model, width=width)
    cfg["run"]["name"] = f"bench-{model}"
    weights = build_model(model, meta["num_classes"], width=width).state_dict()
    save_checkpoint(folder, {"model": weights, "config": cfg, "meta": meta, "epoch": 0,
                             "metrics": {}})
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000, help="test images")
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--width", type=int, default=32, help="smallcnn width")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare("synthetic", tmp / "data", num_train=100, num_test=args.n,
                       progress=False)
        checkpoint = make_checkpoint(tmp / "ckpt", read_meta(data), args.model, args.width)
        started = time.perf_counter()
        evaluate(checkpoint, data, out=tmp / "results.parquet", batch_size=args.batch_size,
                 device=args.device)
        seconds = time.perf_counter() - started

    sets = len(eval_sets())
    print(f"evaluate: {args.model}, {args.n:,} images x {sets} sets on {args.device}: "
          f"{seconds:.1f} s end to end, {seconds / sets:.3f} s per set, "
          f"{args.n * sets / seconds:,.0f} images/s")
    full = args.device == "cuda" and args.n == 10_000 and args.model == "preactresnet18"
    passed = seconds < TARGET_SECONDS if full else None
    print(f"target: < {TARGET_SECONDS:.0f} s on one H100 for 10,000 images with preactresnet18"
          + (f" -> {'met' if passed else 'NOT met'}" if full else
             " (this run is not that configuration)"))
    report_result("evaluate", f"raymoll evaluate end to end, {args.n:,} images x {sets} sets, "
                  f"{args.model}", seconds, "s",
                  f"< {TARGET_SECONDS:.0f} (cuda, 10,000 images, preactresnet18)", passed,
                  device_name(args.device), f"{seconds / sets:.3f} s per set, "
                  f"{args.n * sets / seconds:,.0f} images/s")


if __name__ == "__main__":
    main()
