"""The per-worker training loop that Ray Train runs on every DDP rank.

One step, end to end:  FFCV batch on this rank's device, augmented per sample and normalised
inside the loader's pipeline -> MixUp/CutMix (optional) -> Mollifier (noise / blur + coupled
label smoothing) -> model (bf16 autocast on CUDA) -> soft-label cross-entropy -> SGD.  After every epoch the rank-sharded evaluation on the clean test
set and on the 4 held-out validation corruptions is all-reduced, and rank 0 reports the metrics
with a checkpoint.
"""
from __future__ import annotations

import math
import os
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from raymoll.checkpoint import load_checkpoint, save_checkpoint
from raymoll.config import Config, from_dict, to_dict
from raymoll.corruptions import VALIDATION_CORRUPTIONS, corrupt
from raymoll.data import BatchAugment, batch_mix, load_split, make_loader, normalizer, read_meta
from raymoll.inference import autocast, score
from raymoll.metrics import MetricAccumulator
from raymoll.models import build_model
from raymoll.mollify import Mollifier

NAN_CHECK_EVERY = 50  # steps between host reads of the non-finite-loss flag (one sync each)


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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is the resolved Config as a dict."""
    cfg = from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    meta = read_meta(cfg.data.path)
    num_classes, image_size = meta["num_classes"], meta["image_size"][0]  # square: read_meta checks

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
    mix = batch_mix(num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha)  # None when off
    mollifier = Mollifier(cfg.mollify, image_size=image_size, num_classes=num_classes).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed * 1000 + rank)
    model = build_model(cfg.model.name, num_classes, width=cfg.model.width)
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)  # moves to device, wraps in DDP when world > 1
    bare_model = model.module if hasattr(model, "module") else model
    if cfg.optim.compile:
        model = torch.compile(model)  # the mollifier stays eager: its generator breaks graphs

    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.optim.epochs * steps_per_epoch, round(cfg.optim.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total, warmup))

    fault_at = (cfg.run.fault_epoch, cfg.run.fault_step) if rank == 0 else None
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: the worker group was (re)started after a failure or by Tune
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
        bare_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["mollify"][rank % len(state["rng"]["mollify"])])
        start_epoch = state["epoch"]
        if rank == 0:
            print(f"[raymoll] resumed from the checkpoint after epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        train_loader.next_epoch = epoch  # the shuffle order depends on (seed, epoch): resumable
        model.train()
        loss_sum = torch.zeros((), device=device)
        first_bad_step = torch.full((), -1, device=device)
        for step, (x, y) in enumerate(train_loader):
            if mix is not None:
                x, y = mix(x, y)
            x, y = mollifier(x, y, generator=generator)
            with autocast(device, cfg.optim.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if fault_at == (epoch + 1, step + 1):
                loss = fail_once(loss, cfg.run.fault_kind, ctx.get_storage().experiment_fs_path)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            # Track the loss on the device; read it only every NAN_CHECK_EVERY steps.
            loss_sum += loss.detach()
            bad = ~torch.isfinite(loss.detach()) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, step, first_bad_step)
            if (step + 1) % NAN_CHECK_EVERY == 0 or step + 1 == steps_per_epoch:
                if first_bad_step.item() >= 0:
                    raise NonFiniteLossError(
                        f"loss became non-finite at epoch {epoch + 1}, step "
                        f"{first_bad_step.item() + 1} (lr {cfg.optim.lr}, model "
                        f"{cfg.model.name}, mollify {to_dict(cfg.mollify)}); the last good "
                        f"checkpoint is kept. Lower optim.lr or check the data.")

        # DDP broadcasts BatchNorm running stats from rank 0 only at the start of each forward,
        # so each rank ends the epoch with its own; evaluate everywhere with rank 0's, which
        # are the ones the checkpoint keeps.
        if world > 1:
            for buffer in bare_model.buffers():
                dist.broadcast(buffer, src=0)
        metrics = {"epoch": epoch + 1, "train_loss": loss_sum.item() / steps_per_epoch,
                   "lr": scheduler.get_last_lr()[0]}
        metrics |= evaluate_epoch(bare_model, test_loader, val_sets, normalize, cfg)
        metrics["epoch_seconds"] = time.perf_counter() - started
        report(metrics, bare_model, optimizer, scheduler, generator, cfg, meta, rank, world)


def report(metrics, model, optimizer, scheduler, generator, cfg, meta, rank, world) -> None:
    """Every rank calls ray.train.report (it is a barrier); rank 0 attaches the checkpoint."""
    if rank == 0:
        print(f"[raymoll] epoch {metrics['epoch']}/{cfg.optim.epochs}  "
              f"loss {metrics['train_loss']:.4f}  clean acc {metrics['clean_accuracy']:.2%}  "
              f"ece {metrics['clean_ece']:.4f}  val acc {metrics['val_accuracy']:.2%}  "
              f"val ece {metrics['val_ece']:.4f}  ({metrics['epoch_seconds']:.1f} s)", flush=True)
    # Every rank's mollifier generator state, so a resumed run continues each stream.
    states = [generator.get_state()]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, states[0])
        states = gathered
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            save_checkpoint(folder, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": metrics["epoch"],
                "config": to_dict(cfg), "meta": meta, "metrics": metrics,
                "rng": {"torch": torch.get_rng_state(), "mollify": states}})
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
