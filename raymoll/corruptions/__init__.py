"""The 15 + 4 common corruptions (Hendrycks & Dietterich, 2019) on batched tensors.

    corrupt(images, name, severity, generator=None, preset=None) -> images

images are uint8 (N, 3, H, W) on any device; every corruption runs batched in float32 on that
device and the result is clipped and rounded back to uint8 (the reference truncates; rounding
keeps untouched pixels exact). Parameters come from the reference generator's table for the
image size (presets.py); each family module's docstring lists where it deviates from the
reference. Random corruptions draw from `generator`, which must live on the images' device
(torch draws there directly; a CPU generator for CUDA images is an error). The same generator
state gives the same output; None uses torch's global generator for that device.
"""
import numbers
from collections.abc import Callable

import torch

from . import blur, digital, noise, spatter, weather
from .kernels import jpeg_roundtrip
from .presets import PRESETS, STORAGE_JPEG_QUALITY, preset_for_size

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
VALIDATION_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

FAMILIES: dict[str, str] = {
    **dict.fromkeys(CORRUPTIONS[0:3], "noise"),
    **dict.fromkeys(CORRUPTIONS[3:7], "blur"),
    **dict.fromkeys(CORRUPTIONS[7:11], "weather"),
    **dict.fromkeys(CORRUPTIONS[11:15], "digital"),
    **dict.fromkeys(VALIDATION_CORRUPTIONS, "validation"),
}

Corruption = Callable[[torch.Tensor, object, torch.Generator | None], torch.Tensor]
_FUNCTIONS: dict[str, Corruption] = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "speckle_noise": noise.speckle_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "gaussian_blur": blur.gaussian_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": weather.brightness,
    "spatter": spatter.spatter,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    "saturate": digital.saturate,
}

__all__ = ["CORRUPTIONS", "VALIDATION_CORRUPTIONS", "FAMILIES", "PRESETS", "corrupt"]


def _check(images: torch.Tensor, name: str, severity: int, generator: torch.Generator | None,
           preset: str | None) -> None:
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; the test corruptions are {', '.join(CORRUPTIONS)} "
                         f"and the validation ones {', '.join(VALIDATION_CORRUPTIONS)}.")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Integral) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}.")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)} or None to pick by image size.")
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
            and images.shape[1] == 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = images.dtype if isinstance(images, torch.Tensor) else None
        raise ValueError(f"images must be a uint8 tensor (N, 3, H, W), got {shape} of dtype {dtype}.")
    if generator is not None and generator.device.type != images.device.type:
        raise ValueError(f"the generator is on {generator.device} but the images are on {images.device}; "
                         f"create it with torch.Generator(device=images.device).")


def corrupt(images: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None,
            preset: str | None = None) -> torch.Tensor:
    """Apply corruption `name` at `severity` (1..5) to uint8 images (N, 3, H, W).

    preset picks the parameter table: "cifar", "tinyimagenet" or "imagenet"; None picks by the
    shorter image side (below 48 px "cifar", below 96 px "tinyimagenet", else "imagenet").
    "tinyimagenet" also stores the result as JPEG quality 85, as Tiny-ImageNet-C did.
    Returns uint8 images of the same shape on the same device.
    """
    _check(images, name, severity, generator, preset)
    preset = preset or preset_for_size(min(images.shape[-2:]))
    params = PRESETS[preset][name][int(severity) - 1]
    # In place where we can: on the CPU every fresh (N,3,H,W) float buffer costs page faults
    # that take longer than the arithmetic (a 10x difference at 1,000 CIFAR images).
    x = images.float().div_(255)
    out = _FUNCTIONS[name](x, params, generator)
    out = out.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    if preset in STORAGE_JPEG_QUALITY:
        out = jpeg_roundtrip(out, STORAGE_JPEG_QUALITY[preset])
    return out
