"""Spatter (validation): water drops or mud on the lens.

Takes x float (N, 3, H, W) in [0, 1], the severity's parameter and a torch.Generator on x's
device, and returns float images that corrupt() clips.

The water mode shades each drop by its distance to the drop's edges, through the reference's
OpenCV chain: Canny edges, distance transform truncated at 20 px, 3x3 box blur, histogram
equalisation, an emboss kernel and another box blur. Here that chain runs batched in torch.
Deviations: the distance is exact Euclidean (OpenCV's DIST_L2 with a 5x5 mask is a close
chamfer approximation), and Canny's hysteresis grows strong edges through weak ones for at most
`HYSTERESIS_STEPS` pixel steps (OpenCV follows them to the end).
"""
import torch
import torch.nn.functional as F

from . import kernels

WATER = (175 / 255, 238 / 255, 238 / 255)  # pale turquoise
MUD = (63 / 255, 42 / 255, 20 / 255)  # mud brown
SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
BOX3 = torch.full((3, 3), 1 / 9)
TAN_22_5 = 0.4142135623730951
HYSTERESIS_STEPS = 16
DISTANCE_LIMIT = 20


def shifted(x: torch.Tensor, drow: int, dcol: int) -> torch.Tensor:
    """out[..., r, c] = x[..., r + drow, c + dcol], zero outside the image."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 + drow:1 + drow + h, 1 + dcol:1 + dcol + w]


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary dilation of bool (N, 1, H, W) (faster than max_pool2d on one channel)."""
    out = mask.clone()
    for drow in (-1, 0, 1):
        for dcol in (-1, 0, 1):
            out |= shifted(mask, drow, dcol)
    return out


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(image, low, high) on uint8-valued float (N, 1, H, W): L1 Sobel magnitude,
    non-maximum suppression in four directions, hysteresis. Returns bool (N, 1, H, W)."""
    gx = kernels.conv_per_channel(image, SOBEL, "replicate")
    gy = kernels.conv_per_channel(image, SOBEL.T, "replicate")
    mag = gx.abs() + gy.abs()
    across = gy.abs() < gx.abs() * TAN_22_5  # gradient along the row: compare left and right
    along = gy.abs() > gx.abs() * (TAN_22_5 + 2)  # gradient along the column: up and down
    s = torch.where(gx * gy < 0, -1, 1)
    diagonal_max = (mag > torch.where(s > 0, shifted(mag, -1, -1), shifted(mag, -1, 1))) & (
        mag > torch.where(s > 0, shifted(mag, 1, 1), shifted(mag, 1, -1)))
    peak = torch.where(across, (mag > shifted(mag, 0, -1)) & (mag >= shifted(mag, 0, 1)),
                       torch.where(along, (mag > shifted(mag, -1, 0)) & (mag >= shifted(mag, 1, 0)),
                                   diagonal_max))
    weak = peak & (mag > low)
    edges = weak & (mag > high)
    for _ in range(HYSTERESIS_STEPS):
        grown = dilate(edges) & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def edge_distance(edges: torch.Tensor, limit: int) -> torch.Tensor:
    """Euclidean distance (N, 1, H, W) of each pixel to the nearest True of `edges`, capped at
    `limit`: the separable squared-distance transform, each pass over a window of +-limit
    (enough, since larger distances are capped)."""
    squared = torch.where(edges, 0.0, float("inf"))
    for dim in (-1, -2):
        side = squared.shape[dim]
        reach = min(limit, side - 1)
        padded = F.pad(squared, (reach, reach) if dim == -1 else (0, 0, reach, reach), value=float("inf"))
        best = squared
        for d in range(-reach, reach + 1):
            best = torch.minimum(best, padded.narrow(dim, reach + d, side) + d * d)
        squared = best
    return squared.sqrt().clamp(max=limit)


def equalize_hist(image: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist per image of uint8-valued float (N, 1, H, W)."""
    n = image.shape[0]
    flat = image.reshape(n, -1).long()
    hist = torch.zeros(n, 256, device=image.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    cdf = hist.cumsum(1)
    first = torch.where(hist > 0, cdf, float("inf")).amin(1, keepdim=True)  # count of the lowest value
    total = flat.shape[1]
    lut = torch.round((cdf - first).clamp_min(0) * 255 / (total - first).clamp_min(1))
    out = lut.gather(1, flat).reshape(image.shape)
    # A constant image has nothing to spread; OpenCV leaves it as it is.
    return torch.where((first == total).view(n, 1, 1, 1), image, out)


def water_shading(liquid: torch.Tensor) -> torch.Tensor:
    """The reference's edge-distance shading of the liquid layer (uint8-valued float)."""
    dist = edge_distance(canny(liquid, 50, 150), DISTANCE_LIMIT)
    dist = torch.floor(kernels.conv_per_channel(dist, BOX3, "reflect"))
    dist = equalize_hist(dist)
    dist = torch.round(kernels.conv_per_channel(dist, EMBOSS, "reflect")).clamp(0, 255)
    return torch.round(kernels.conv_per_channel(dist, BOX3, "reflect"))


def spatter(x: torch.Tensor, params: tuple[float, ...], generator: torch.Generator | None) -> torch.Tensor:
    """(loc, scale, sigma, threshold, intensity, mode): a N(loc, scale^2) layer blurred by
    sigma and zeroed below threshold; mode 0 adds shaded pale-turquoise water drops scaled to
    `intensity`, mode 1 covers the image with brown mud where the layer, blurred by
    `intensity`, exceeds 0.8."""
    loc, scale, sigma, threshold, intensity, mode = params
    n, _, h, w = x.shape
    liquid = kernels.gaussian_filter(kernels.normal((n, 1, h, w), loc, scale, x, generator), sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if mode == 0:
        liquid = torch.floor(liquid.clamp(0, 1) * 255)  # the reference casts to uint8 here
        m = liquid * water_shading(liquid)
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12) * intensity
        return x + m * torch.tensor(WATER, device=x.device).view(1, 3, 1, 1)
    m = kernels.gaussian_filter((liquid > threshold).float(), intensity)
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    return x * (1 - m) + m * torch.tensor(MUD, device=x.device).view(1, 3, 1, 1)
