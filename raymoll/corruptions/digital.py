"""Digital corruptions: contrast, elastic_transform, pixelate, jpeg_compression (test) and
saturate (validation).

Each takes x float (N, 3, H, W) in [0, 1], the severity's parameter and a torch.Generator on
x's device, and returns float images that corrupt() clips.

Deviations from the reference generator:
- pixelate rounds to uint8 once at the end (PIL also rounds between its horizontal and
  vertical passes).
- jpeg_compression uses torchvision's libjpeg (nvjpeg on CUDA) instead of PIL's, at the same
  quality.
- elastic_transform blurs its random field with mirrored borders that repeat no edge value
  (torch's "reflect"; skimage's repeats it), which only changes which random values sit near
  the border, and interpolates the affine warp in float (OpenCV uses 5-bit fixed point).
"""
import torch
import torch.nn.functional as F

from . import kernels


def contrast(x: torch.Tensor, factor: float, generator: torch.Generator | None) -> torch.Tensor:
    """Scale each channel's deviation from its own mean by `factor`."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean) * factor + mean


def saturate(x: torch.Tensor, params: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    """(multiplier, offset): S' = clip(S * multiplier + offset, 0, 1) in HSV. With H and V
    fixed each channel is V (1 - S g) for a g in [0, 1] set by the hue, here g = (V - x) / delta;
    grey pixels have hue 0 (red) in skimage, g = (0, 1, 1)."""
    multiplier, offset = params
    value, saturation, delta = kernels.hsv_value_saturation(x)
    new_saturation = (saturation * multiplier + offset).clamp(0, 1)
    red = torch.tensor([0.0, 1.0, 1.0], device=x.device).view(1, 3, 1, 1)
    g = torch.where(delta > 0, (value - x) / delta.clamp_min(1e-12), red)
    return value * (1 - new_saturation * g)


def jpeg_compression(x: torch.Tensor, quality: int, generator: torch.Generator | None) -> torch.Tensor:
    """Round trip through JPEG at `quality`."""
    images = torch.round(x * 255).to(torch.uint8)
    return kernels.jpeg_roundtrip(images, quality).float() / 255


def box_resize_weights(in_size: int, out_size: int) -> torch.Tensor:
    """PIL's Image.resize(..., Image.BOX) along one axis as a float64 (out, in) matrix: output
    pixel i averages the input pixels whose centres lie within half its footprint of its
    centre (i + 0.5) in / out; enlarging, this is nearest neighbour."""
    scale = in_size / out_size
    support = 0.5 * max(scale, 1.0)
    centre = (torch.arange(out_size, dtype=torch.float64)[:, None] + 0.5) * scale
    offset = torch.arange(in_size, dtype=torch.float64)[None, :] + 0.5 - centre
    weights = ((offset > -support) & (offset <= support)).double()
    return weights / weights.sum(dim=1, keepdim=True)


def pixelate(x: torch.Tensor, factor: float, generator: torch.Generator | None) -> torch.Tensor:
    """Box-resize to int(side * factor), then box-resize back (both PIL BOX)."""
    h, w = x.shape[-2:]
    rows = box_resize_weights(int(h * factor), h) @ box_resize_weights(h, int(h * factor))
    cols = box_resize_weights(int(w * factor), w) @ box_resize_weights(w, int(w * factor))
    return rows.to(x) @ x @ cols.T.to(x)


def sample_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, align_corners: bool) -> torch.Tensor:
    """Bilinear samples of x (N, C, H, W) at float pixel coordinates rows, cols (N, H, W),
    reflected at the borders: about the border pixels' centres with align_corners (OpenCV's
    BORDER_REFLECT_101), about their outer edges without (scipy's "reflect")."""
    h, w = x.shape[-2:]
    if align_corners:
        grid = torch.stack([2 * cols / (w - 1) - 1, 2 * rows / (h - 1) - 1], dim=-1)
    else:
        grid = torch.stack([(2 * cols + 1) / w - 1, (2 * rows + 1) / h - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=align_corners)


def random_affine(x: torch.Tensor, jitter: float, generator: torch.Generator | None) -> torch.Tensor:
    """The reference's random affine warp: the affine map that moves three points around the
    centre (corners of a square of half-side side // 3) by U(-jitter, jitter) pixels each."""
    n, _, h, w = x.shape
    cx, cy, half = w // 2, h // 2, min(h, w) // 3
    source = torch.tensor([[cx + half, cy + half], [cx + half, cy - half], [cx - half, cy - half]],
                          dtype=torch.float32, device=x.device).expand(n, 3, 2)
    target = source + kernels.uniform((n, 3, 2), -jitter, jitter, x, generator)
    # Solve for the inverse map (target -> source): each output pixel reads where it came from.
    ones = torch.ones(n, 3, 1, device=x.device)
    inverse = torch.linalg.solve(torch.cat([target, ones], dim=2), source)  # (N, 3, 2)
    row, col = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32),
                              torch.arange(w, device=x.device, dtype=torch.float32), indexing="ij")
    pixels = torch.stack([col, row, torch.ones_like(row)], dim=-1).reshape(1, h * w, 3)
    src = (pixels @ inverse).reshape(n, h, w, 2)
    return sample_pixels(x, src[..., 1], src[..., 0], align_corners=True)


def elastic_transform(x: torch.Tensor, params: tuple[float, float, float], generator: torch.Generator | None) -> torch.Tensor:
    """(alpha, sigma, affine jitter) as fractions of the image side: random_affine, then
    sample at pixel + alpha * (U(-1, 1) field blurred by sigma, truncated at 3 sigma)."""
    side = min(x.shape[-2:])
    alpha, sigma, jitter = (p * side for p in params)
    if jitter > 0:
        x = random_affine(x, jitter, generator)
    if alpha == 0:
        return x
    n, _, h, w = x.shape
    field = kernels.uniform((n, 2, h, w), -1.0, 1.0, x, generator)
    field = kernels.gaussian_filter(field, sigma, truncate=3.0, padding_mode="reflect") * alpha
    rows = torch.arange(h, device=x.device, dtype=torch.float32)[:, None] + field[:, 0]
    cols = torch.arange(w, device=x.device, dtype=torch.float32)[None, :] + field[:, 1]
    return sample_pixels(x, rows, cols, align_corners=False)
