"""The FFCV Loader for one DDP rank, the normalisation, and whole-split reads for evaluation."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .beton import keep_torch_threads
from .prepare import SPLITS, read_meta
from .sources import DataError

with keep_torch_threads():
    from ffcv.fields.decoders import (CenterCropRGBImageDecoder, IntDecoder,
                                      RandomResizedCropRGBImageDecoder, SimpleRGBImageDecoder)
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ModuleWrapper, Squeeze, ToDevice, ToTensor, ToTorchImage

EVAL_CROP_RATIO = 224 / 256  # centre-crop share of variable-size (ImageNet-style) test images


class Normalize(nn.Module):
    """uint8 (N,3,H,W) -> float32 (x - mean) / std, with mean and std in [0, 255] units."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def normalizer(meta: dict) -> Normalize:
    """The dataset's normalisation (train-split channel statistics from meta.json)."""
    return Normalize(meta["mean"], meta["std"])


class _OnDevice(nn.Module):
    """Augmentation and normalisation run as the last stage of FFCV's pipeline thread.

    On CUDA that thread works on a side stream; its fresh output tensors are marked as used by
    the consumer's stream, so the caching allocator cannot recycle their memory for the next
    batch while the training step still reads them.
    """

    def __init__(self, body: nn.Module, device: torch.device):
        super().__init__()
        self.body = body
        self.consumer = torch.cuda.current_stream(device) if device.type == "cuda" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.consumer is not None:
            out.record_stream(self.consumer)
        return out


def _image_decoder(meta: dict, train: bool):
    if not meta["variable_size"]:
        return SimpleRGBImageDecoder()
    size = tuple(meta["image_size"])
    if train:
        return RandomResizedCropRGBImageDecoder(size)
    return CenterCropRGBImageDecoder(size, ratio=EVAL_CROP_RATIO)


def make_loader(data_dir: str | Path, split: str, batch_size: int, device: str | torch.device,
                *, train: bool, distributed: bool | None = None, num_workers: int = 2,
                seed: int = 0, subset: int = 0, indices: Sequence[int] | None = None,
                normalize: bool = True,
                augment: nn.Module | None = None, os_cache: bool = True,
                drop_last: bool | None = None) -> Loader:
    """An FFCV Loader over data_dir/{split}.beton yielding (images, labels) on `device`.

    images: float32 (N,3,H,W) normalised, or uint8 when normalize=False (then a view into
    FFCV's reused buffers unless `augment` is given: clone what you keep); channels_last
    strides. labels: int64 (N,). `augment` (e.g. BatchAugment) runs on the device before the
    normalisation. train=True: seeded random order, drop_last; else sequential, nothing
    dropped. distributed (default: whether torch.distributed is initialised) gives this rank
    a disjoint shard. subset > 0 keeps the first `subset` samples; `indices` keeps exactly
    those samples (e.g. range(rank, n, world) for an evaluation shard without the padding that
    distributed=True adds).
    """
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}.")
    meta = read_meta(data_dir)
    device = torch.device(device)
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    stages = [m for m in (augment, normalizer(meta) if normalize else None) if m is not None]
    image = [_image_decoder(meta, train), ToTensor(), ToDevice(device, non_blocking=True),
             ToTorchImage()]
    if stages:
        image.append(ModuleWrapper(_OnDevice(nn.Sequential(*stages).to(device), device)))
    label = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
    count = meta["counts"][split]
    if indices is None and subset:
        indices = range(min(subset, count))
    indices = None if indices is None else np.asarray(indices, dtype=np.int64)
    with keep_torch_threads():
        return Loader(str(Path(data_dir) / f"{split}.beton"), batch_size=batch_size,
                      num_workers=num_workers, os_cache=os_cache,
                      order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
                      distributed=distributed, seed=seed, indices=indices,
                      pipelines={"image": image, "label": label},
                      drop_last=train if drop_last is None else drop_last)


def load_split(data_dir: str | Path, split: str, subset: int = 0,
               batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in memory on the CPU: uint8 (N,3,H,W) contiguous images, int64 (N,)
    labels, in file order (for evaluation, which corrupts the raw images)."""
    loader = make_loader(data_dir, split, batch_size, "cpu", train=False, distributed=False,
                         subset=subset, normalize=False)
    images, labels = [], []
    for x, y in loader:  # batches are views into reused buffers: copy them out
        images.append(x.clone(memory_format=torch.contiguous_format))
        labels.append(y.clone())
    return torch.cat(images), torch.cat(labels)
