"""The per-worker training loop that Ray Train runs on every DDP rank.

One step, end to end:  FFCV batch on this rank's device, augmented per sample and normalised
inside the loader's pipeline -> MixUp/CutMix (optional) -> Mollifier (noise / blur + coupled
label smoothing) -> model (bf16 autocast on CUDA) -> soft-label cross-entropy -> SGD.
After every epoch the rank-sharded evaluation on the clean test set and on the 4 held-out
validation corruptions is all-reduced, and rank 0 reports the metrics with a checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from raymoll.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from raymoll.config import Config, from_dict, to_dict
from raymoll.corruptions import VALIDATION_CORRUPTIONS, corrupt
from raymoll.data import BatchAugment, batch_mix, load_split, make_loader, normalizer, read_meta
from raymoll.inference import autocast, score
from raymoll.metrics import MetricAccumulator
from raymoll.models import build_model
from raymoll.mollify import Mollifier

NAN_CHECK_EVERY = 50  # steps between host reads of the non-finite-loss flag (one sync each)
DRILL_GRACE_SECONDS = 5.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and the last good checkpoint stays."""


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fail_once(loss: torch.Tensor, kind: str, run_folder: str) -> torch.Tensor:
    """The fault-tolerance drill (run.fault_*), once per run folder: "exit" ends this process
    abruptly, as a lost node would; "nan" returns a NaN loss."""
    marker = os.path.join(run_folder, "fault_drill_done")
    if os.path.exists(marker):
        return loss
    open(marker, "w").close()
    if kind == "nan":
        return loss * float("nan")
    # Ray Train's controller collects reports by polling every 2 s: let it take the last one, so
    # the drill is a node lost mid-epoch, not one lost together with its newest checkpoint.
    time.sleep(DRILL_GRACE_SECONDS)
    print("[raymoll] fault drill: worker exits now", flush=True)
    os._exit(1)


def validation_sets(cfg: Config, data_dir: str, rank: int, world: int) -> dict:
    """This rank's share of the fixed validation subset: clean and the 4 validation corruptions
    at `eval.val_severity`, made once with a fixed seed (identical on every rank)."""
    images, labels = load_split(data_dir, "test", subset=cfg.eval.val_subset)
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    sets = {name: corrupt(images, name, cfg.eval.val_severity, generator=generator)
            for name in VALIDATION_CORRUPTIONS}
    return {name: (x[rank::world], labels[rank::world]) for name, x in sets.items()}


def evaluate_epoch(model, test_loader, val_sets, normalize, cfg: Config) -> dict[str, float]:
    """Clean test metrics and mean validation-corruption metrics, all-reduced over ranks."""
    clean = MetricAccumulator()
    for images, labels in test_loader:
        score(model, images, labels, normalize, cfg.data.eval_batch_size, cfg.optim.bf16, clean)
    metrics = {f"clean_{k}": v for k, v in clean.all_reduce_().compute().items()}
    per_corruption = [score(model, x, y, normalize, cfg.data.eval_batch_size,
                            cfg.optim.bf16).all_reduce_().compute() for x, y in val_sets.values()]
    for key in ("accuracy", "nll", "ece"):
        metrics[f"val_{key}"] = sum(m[key] for m in per_corruption) / len(per_corruption)
    for name, m in zip(val_sets, per_corruption):
        metrics[f"val_{name}_accuracy"] = m["accuracy"]
    metrics["val_score"] = sum(w * metrics[k] for k, w in cfg.tune.objective.items())
    return metrics


@dataclass
class Trainee:
    """What one rank trains and checkpoints."""
    model: nn.Module            # what the step calls: DDP-wrapped and/or compiled
    bare_model: nn.Module       # the plain module: its state dict is the checkpoint's
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mollifier: Mollifier
    generator: torch.Generator  # this rank's mollification randomness


def build_trainee(cfg: Config, meta: dict, device: torch.device, rank: int,
                  steps_per_epoch: int, in_ray_train: bool = True) -> Trainee:
    """Model (on `device`; DDP-wrapped by Ray Train when distributed), SGD, the per-step LR
    schedule, the mollifier and this rank's generator, all seeded from run.seed.
    in_ray_train=False builds the same outside a Ray Train worker (benchmarks)."""
    num_classes, image_size = meta["num_classes"], meta["image_size"][0]  # square: read_meta checks
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, num_classes, width=cfg.model.width)
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # prepare_model moves to the device and wraps in DDP when world > 1
    model = ray.train.torch.prepare_model(model) if in_ray_train else model.to(device)
    bare_model = model.module if hasattr(model, "module") else model
    if cfg.optim.compile:
        model = torch.compile(model)  # the mollifier stays eager: its generator breaks graphs
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    total = cfg.optim.epochs * steps_per_epoch
    warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup))
    mollifier = Mollifier(cfg.mollify, image_size=image_size, num_classes=num_classes).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 1000 + rank)
    return Trainee(model, bare_model, optimizer, scheduler, mollifier, generator)


def restore(trainee: Trainee, state: dict, rank: int) -> int:
    """Load a checkpoint's state into `trainee`; returns the number of epochs it completed."""
    trainee.bare_model.load_state_dict(state["model"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    streams = state["rng"]["mollify"]
    trainee.generator.set_state(streams[rank % len(streams)])
    return state["epoch"]


def newest_checkpoint(storage) -> tuple[ray.train.Checkpoint, dict] | None:
    """The newest complete checkpoint in this run's folder (Ray's `StorageContext`), and its
    state; None in a new run. Complete = its checkpoint.pt loads; a folder cut short by a kill
    is skipped.

    Ray restores only the checkpoints its controller registered, and it registers an uploaded
    checkpoint up to a poll interval later: a driver killed in between leaves the newest
    checkpoint in storage but not in Ray's list. Reading the folder itself
    resumes from that one instead of redoing its epoch.
    """
    fs = storage.storage_filesystem
    entries = fs.get_file_info(pyarrow.fs.FileSelector(storage.experiment_fs_path,
                                                       allow_not_found=True))
    folders = sorted((e.path for e in entries if e.type == pyarrow.fs.FileType.Directory
                      and e.base_name.startswith("checkpoint_")), reverse=True)
    for path in folders:  # Ray names them checkpoint_<time>: newest first
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
        with checkpoint.as_directory() as folder:
            try:
                return checkpoint, load_checkpoint(folder)
            except CheckpointError:
                continue
    return None


def adopt(checkpoint: ray.train.Checkpoint, metrics: dict, rank: int) -> None:
    """Register with Ray a complete checkpoint its controller never saw (see newest_checkpoint):
    rank 0 reports a copy with its metrics, then removes the unregistered original, so the
    folder holds each epoch once and Ray's num_to_keep and best-checkpoint bookkeeping see it."""
    with checkpoint.as_directory() if rank == 0 else contextlib.nullcontext() as folder:
        copy = ray.train.Checkpoint.from_directory(folder) if rank == 0 else None
        ray.train.report(metrics, checkpoint=copy)  # a barrier: every rank has read the folder
    if rank == 0:
        checkpoint.filesystem.delete_dir(checkpoint.path)


def train_step(t: Trainee, x: torch.Tensor, y: torch.Tensor, mix=None, bf16: bool = True,
               drill=None) -> torch.Tensor:
    """One SGD step on a batch (x float (N,C,H,W) normalised, y int64 (N,)); returns the loss
    (a device scalar: reading it would sync). `drill` may replace the loss (run.fault_*)."""
    if mix is not None:
        x, y = mix(x, y)
    x, y = t.mollifier(x, y, generator=t.generator)
    with autocast(x.device, bf16):
        logits = t.model(x)
    loss = F.cross_entropy(logits.float(), y)
    if drill is not None:
        loss = drill(loss)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.optimizer.step()
    t.scheduler.step()
    return loss


def train_one_epoch(t: Trainee, loader, mix, epoch: int, cfg: Config,
                    fail_at_step: int | None, run_folder: str) -> float:
    """One pass over this rank's shard; returns the mean training loss. Raises
    NonFiniteLossError (naming epoch and step) within NAN_CHECK_EVERY steps of a NaN/inf."""
    t.model.train()
    device = t.generator.device
    loss_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, device=device)
    for step, (x, y) in enumerate(loader):
        drill = (partial(fail_once, kind=cfg.run.fault_kind, run_folder=run_folder)
                 if step + 1 == fail_at_step else None)
        loss = train_step(t, x, y, mix, cfg.optim.bf16, drill)
        # Track the loss on the device; read it back only every NAN_CHECK_EVERY steps.
        loss_sum += loss.detach()
        bad = ~torch.isfinite(loss.detach()) & (first_bad_step < 0)
        first_bad_step = torch.where(bad, step, first_bad_step)
        if ((step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == len(loader)) \
                and first_bad_step.item() >= 0:
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {epoch + 1}, step {first_bad_step.item() + 1} "
                f"(lr {cfg.optim.lr}, model {cfg.model.name}, mollify {to_dict(cfg.mollify)}); "
                f"the last good checkpoint is kept. Lower optim.lr or check the data.")
    return loss_sum.item() / len(loader)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is the resolved Config as a dict."""
    cfg = from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    meta = read_meta(cfg.data.path)

    train_loader = make_loader(cfg.data.path, "train", cfg.data.batch_size, device, train=True,
                               num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                               subset=cfg.data.train_subset, os_cache=cfg.data.os_cache,
                               augment=BatchAugment(cfg.data.augment))
    n_test = cfg.data.test_subset or meta["counts"]["test"]
    test_loader = make_loader(cfg.data.path, "test", cfg.data.eval_batch_size, device,
                              train=False, num_workers=cfg.data.num_workers, normalize=False,
                              distributed=False, indices=range(rank, n_test, world),
                              os_cache=cfg.data.os_cache)
    normalize = normalizer(meta).to(device)
    val_sets = validation_sets(cfg, cfg.data.path, rank, world)
    mix = batch_mix(meta["num_classes"], cfg.data.mixup_alpha, cfg.data.cutmix_alpha)  # or None
    trainee = build_trainee(cfg, meta, device, rank, len(train_loader))

    start_epoch = 0
    found = newest_checkpoint(ctx.get_storage())
    if found:  # resume: after a failure, a killed driver, or by Tune
        checkpoint, state = found
        start_epoch = restore(trainee, state, rank)
        if rank == 0:
            print(f"[raymoll] resumed from the checkpoint after epoch {start_epoch}", flush=True)
        registered = ray.train.get_checkpoint()
        if registered is None or registered.path != checkpoint.path:
            adopt(checkpoint, state["metrics"], rank)

    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        train_loader.next_epoch = epoch  # the shuffle order depends on (seed, epoch): resumable
        drill = rank == 0 and cfg.run.fault_epoch == epoch + 1
        loss = train_one_epoch(trainee, train_loader, mix, epoch, cfg,
                               cfg.run.fault_step if drill else None,
                               ctx.get_storage().experiment_fs_path)
        # DDP broadcasts BatchNorm running stats from rank 0 only at the start of each forward,
        # so each rank ends the epoch with its own; evaluate everywhere with rank 0's, which
        # are the ones the checkpoint keeps.
        if world > 1:
            for buffer in trainee.bare_model.buffers():
                dist.broadcast(buffer, src=0)
        metrics = {"epoch": epoch + 1, "train_loss": loss,
                   "lr": trainee.scheduler.get_last_lr()[0]}
        metrics |= evaluate_epoch(trainee.bare_model, test_loader, val_sets, normalize, cfg)
        metrics["epoch_seconds"] = time.perf_counter() - started
        report(metrics, trainee, cfg, meta, rank, world)


def report(metrics: dict, trainee: Trainee, cfg: Config, meta: dict, rank: int,
           world: int) -> None:
    """Every rank calls ray.train.report (it is a barrier); rank 0 attaches the checkpoint."""
    if rank == 0:
        print(f"[raymoll] epoch {metrics['epoch']}/{cfg.optim.epochs}  "
              f"loss {metrics['train_loss']:.4f}  clean acc {metrics['clean_accuracy']:.2%}  "
              f"ece {metrics['clean_ece']:.4f}  val acc {metrics['val_accuracy']:.2%}  "
              f"val ece {metrics['val_ece']:.4f}  ({metrics['epoch_seconds']:.1f} s)", flush=True)
    # Every rank's mollifier generator state, so a resumed run continues each stream.
    streams = [trainee.generator.get_state()]
    if world > 1:
        streams = [None] * world
        dist.all_gather_object(streams, trainee.generator.get_state())
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(folder, {
                "model": trainee.bare_model.state_dict(),
                "optimizer": trainee.optimizer.state_dict(),
                "scheduler": trainee.scheduler.state_dict(), "epoch": metrics["epoch"],
                "config": to_dict(cfg), "meta": meta, "metrics": metrics,
                "rng": {"torch": torch.get_rng_state(), "mollify": streams}})
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
