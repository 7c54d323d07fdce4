"""`raymoll evaluate`: one checkpoint on the clean test set and on every corruption x severity.

Sets: clean (severity 0), the 15 test corruptions and the 4 validation corruptions (family
"validation") at each severity, so 1 + 19 x 5 = 96 rows. Corrupted images come from an official
-C folder when one is given (the 4 validation corruptions only where the folder has them); else
they are generated from the clean test images with one torch.Generator per set, seeded from
(seed, corruption, severity), so any single set can be reproduced alone.

Every set is scored by `raymoll.inference.score`, the path training's validation uses. On a Ray
cluster (RAY_ADDRESS set, or Ray already initialised here) with GPUs, the sets fan out as Ray
tasks and each worker process keeps the model and the test split on its GPU between tasks;
otherwise this process scores them in turn.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from raymoll.checkpoint import CheckpointError, load_model
from raymoll.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS, corrupt
from raymoll.corruptions.official import check_corruptions_dir, read_corrupted
from raymoll.data import load_split, normalizer, read_meta
from raymoll.inference import score
from raymoll.metrics import MetricAccumulator
from raymoll.results import write_results
from raymoll.errors import RaymollError

SEVERITIES = (1, 2, 3, 4, 5)
GPU_SHARE = 0.25  # four sets share a GPU: one small-image set alone leaves most of it idle
CHUNK = 1000  # images corrupted at once: bounds memory, and keeps results independent of batch_size


class EvaluateError(RaymollError):
    """Bad arguments to `evaluate` (severities, device, output path)."""


@dataclass(frozen=True)
class EvalSet:
    """One row of the results table: a corruption at a severity (clean: "clean", 0)."""
    corruption: str
    family: str
    severity: int


def eval_sets(severities: Sequence[int] = SEVERITIES) -> list[EvalSet]:
    """Clean, then the 15 test corruptions, then the 4 validation ones, each at `severities`."""
    return ([EvalSet("clean", "clean", 0)]
            + [EvalSet(name, FAMILIES[name], s) for name in CORRUPTIONS for s in severities]
            + [EvalSet(name, "validation", s) for name in VALIDATION_CORRUPTIONS
               for s in severities])


def set_seed(seed: int, corruption: str, severity: int) -> int:
    """The generator seed of one set: a 63-bit hash of (seed, corruption, severity)."""
    digest = hashlib.sha256(f"{seed}/{corruption}/{severity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


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

    def __call__(self, spec: EvalSet,
                 official: tuple[torch.Tensor, torch.Tensor] | None = None) -> MetricAccumulator:
        """Metrics of one set: the given official -C images and labels, or the clean test
        images corrupted here (uint8 (N,3,H,W), int64 (N,))."""
        if official is not None:
            images, labels = official
            return score(self.model, images, labels, self.normalize, self.batch_size, self.bf16)
        acc = MetricAccumulator()
        generator = torch.Generator(self.device).manual_seed(
            set_seed(self.seed, spec.corruption, spec.severity))
        for start in range(0, len(self.images), CHUNK):
            x = self.images[start:start + CHUNK]
            if spec.severity:
                x = corrupt(x, spec.corruption, spec.severity, generator=generator)
            score(self.model, x, self.labels[start:start + CHUNK], self.normalize,
                  self.batch_size, self.bf16, into=acc)
        return acc


OfficialSource = Callable[[EvalSet], "tuple[torch.Tensor, torch.Tensor] | None"]


def _official_source(corruptions_dir: str | Path | None, meta: dict, severities: Sequence[int],
                     subset: int = 0) -> tuple[OfficialSource, list[str]]:
    """Check the -C folder (all 15 test corruptions required, the validation ones optional);
    returns the reader of one set (None: generate it) and the names read from the folder."""
    if corruptions_dir is None:
        return (lambda spec: None), []
    root = Path(corruptions_dir)
    # Either layout: <name>.npy (CIFAR-C) or <name>/<severity>/ (Tiny-ImageNet-C).
    names = list(CORRUPTIONS) + [n for n in VALIDATION_CORRUPTIONS
                                 if (root / f"{n}.npy").is_file() or (root / n).is_dir()]
    check_corruptions_dir(root, names)

    def source(spec: EvalSet) -> tuple[torch.Tensor, torch.Tensor] | None:
        if spec.corruption not in names:
            return None
        images, labels = read_corrupted(root, spec.corruption, spec.severity, meta["class_names"])
        return (images[:subset], labels[:subset]) if subset else (images, labels)

    # One set read in full before any model work: the files must fit the data and the model.
    images, _ = source(EvalSet(names[0], FAMILIES[names[0]], severities[0]))
    height, width = meta["image_size"]
    if tuple(images.shape[-2:]) != (height, width):
        raise EvaluateError(f"the -C files in {str(root)!r} hold {images.shape[-1]}x"
                            f"{images.shape[-2]} images but the test images of the data folder "
                            f"are {width}x{height}; point --corruptions at the -C files of the "
                            f"same dataset.")
    return source, names


def _check_args(severities: Sequence[int], device: str | None, out: Path) -> torch.device | None:
    """Raise on bad severities, output path or device name; returns the device (None: auto)."""
    if not severities or len(set(severities)) != len(severities) \
            or any(s not in SEVERITIES for s in severities):
        raise EvaluateError(f"severities must be distinct values from 1 to 5, got "
                            f"{list(severities)}.")
    if out.is_dir():
        raise EvaluateError(f"--out {str(out)!r} is a folder; give a file name such as "
                            f"{str(out / 'results.parquet')!r}.")
    try:
        return torch.device(device) if device else None
    except RuntimeError:
        raise EvaluateError(f"device {device!r} is not a torch device; use cpu or cuda.") from None


def _local_device(device: torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"device {str(device)!r} was asked for but CUDA is not available "
                            f"here; use --device cpu.")
    return device


def _ray_gpus() -> float:
    """GPUs of the Ray cluster this process belongs to: RAY_ADDRESS, or a Ray initialised
    here. 0 when neither, so a local evaluation does not start Ray at all."""
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if not (os.environ.get("RAY_ADDRESS") or running):
        return 0.0
    from raymoll.runtime import init_ray
    init_ray()
    import ray
    return ray.cluster_resources().get("GPU", 0.0)


def _in_process(sets: list[EvalSet], scorer: SetScorer,
                official: OfficialSource) -> Iterator[tuple[EvalSet, MetricAccumulator]]:
    for spec in sets:
        yield spec, scorer(spec, official(spec))


_WORKER_SCORER: dict[str, SetScorer] = {}  # per Ray worker process: the current evaluation's


def _score_on_worker(shared: list, spec: EvalSet,
                     official: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Ray task body: one set on this worker's GPU; returns the accumulator state."""
    import ray

    key = shared[0].hex()  # the ref arrives wrapped in a list so Ray does not resolve it per task
    if key not in _WORKER_SCORER:
        _WORKER_SCORER.clear()
        # Ray sets CUDA_VISIBLE_DEVICES to this task's GPU; the CPU keeps fake-GPU clusters working.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _WORKER_SCORER[key] = SetScorer(**ray.get(shared[0]), device=device)
    return _WORKER_SCORER[key](spec, official).state().cpu()


def _on_ray(sets: list[EvalSet], scorer_kwargs: dict[str, Any], official: OfficialSource,
            gpus: float) -> Iterator[tuple[EvalSet, MetricAccumulator]]:
    """Fan the sets out as Ray tasks; yields them as they finish. At most two tasks per GPU
    slot are in flight, so official -C blocks are read and shipped only shortly before use."""
    import ray

    task = ray.remote(num_gpus=GPU_SHARE)(_score_on_worker)
    shared = [ray.put(scorer_kwargs)]
    window = 2 * max(1, int(gpus / GPU_SHARE))
    todo, pending = list(sets), {}
    while todo or pending:
        while todo and len(pending) < window:
            spec = todo.pop(0)
            pending[task.remote(shared, spec, official(spec))] = spec
        (done,), _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done), MetricAccumulator.from_state(ray.get(done))


def _row(spec: EvalSet, acc: MetricAccumulator, common: dict[str, Any]) -> dict[str, Any]:
    metrics, bins = acc.compute(), acc.bins()
    return {**common, "corruption": spec.corruption, "family": spec.family,
            "severity": spec.severity, "n": metrics["n"],
            **{key: metrics[key] for key in ("accuracy", "nll", "ece", "brier")},
            "bin_count": bins["count"].long().tolist(),
            "bin_confidence": bins["confidence"].tolist(),
            "bin_accuracy": bins["accuracy"].tolist()}


def _progress(done: int, total: int, spec: EvalSet, metrics: dict[str, float],
              started: float) -> None:
    elapsed = time.perf_counter() - started
    eta = elapsed / done * (total - done)
    name = spec.corruption if spec.severity == 0 else f"{spec.corruption} s{spec.severity}"
    print(f"[raymoll] evaluate {done:3d}/{total}  {name:<22s} acc {metrics['accuracy']:7.2%}  "
          f"ece {metrics['ece']:.4f}  ({elapsed:.0f} s elapsed, ETA {eta:.0f} s)",
          file=sys.stderr, flush=True)


def evaluate(checkpoint: str | Path, data_dir: str | Path,
             corruptions_dir: str | Path | None = None, out: str | Path | None = None,
             severities: Sequence[int] = SEVERITIES, seed: int = 0, batch_size: int = 500,
             device: str | None = None, run: str | None = None, subset: int = 0) -> Path:
    """Score `checkpoint` on the test split of the prepared folder `data_dir`, clean and
    corrupted, and write the results table (raymoll.results) to `out`; returns its path.

    out defaults to <data_dir>/../results/<run>.parquet; run defaults to the checkpoint's
    run.name. subset > 0 scores only the first `subset` test images of every set (quick looks,
    the demo). Everything is checked before the model runs: a bad argument, data folder,
    checkpoint (class count, image size) or -C folder raises and leaves `out` untouched.
    """
    severities = list(severities)
    meta = read_meta(data_dir)
    model, state = load_model(checkpoint, "cpu", num_classes=meta["num_classes"])
    if list(state["meta"]["image_size"]) != list(meta["image_size"]):
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} was trained on "
                              f"{state['meta']['image_size']} px images but {str(data_dir)!r} "
                              f"holds {meta['image_size']} px images.")
    cfg = state["config"]
    run = run or cfg["run"]["name"]
    out = Path(out) if out else Path(data_dir).resolve().parent / "results" / f"{run}.parquet"
    device = _check_args(severities, device, out)
    official, official_names = _official_source(corruptions_dir, meta, severities, subset)

    # The sets fan out over a Ray cluster's GPUs unless the CPU was asked for; the driver
    # itself may sit on a CPU-only head node.
    gpus = 0.0 if device is not None and device.type == "cpu" else _ray_gpus()
    if not gpus:
        device = _local_device(device)

    images, labels = load_split(data_dir, "test", subset=subset)
    if (gpus or device.type == "cuda") and cfg["model"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    scorer_kwargs = {"model": model, "normalize": normalizer(meta), "images": images,
                     "labels": labels, "batch_size": batch_size, "bf16": cfg["optim"]["bf16"],
                     "seed": seed}
    sets = eval_sets(severities)
    if gpus:
        results = _on_ray(sets, scorer_kwargs, official, gpus)
    else:
        results = _in_process(sets, SetScorer(**scorer_kwargs, device=device), official)

    started, accs = time.perf_counter(), {}
    for done, (spec, acc) in enumerate(results, 1):
        accs[spec] = acc
        _progress(done, len(sets), spec, acc.compute(), started)

    common = {"run": run, "checkpoint": str(Path(checkpoint).resolve()),
              "dataset": meta["dataset"], "model": cfg["model"]["name"],
              "mollified": cfg["mollify"]["enabled"]}
    settings = {"checkpoint": common["checkpoint"], "data": str(Path(data_dir).resolve()),
                "seed": seed, "severities": severities, "subset": subset,
                "corruptions": str(Path(corruptions_dir).resolve()) if corruptions_dir
                else "generated", "official_corruptions": official_names,
                "epoch": state.get("epoch"), "mollify": cfg["mollify"], "config": cfg}
    return write_results([_row(spec, accs[spec], common) for spec in sets], settings, out)
