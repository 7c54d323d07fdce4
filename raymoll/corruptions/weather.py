"""Weather corruptions: snow, frost, fog, brightness (test).

Each takes x float (N, 3, H, W) in [0, 1], the severity's parameter and a torch.Generator on
x's device, and returns float images that corrupt() clips.

Deviations from the reference generator:
- snow blurs its layer with kernels.motion_blur (the `imagecorruptions` re-implementation of
  ImageMagick's motion blur) and trims zooms to the centre (see blur.py).
- frost reads the photos with torchvision and resizes them with torch's bilinear (cv2's
  INTER_LINEAR, used to shrink them) or bicubic (cv2's INTER_CUBIC, used by `imagecorruptions`
  to enlarge them) interpolation; the crop offsets are drawn uniformly, as in the reference.
- fog's plasma fractal is the reference's diamond-square algorithm run on a batch of maps;
  the map side is the next power of two of the image side (32 for CIFAR and 64 for
  Tiny-ImageNet, as in the reference scripts).
"""
import functools
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from . import kernels

FROST_PHOTOS = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def frost_dir() -> Path:
    """The `frost/` folder inside the installed `imagecorruptions` package, found without
    importing it (its import needs pkg_resources, gone from setuptools >= 82)."""
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "frost"
        if all((folder / name).is_file() for name in FROST_PHOTOS):
            return folder
    raise FileNotFoundError(
        "the frost corruption blends the frost photos shipped with the `imagecorruptions` "
        f"package ({', '.join(FROST_PHOTOS)}), which is not installed here; install it with "
        "`pip install --no-deps imagecorruptions` (raymoll only reads its photos)."
    )


@functools.lru_cache(maxsize=None)
def frost_photos(device: torch.device) -> tuple[torch.Tensor, ...]:
    """The five frost photos as float (1, 3, h, w) in [0, 1] on `device`, read once per device."""
    return tuple(
        decode_image(str(frost_dir() / name), mode=ImageReadMode.RGB).to(device)[None].float() / 255
        for name in FROST_PHOTOS
    )


def frost(x: torch.Tensor, params: tuple[float, float, float], generator: torch.Generator | None) -> torch.Tensor:
    """(image weight, frost weight, photo scale): a * x + b * a random crop of one of the five
    frost photos, each resized by `scale` or by 1.1 x the factor that makes it cover x."""
    a, b, scale = params
    n, _, h, w = x.shape
    photos = []
    for photo in frost_photos(x.device):
        ph, pw = photo.shape[-2:]
        s = max(scale, 1.1 * max(h / ph, w / pw))
        size = (math.floor(ph * s), math.floor(pw * s))
        mode = "bilinear" if s < 1 else "bicubic"
        photos.append(F.interpolate(photo, size=size, mode=mode, align_corners=False).clamp(0, 1)[0])
    # Pad to a common size so that one advanced index crops every image from its own photo.
    heights = torch.tensor([p.shape[-2] for p in photos], device=x.device)
    widths = torch.tensor([p.shape[-1] for p in photos], device=x.device)
    stack = torch.stack([F.pad(p, (0, int(widths.max()) - p.shape[-1], 0, int(heights.max()) - p.shape[-2]))
                         for p in photos])
    which = torch.randint(len(photos), (n,), generator=generator, device=x.device)
    # randint(0, photo side - image side) per image, as the reference draws the crop corner.
    top = (kernels.uniform((n,), 0, 1, x, generator) * (heights[which] - h)).long()
    left = (kernels.uniform((n,), 0, 1, x, generator) * (widths[which] - w)).long()
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]
    crops = stack[which[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # (N, 3, H, W)
    return a * x + b * crops


def plasma_fractal(n: int, size: int, decay: float, like: torch.Tensor,
                   generator: torch.Generator | None) -> torch.Tensor:
    """n diamond-square height maps (n, size, size) in [0, 1], size a power of two; the
    random term at each level is wibble * U(-wibble, wibble), wibble = 100 / decay^level."""
    maps = torch.zeros(n, size, size, device=like.device)
    step, wibble = size, 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        return total / 4 + wibble * kernels.uniform(total.shape, -wibble, wibble, like, generator)

    while step >= 2:
        half = step // 2
        # Squares: the centre of each square of corners gets their mean plus noise.
        corners = maps[:, ::step, ::step]
        total = corners + corners.roll(-1, dims=1)
        maps[:, half::step, half::step] = wibbled_mean(total + total.roll(-1, dims=2))
        # Diamonds: the edge midpoints get the mean of their two corners and two centres.
        centres = maps[:, half::step, half::step]
        corners = maps[:, ::step, ::step]
        total = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        maps[:, ::step, half::step] = wibbled_mean(total)
        total = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        maps[:, half::step, ::step] = wibbled_mean(total)
        step, wibble = half, wibble / decay
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)
    return maps / maps.amax(dim=(1, 2), keepdim=True)


def fog(x: torch.Tensor, params: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    """(strength, wibble decay): add strength * plasma fractal to every channel, rescale by
    max / (max + strength) with max the image's largest value."""
    strength, decay = params
    n, _, h, w = x.shape
    size = 1 << (max(h, w) - 1).bit_length()
    plasma = plasma_fractal(n, size, decay, x, generator)[:, None, :h, :w]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * plasma) * peak / (peak + strength)


def brightness(x: torch.Tensor, shift: float, generator: torch.Generator | None) -> torch.Tensor:
    """Add `shift` to V in HSV, clipped to [0, 1]. With H and S fixed, RGB scales with V, so
    this is x * V' / V (black pixels, S = 0 in skimage, become grey V')."""
    value, _, _ = kernels.hsv_value_saturation(x)
    new_value = (value + shift).clamp(0, 1)
    return torch.where(value > 0, x * new_value / value.clamp_min(1e-12), new_value)


def snow(x: torch.Tensor, params: tuple[float, ...], generator: torch.Generator | None) -> torch.Tensor:
    """(loc, scale, zoom, threshold, blur radius, blur sigma, blend): a N(loc, scale^2) layer,
    zoomed, zeroed below threshold, motion-blurred at U(-135, -45) degrees, added twice (also
    turned by 180 degrees) to the image blended towards max(x, 1.5 grey + 0.5)."""
    loc, scale, zoom, threshold, radius, sigma, blend = params
    n, _, h, w = x.shape
    layer = kernels.clipped_zoom(kernels.normal((n, 1, h, w), loc, scale, x, generator), zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    # The reference passes the layer to ImageMagick as a uint8 PNG and reads uint8 back.
    layer = torch.floor(layer.clamp(0, 1) * 255) / 255
    angle = kernels.uniform((n,), -135.0, -45.0, x, generator)
    layer = torch.round(kernels.motion_blur(layer, radius, sigma, angle) * 255) / 255
    x = blend * x + (1 - blend) * torch.maximum(x, kernels.to_gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-2, -1)
