"""The per-worker training loop that Ray Train runs on every DDP rank.

One step, end to end:  FFCV batch on this rank's device, augmented per sample (data.augment, in
order) and normalised inside the loader's pipeline -> MixUp/CutMix (optional) -> plain label
smoothing (optim.label_smoothing) -> Mollifier (noise / blur + coupled label smoothing) ->
model (bf16 autocast on CUDA) -> soft-label cross-entropy -> SGD.
After every epoch the rank-sharded evaluation on the validation split (val.beton, carved from
the training data by `raymoll prepare`), clean (clean_*) and under the 4 validation corruptions
(val_*), is all-reduced, and rank 0 reports the metrics with a checkpoint. The test split is
never opened here: it is for `raymoll evaluate` alone.

Exact resume: every random stream of a rank (STREAMS: augmentation, MixUp/CutMix,
mollification) is reseeded at the start of every epoch from (run.seed, rank, epoch, stream),
and FFCV's data order is a function of (run.seed, epoch); so the epoch a checkpoint records
restores every stream exactly, and a run resumed after a failure repeats the uninterrupted
run's draws bit for bit.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
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
from raymoll.data import (BatchAugment, BatchMix, batch_mix, load_split, make_loader,
                          normalizer, read_meta)
from raymoll.inference import autocast, score
from raymoll.models import build_model
from raymoll.mollify import Mollifier
from raymoll.tracking import Tracker
from raymoll.train.ema import WeightEMA

NAN_CHECK_EVERY = 50  # steps between host reads of the non-finite-loss flag (one sync each)
STREAMS = ("augment", "mix", "mollify")  # a rank's random streams, reseeded every epoch
FAULT_DRILL_ENV = "RAYMOLL_FAULT_DRILL"  # "epoch:step:kind", see FaultDrill
DRILL_GRACE_SECONDS = 5.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stops and the last good checkpoint stays."""


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def stream_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """The 63-bit seed of one random stream (one of STREAMS) of `rank` in `epoch` (0-based)."""
    state = np.random.SeedSequence([seed, rank, epoch, STREAMS.index(stream)]).generate_state(
        1, np.uint64)
    return int(state[0] >> np.uint64(1))


def make_streams(device: torch.device) -> dict[str, torch.Generator]:
    """One generator per stream: MixUp/CutMix draws a few scalars per batch on the CPU (no
    device sync), augmentation and mollification draw on `device`."""
    return {name: torch.Generator(device="cpu" if name == "mix" else device)
            for name in STREAMS}


@dataclass
class FaultDrill:
    """The fault-tolerance drill, read from the environment (RAYMOLL_FAULT_DRILL =
    "epoch:step:kind", 1-based epoch and step), never part of a Config: rank 0 fails once per
    run folder at that step. kind "exit" ends the process abruptly before the step, as a lost
    node would; "nan" feeds the step a NaN batch (a NaN loss). The driver forwards the variable
    to the workers (train.trainer.build_trainer)."""
    epoch: int
    step: int
    kind: str

    @classmethod
    def from_env(cls) -> "FaultDrill | None":
        text = os.environ.get(FAULT_DRILL_ENV)
        if not text:
            return None
        try:
            epoch, step, kind = text.split(":")
            drill = cls(int(epoch), int(step), kind)
        except ValueError:
            drill = None
        if drill is None or drill.kind not in ("exit", "nan") or min(drill.epoch, drill.step) < 1:
            raise ValueError(f"{FAULT_DRILL_ENV}={text!r} must look like epoch:step:kind with "
                             f"epoch, step >= 1 and kind exit or nan, e.g. 2:25:exit.")
        return drill

    def wrap(self, loader, epoch: int, storage):
        """`loader` for `epoch` (0-based), failing at the drill's step when it is due: once per
        run folder, marked by a `fault_drill_done` file written through the run's storage
        (Ray's StorageContext: a local folder or a URI such as s3://)."""
        fs = storage.storage_filesystem
        marker = f"{storage.experiment_fs_path}/fault_drill_done"
        if epoch + 1 != self.epoch \
                or fs.get_file_info(marker).type != pyarrow.fs.FileType.NotFound:
            return loader
        return _FailingLoader(loader, self, fs, marker)


class _FailingLoader:
    def __init__(self, loader, drill: FaultDrill, fs: pyarrow.fs.FileSystem, marker: str):
        self.loader, self.drill, self.fs, self.marker = loader, drill, fs, marker

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for step, (x, y) in enumerate(self.loader):
            if step + 1 == self.drill.step:
                with self.fs.open_output_stream(self.marker):
                    pass
                if self.drill.kind == "nan":
                    x = x * float("nan")
                else:
                    # Ray Train's controller collects reports by polling every 2 s: let it take
                    # the last one, so the drill is a node lost mid-epoch, not one lost together
                    # with its newest checkpoint.
                    time.sleep(DRILL_GRACE_SECONDS)
                    print("[raymoll] fault drill: worker exits now", flush=True)
                    os._exit(1)
            yield x, y


def validation_sets(cfg: Config, data_dir: str, rank: int, world: int) -> dict:
    """This rank's share of the validation split (its first eval.val_subset images; never the
    test split): the clean images under "clean", and the 4 validation corruptions at
    `eval.val_severity`, made once with a fixed seed (identical on every rank)."""
    images, labels = load_split(data_dir, "val", subset=cfg.eval.val_subset)
    generator = torch.Generator().manual_seed(cfg.eval.seed)
    sets = {"clean": images} | {name: corrupt(images, name, cfg.eval.val_severity,
                                              generator=generator)
                                for name in VALIDATION_CORRUPTIONS}
    return {name: (x[rank::world], labels[rank::world]) for name, x in sets.items()}


def evaluate_epoch(model, val_sets, normalize, cfg: Config) -> dict[str, float]:
    """Metrics on the validation split, all-reduced over ranks: clean_* on its clean images,
    val_* the mean over the 4 validation corruptions, val_score the selection score."""
    scored = {name: score(model, x, y, normalize, cfg.data.eval_batch_size,
                          cfg.optim.bf16).all_reduce_().compute()
              for name, (x, y) in val_sets.items()}
    metrics = {f"clean_{k}": v for k, v in scored.pop("clean").items()}
    per_corruption = list(scored.values())
    for key in ("accuracy", "nll", "ece"):
        metrics[f"val_{key}"] = sum(m[key] for m in per_corruption) / len(per_corruption)
    for name, m in scored.items():
        metrics[f"val_{name}_accuracy"] = m["accuracy"]
    metrics["val_score"] = sum(w * metrics[k] for k, w in cfg.tune.objective.items())
    return metrics


@dataclass
class Trainee:
    """What one rank trains and checkpoints, and the random streams it draws from."""
    model: nn.Module            # what the step calls: DDP-wrapped and/or compiled
    bare_model: nn.Module       # the plain module: its state dict is the checkpoint's
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    mollifier: Mollifier
    mix: BatchMix | None        # MixUp/CutMix, or None
    label_smoothing: float      # optim.label_smoothing
    streams: dict[str, torch.Generator]  # STREAMS -> generator (the loader's augment uses one)
    ema: WeightEMA | None = None  # EMA of bare_model (optim.ema_decay > 0), or None

    def reseed(self, seed: int, rank: int, epoch: int) -> None:
        """Reseed every stream for `epoch` (0-based): the scheme that makes resume exact."""
        for name, generator in self.streams.items():
            generator.manual_seed(stream_seed(seed, rank, epoch, name))


def build_trainee(cfg: Config, meta: dict, device: torch.device, rank: int,
                  steps_per_epoch: int, in_ray_train: bool = True,
                  streams: dict[str, torch.Generator] | None = None) -> Trainee:
    """Model (on `device`; DDP-wrapped by Ray Train when distributed), SGD, the per-step LR
    schedule, MixUp/CutMix and the mollifier, seeded from run.seed; `streams` (make_streams;
    new ones when None) are this rank's generators, seeded for epoch 0.
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
    streams = streams if streams is not None else make_streams(device)
    mix = batch_mix(num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha, streams["mix"])
    ema = WeightEMA(bare_model, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    trainee = Trainee(model, bare_model, optimizer, scheduler, mollifier, mix,
                      cfg.optim.label_smoothing, streams, ema)
    trainee.reseed(cfg.run.seed, rank, 0)
    return trainee


def restore(trainee: Trainee, state: dict) -> int:
    """Load a checkpoint's state into `trainee`; returns the number of epochs it completed (the
    random streams follow from it: Trainee.reseed at the start of the next epoch)."""
    trainee.bare_model.load_state_dict(state["model"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    trainee.scheduler.load_state_dict(state["scheduler"])
    if trainee.ema is not None and "ema" in state:  # else the EMA starts from these weights
        trainee.ema.load_state_dict(state["ema"])
    return state["epoch"]


def smooth_labels(y: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Plain label smoothing: (1 - eps) y + eps / K, y int64 (N,) (as one-hot) or soft (N,K);
    returns float32 (N,K). eps = 0 returns y unchanged."""
    if eps == 0:
        return y
    y = F.one_hot(y, num_classes).float() if y.ndim == 1 else y.float()
    return (1 - eps) * y + eps / num_classes


def training_batch(t: Trainee, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and soft targets float32 (N,K) of one step: MixUp/CutMix, then plain label
    smoothing eps, then the mollifier's smoothing gamma (per sample). Both smoothings are
    affine maps towards the uniform 1/K and commute, so a target ends as
    (1 - eps)(1 - gamma) y + (1 - (1 - eps)(1 - gamma)) / K."""
    if t.mix is not None:
        x, y = t.mix(x, y)
    y = smooth_labels(y, t.mollifier.num_classes, t.label_smoothing)
    return t.mollifier(x, y, generator=t.streams["mollify"])


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


def train_step(t: Trainee, x: torch.Tensor, y: torch.Tensor, bf16: bool = True) -> torch.Tensor:
    """One SGD step on a batch (x float (N,C,H,W) normalised, y int64 (N,)); returns the loss
    (a device scalar: reading it would sync)."""
    x, y = training_batch(t, x, y)
    with autocast(x.device, bf16):
        logits = t.model(x)
    loss = F.cross_entropy(logits.float(), y)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.optimizer.step()
    t.scheduler.step()
    if t.ema is not None:
        t.ema.update(t.bare_model)
    return loss


def train_one_epoch(t: Trainee, loader, epoch: int, cfg: Config) -> float:
    """One pass over this rank's shard; returns the mean training loss. Raises
    NonFiniteLossError (naming epoch and step) within NAN_CHECK_EVERY steps of a NaN/inf."""
    t.model.train()
    device = t.streams["mollify"].device
    loss_sum = torch.zeros((), device=device)
    first_bad_step = torch.full((), -1, device=device)
    for step, (x, y) in enumerate(loader):
        loss = train_step(t, x, y, cfg.optim.bf16)
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
    drill = FaultDrill.from_env() if rank == 0 else None

    streams = make_streams(device)
    train_loader = make_loader(cfg.data.path, "train", cfg.data.batch_size, device, train=True,
                               num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                               subset=cfg.data.train_subset, os_cache=cfg.data.os_cache,
                               augment=BatchAugment(cfg.data.augment, streams["augment"]))
    normalize = normalizer(meta).to(device)
    val_sets = validation_sets(cfg, cfg.data.path, rank, world)
    trainee = build_trainee(cfg, meta, device, rank, len(train_loader), streams=streams)

    start_epoch = 0
    found = newest_checkpoint(ctx.get_storage())
    if found:  # resume: after a failure, a killed driver, or by Tune
        checkpoint, state = found
        start_epoch = restore(trainee, state)
        if rank == 0:
            print(f"[raymoll] resumed from the checkpoint after epoch {start_epoch}", flush=True)
        registered = ray.train.get_checkpoint()
        if registered is None or registered.path != checkpoint.path:
            adopt(checkpoint, state["metrics"], rank)

    tracker = Tracker(config, cfg.run.name, ctx.get_storage().experiment_fs_path) \
        if rank == 0 and cfg.run.tracker != "none" else None
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        trainee.reseed(cfg.run.seed, rank, epoch)  # before the loader's pipeline thread starts
        train_loader.next_epoch = epoch  # the shuffle order depends on (seed, epoch): resumable
        loader = train_loader if drill is None else drill.wrap(train_loader, epoch,
                                                               ctx.get_storage())
        loss = train_one_epoch(trainee, loader, epoch, cfg)
        # DDP broadcasts BatchNorm running stats from rank 0 only at the start of each forward,
        # so each rank ends the epoch with its own; evaluate everywhere with rank 0's, which
        # are the ones the checkpoint keeps.
        models = {"": trainee.bare_model} | ({"ema_": trainee.ema.module} if trainee.ema else {})
        if world > 1:
            for model in models.values():
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
        metrics = {"epoch": epoch + 1, "train_loss": loss,
                   "lr": trainee.scheduler.get_last_lr()[0]}
        for prefix, model in models.items():  # raw, and ema_* beside it
            metrics |= {prefix + k: v for k, v in
                        evaluate_epoch(model, val_sets, normalize, cfg).items()}
        metrics["epoch_seconds"] = time.perf_counter() - started
        if tracker is not None:
            tracker.log(metrics, step=epoch + 1)
        report(metrics, trainee, cfg, meta, rank)
    if tracker is not None:
        tracker.close()


def checkpoint_state(metrics: dict, trainee: Trainee, cfg: Config, meta: dict) -> dict:
    """The checkpoint of an epoch (format: raymoll.checkpoint). With EMA, `selected` is "ema"
    when the EMA weights' val_score of this epoch is at least the raw weights', else "raw"."""
    state = {"model": trainee.bare_model.state_dict(),
             "optimizer": trainee.optimizer.state_dict(),
             "scheduler": trainee.scheduler.state_dict(), "epoch": metrics["epoch"],
             "config": to_dict(cfg), "meta": meta, "metrics": metrics}
    if trainee.ema is not None:
        state["ema"] = trainee.ema.state_dict()
        state["selected"] = "ema" if metrics["ema_val_score"] >= metrics["val_score"] else "raw"
    return state


def report(metrics: dict, trainee: Trainee, cfg: Config, meta: dict, rank: int) -> None:
    """Every rank calls ray.train.report (it is a barrier); rank 0 attaches the checkpoint."""
    if rank == 0:
        print(f"[raymoll] epoch {metrics['epoch']}/{cfg.optim.epochs}  "
              f"loss {metrics['train_loss']:.4f}  val clean acc {metrics['clean_accuracy']:.2%}  "
              f"ece {metrics['clean_ece']:.4f}  val corrupted acc {metrics['val_accuracy']:.2%}  "
              f"ece {metrics['val_ece']:.4f}  ({metrics['epoch_seconds']:.1f} s)", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(folder, checkpoint_state(metrics, trainee, cfg, meta))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
