"""Batched image operations shared by the corruption families.

Every function takes float images (N, C, H, W) on any device and returns the same layout on
the same device. Pixel coordinates follow the reference generator: row, column, pixel centres
at integers.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

# ITU-R 601 luma weights, as cv2.COLOR_RGB2GRAY uses.
LUMA = (0.299, 0.587, 0.114)


def uniform(shape: tuple[int, ...], low: float, high: float, like: torch.Tensor,
            generator: torch.Generator | None) -> torch.Tensor:
    """U(low, high) float32 draws of `shape` on the device of `like`."""
    u = torch.rand(shape, generator=generator, device=like.device)
    return low + (high - low) * u


def normal(shape: tuple[int, ...], mean: float, std: float, like: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    """N(mean, std^2) float32 draws of `shape` on the device of `like`."""
    return mean + std * torch.randn(shape, generator=generator, device=like.device)


def conv_per_channel(x: torch.Tensor, kernel: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """Correlate every channel of x (N, C, H, W) with one 2-D CPU kernel (kh, kw), odd sizes,
    padding the borders with `padding_mode` ("reflect" = OpenCV's BORDER_REFLECT_101,
    "replicate" = scipy's "nearest") so that the output keeps the input size."""
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    padded = F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2), mode=padding_mode)
    # A sum of shifted copies: ~3x faster than F.conv2d's one-channel path on CPU, and on a
    # GPU a few hundred taps (the largest ImageNet disk) are still memory-bound adds.
    out = torch.zeros_like(x)
    for i, row in enumerate(kernel.tolist()):
        for j, weight in enumerate(row):
            if weight != 0:
                out.add_(padded[..., i:i + h, j:j + w], alpha=weight)
    return out


def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    """Normalised float64 taps exp(-i^2 / 2 sigma^2), i in -radius..radius (scipy's weights)."""
    i = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (i / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(x: torch.Tensor, sigma: float, truncate: float = 4.0,
                    padding_mode: str = "replicate") -> torch.Tensor:
    """scipy.ndimage.gaussian_filter over H and W (skimage.filters.gaussian with
    channel_axis=-1): radius int(truncate * sigma + 0.5), default border "nearest".
    sigma == 0 returns x, as scipy does."""
    if sigma <= 0:
        return x
    # torch's reflect padding needs the pad to be smaller than the side.
    radius = min(int(truncate * sigma + 0.5), min(x.shape[-2:]) - 1)
    if radius == 0:
        return x
    k = gaussian_kernel1d(sigma, radius)
    x = conv_per_channel(x, k[None, :], padding_mode)
    return conv_per_channel(x, k[:, None], padding_mode)


def gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[n, c, h, w] = x[n, c, rows[n, h, w], cols[n, h, w]] for integer index maps
    (N, H, W) that are already inside the image; all channels move together."""
    n, c, h, w = x.shape
    index = (rows * w + cols).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angle_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick's motion blur, as `imagecorruptions` re-implements it: a one-sided line
    kernel of 2 radius + 1 taps with weights exp(-i^2 / 2 sigma^2), tap i reading the pixel at
    round(i (cos a, sin a)) (column, row) from the output pixel, edges replicated.
    x (N, C, H, W) float, angle_deg (N,) one angle per image."""
    n, _, h, w = x.shape
    taps = torch.arange(2 * radius + 1, device=x.device, dtype=torch.float32)
    weights = torch.exp(-taps**2 / (2 * sigma**2))
    weights = weights / weights.sum()
    angle = torch.deg2rad(angle_deg.float())[:, None]
    # ceil(v - 0.5) is ImageMagick's rounding of the tap offsets.
    drow = torch.ceil(taps * torch.sin(angle) - 0.5).long()  # (N, taps)
    dcol = torch.ceil(taps * torch.cos(angle) - 0.5).long()
    # The reference stops adding taps once an offset leaves the image.
    inside = ((drow.abs() < h) & (dcol.abs() < w)).long().cumprod(dim=1).to(x.dtype)
    row = torch.arange(h, device=x.device)
    col = torch.arange(w, device=x.device)
    out = torch.zeros_like(x)
    for i in range(taps.numel()):
        rows = (row[None, :] + drow[:, i, None]).clamp(0, h - 1)  # (N, H)
        cols = (col[None, :] + dcol[:, i, None]).clamp(0, w - 1)  # (N, W)
        shifted = gather_pixels(x, rows[:, :, None].expand(n, h, w), cols[:, None, :].expand(n, h, w))
        out += (weights[i] * inside[:, i]).view(n, 1, 1, 1) * shifted
    return out


def zoom_matrix(side: int, factor: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """(side, side) matrix Z of a 1-D clipped zoom: crop ceil(side / factor) samples around the
    centre, resize linearly with ends aligned (scipy.ndimage.zoom, order 1) to
    round(crop * factor), trim the centre back to `side`. Z @ v zooms a column v."""
    crop = math.ceil(side / factor)
    top = (side - crop) // 2
    rows = torch.eye(side, device=device)[top:top + crop].T[None]  # (1, side, crop)
    zoomed = F.interpolate(rows, size=round(crop * factor), mode="linear", align_corners=True)[0]
    trim = (zoomed.shape[-1] - side) // 2
    return zoomed[:, trim:trim + side].T.contiguous()


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom (N, C, H, W) into the centre by `factor` >= 1, keeping the size: the separable
    linear map Z_H x Z_W^T of `zoom_matrix` (two small matrix products: faster than resizing
    a crop, and no strided copies)."""
    h, w = x.shape[-2:]
    return zoom_matrix(h, factor, x.device) @ x @ zoom_matrix(w, factor, x.device).T


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB x (N, 3, H, W)."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b)[:, None]


def hsv_value_saturation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V, S, delta) of RGB x in [0, 1], each (N, 1, H, W), as skimage.color.rgb2hsv defines
    them: V = max, delta = max - min, S = delta / V (0 where V == 0)."""
    value = x.amax(dim=1, keepdim=True)
    delta = value - x.amin(dim=1, keepdim=True)
    saturation = torch.where(value > 0, delta / value.clamp_min(1e-12), torch.zeros_like(value))
    return value, saturation, delta


def jpeg_roundtrip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode uint8 images (N, 3, H, W) as JPEG at `quality` (libjpeg on CPU,
    nvjpeg when the images are on a CUDA device)."""
    encoded = encode_jpeg(list(images.unbind(0)), quality=quality)
    # decode_jpeg reads the byte streams from CPU whatever device it decodes on.
    decoded = decode_jpeg([e.cpu() for e in encoded], device=images.device)
    return torch.stack(decoded)
