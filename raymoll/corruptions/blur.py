"""Blur corruptions: defocus, glass, motion, zoom (test) and gaussian (validation).

Each takes x float (N, 3, H, W) in [0, 1], the severity's parameter and a torch.Generator on
x's device, and returns float images that corrupt() clips.

Deviations from the reference generator:
- glass_blur shuffles all pixels of a pass at once, each copying the pixel at a random offset in
  [-max_delta, max_delta) (the reference's "swap" copies rather than swaps). The reference
  visits pixels one by one from the bottom right, so a pixel can copy a value that was already
  moved in the same pass. With max_delta 1 (every CIFAR severity) the sources are never visited
  before their destination, so the vectorised pass is exact; with larger offsets it differs
  only in these chains.
- motion_blur is ImageMagick's kernel as `imagecorruptions` re-implements it (see
  kernels.motion_blur); the CIFAR and Tiny-ImageNet sets were made with ImageMagick itself.
- zoom_blur trims each zoom to the centre, as make_cifar_c.py does; `imagecorruptions` keeps
  the top-left corner, at most one pixel away.
"""
import numpy as np
import torch

from . import kernels


def gaussian_blur(x: torch.Tensor, sigma: float, generator: torch.Generator | None) -> torch.Tensor:
    """skimage.filters.gaussian per channel: borders replicated, truncated at 4 sigma."""
    return kernels.gaussian_filter(x, sigma)


def glass_blur(x: torch.Tensor, params: tuple[float, int, int], generator: torch.Generator | None) -> torch.Tensor:
    """(sigma, max_delta, iterations): blur, store as uint8, `iterations` local pixel shuffles
    of the pixels in rows and columns max_delta + 1 .. side - max_delta, blur again."""
    sigma, delta, iterations = params
    n, _, h, w = x.shape
    # The reference truncates the first blur to uint8 before shuffling.
    x = torch.floor(kernels.gaussian_filter(x, sigma) * 255) / 255
    row = torch.arange(h, device=x.device)[None, :, None]
    col = torch.arange(w, device=x.device)[None, None, :]
    inside = (row > delta) & (row <= h - delta) & (col > delta) & (col <= w - delta)
    for _ in range(iterations):
        drow = torch.randint(-delta, delta, (n, h, w), generator=generator, device=x.device)
        dcol = torch.randint(-delta, delta, (n, h, w), generator=generator, device=x.device)
        x = kernels.gather_pixels(x, row + drow * inside, col + dcol * inside)
    return kernels.gaussian_filter(x, sigma)


def disk_kernel(radius: float, alias_sigma: float) -> torch.Tensor:
    """The reference's anti-aliased disk: a normalised binary disk of `radius` on a grid of
    half-width max(8, radius), blurred by a 3x3 (5x5 above radius 8) gaussian of
    `alias_sigma` with reflected borders, cropped to its non-zero support. float64 (k, k)."""
    half = 8 if radius <= 8 else int(radius)
    taps = 3 if radius <= 8 else 5
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).double()
    disk = (disk / disk.sum())[None, None]
    g = kernels.gaussian_kernel1d(alias_sigma, taps // 2)
    disk = kernels.conv_per_channel(disk, g[None, :], "reflect")
    disk = kernels.conv_per_channel(disk, g[:, None], "reflect")[0, 0]
    rows, cols = torch.nonzero(disk, as_tuple=True)
    r = int(max((rows - half).abs().max(), (cols - half).abs().max()))
    return disk[half - r:half + r + 1, half - r:half + r + 1]


def defocus_blur(x: torch.Tensor, params: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    """(disk radius, anti-alias sigma): correlate with disk_kernel, borders reflected
    (cv2.filter2D's BORDER_REFLECT_101)."""
    return kernels.conv_per_channel(x, disk_kernel(*params), "reflect")


def motion_blur(x: torch.Tensor, params: tuple[int, float], generator: torch.Generator | None) -> torch.Tensor:
    """(radius, sigma): kernels.motion_blur at an angle U(-45, 45) degrees per image."""
    radius, sigma = params
    angle = kernels.uniform((x.shape[0],), -45.0, 45.0, x, generator)
    return kernels.motion_blur(x, radius, sigma, angle)


def zoom_blur(x: torch.Tensor, factors: tuple[float, float, float], generator: torch.Generator | None) -> torch.Tensor:
    """numpy.arange(*factors) zoom factors: mean of x and its centre zooms by each factor."""
    zooms = np.arange(*factors)
    out = x.clone()
    for factor in zooms:
        out += kernels.clipped_zoom(x, float(factor))
    return out / (len(zooms) + 1)
