"""Batched TrivialAugmentWide, RandAugment, AutoAugment and AugMix: torchvision v2's policies
(`torchvision.transforms.v2._auto_augment`, their defaults) with one op and magnitude drawn per
sample, applied to the whole batch at once.

The ops fall into a few stages, each a batched kernel with per-sample parameters: the geometric
ops (shear, translate, rotate) are one per-sample affine matrix and one grid_sample; brightness,
colour and contrast one blend; posterize, solarize and invert one bit operation; sharpness,
autocontrast and equalize one kernel each. `apply_ops` gives every stage only its samples on the
CPU (grouping them there costs one host read per call, not per image); on an accelerator every
stage runs on the whole batch and a `where` keeps each sample's own result, so no shape depends
on the draw and nothing waits for the device. No Python loop over images either way. Each op
equals its `torchvision.transforms.v2.functional` kernel on uint8 images, bilinear warps to
within one grey level (tests/test_augment.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# The fixed op set; a sample's op is its index here.
OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
       "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
       "Invert")
OP = {name: i for i, name in enumerate(OPS)}
SIGNED = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness")


# torchvision's bins are float32 (its magnitude is float() of one): so are these, held as float64.
def _linear(high: float):
    return lambda bins, h, w: torch.linspace(0.0, high, bins).double()


def _posterize(top: int, span: int):
    return lambda bins, h, w: (top - torch.arange(bins) / ((bins - 1) / span)).round().double()


_SOLARIZE = lambda bins, h, w: torch.linspace(1.0, 0.0, bins).double()  # noqa: E731
_NONE = lambda bins, h, w: torch.zeros(bins, dtype=torch.float64)  # noqa: E731
# Magnitude bins per op, as torchvision's _AUGMENTATION_SPACE of each policy defines them.
_RANDAUGMENT_SPACE = {
    "Identity": _NONE, "ShearX": _linear(0.3), "ShearY": _linear(0.3),
    "TranslateX": lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins).double(),
    "TranslateY": lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins).double(),
    "Rotate": _linear(30.0), "Brightness": _linear(0.9), "Color": _linear(0.9),
    "Contrast": _linear(0.9), "Sharpness": _linear(0.9), "Posterize": _posterize(8, 4),
    "Solarize": _SOLARIZE, "AutoContrast": _NONE, "Equalize": _NONE}
_AUTOAUGMENT_SPACE = {**{k: v for k, v in _RANDAUGMENT_SPACE.items() if k != "Identity"},
                      "Invert": _NONE}
_TRIVIAL_SPACE = {
    "Identity": _NONE, "ShearX": _linear(0.99), "ShearY": _linear(0.99),
    "TranslateX": _linear(32.0), "TranslateY": _linear(32.0), "Rotate": _linear(135.0),
    "Brightness": _linear(0.99), "Color": _linear(0.99), "Contrast": _linear(0.99),
    "Sharpness": _linear(0.99), "Posterize": _posterize(8, 6), "Solarize": _SOLARIZE,
    "AutoContrast": _NONE, "Equalize": _NONE}
_AUGMIX_SPACE = {
    "ShearX": _linear(0.3), "ShearY": _linear(0.3),
    "TranslateX": lambda bins, h, w: torch.linspace(0.0, w / 3.0, bins).double(),
    "TranslateY": lambda bins, h, w: torch.linspace(0.0, h / 3.0, bins).double(),
    "Rotate": _linear(30.0), "Posterize": _posterize(4, 4), "Solarize": _SOLARIZE,
    "AutoContrast": _NONE, "Equalize": _NONE, "Brightness": _linear(0.9), "Color": _linear(0.9),
    "Contrast": _linear(0.9), "Sharpness": _linear(0.9)}
_SPACES = {"trivialaugment": _TRIVIAL_SPACE, "randaugment": _RANDAUGMENT_SPACE,
           "autoaugment": _AUTOAUGMENT_SPACE, "augmix": _AUGMIX_SPACE}

# AutoAugment's sub-policies, (op, probability, magnitude bin of 10) twice, as torchvision's.
AUTOAUGMENT_POLICIES = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None))],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None))],
}


@functools.lru_cache(maxsize=None)
def _table(space: str, bins: int, h: int, w: int,
           device: torch.device) -> tuple[torch.Tensor, ...]:
    """(op ids (K,), magnitudes (K, bins) float64, signed (K,) bool, affine matrices (2, K,
    bins, 2, 3) float32 of each magnitude and of its negative) of a policy's op space (a name
    in _SPACES); built once per size and device (callers only read it). The matrices are
    _affine_theta's, looked up per sample instead of some 50 small ops per call."""
    space = _SPACES[space]
    ops = torch.tensor([OP[name] for name in space], device=device)
    mags = torch.stack([fn(bins, h, w) for fn in space.values()]).to(device)
    signed = torch.tensor([name in SIGNED for name in space], device=device)
    every_op = ops[:, None].expand(len(ops), bins).reshape(-1)
    thetas = torch.stack([_affine_theta(every_op, sign * mags.view(-1), h, w)
                          for sign in (1.0, -1.0)]).view(2, len(ops), bins, 2, 3)
    return ops, mags, signed, thetas


def _signed(table: tuple[torch.Tensor, ...], row: torch.Tensor, bins: torch.Tensor,
            g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The magnitude (N,) float64 and affine matrix (N, 2, 3) of table row `row` at bin `bins`
    per sample, negated with probability 1/2 where the op is signed (torchvision: rand() <=
    0.5)."""
    _, mags, signed, thetas = table
    flip = signed[row] & (torch.rand(row.shape, device=row.device, generator=g) <= 0.5)
    magnitude = mags[row, bins]
    return torch.where(flip, -magnitude, magnitude), thetas[flip.long(), row, bins]


def _affine_theta(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-sample inverse affine matrices (N,2,3) float32, as torchvision's
    _get_inverse_affine_matrix builds them for ShearX/Y (centre = top-left corner, shear =
    atan(m)), TranslateX/Y (int(m) px) and Rotate (m degrees); identity for the other ops."""
    shear, shift = torch.rad2deg(torch.atan(m)), m.trunc()
    is_shear_x, is_shear_y = op == OP["ShearX"], op == OP["ShearY"]
    tx = torch.where(op == OP["TranslateX"], shift, 0.0)
    ty = torch.where(op == OP["TranslateY"], shift, 0.0)
    rot = torch.deg2rad(torch.where(op == OP["Rotate"], -torch.remainder(m, 360.0), 0.0))
    sx = torch.deg2rad(torch.where(is_shear_x, shear, 0.0))
    sy = torch.deg2rad(torch.where(is_shear_y, shear, 0.0))
    sheared = is_shear_x | is_shear_y
    cx, cy = torch.where(sheared, -0.5 * w, 0.0), torch.where(sheared, -0.5 * h, 0.0)
    cos_sy, tan_sx, rot_sy = torch.cos(sy), torch.tan(sx), rot - sy
    a = torch.cos(rot_sy) / cos_sy
    b = -(a * tan_sx + torch.sin(rot))
    c = torch.sin(rot_sy) / cos_sy
    d = torch.cos(rot) - c * tan_sx
    cx_tx, cy_ty = cx + tx, cy + ty
    m2 = cx - d * cx_tx - (-b) * cy_ty
    m5 = cy - (-c) * cx_tx - a * cy_ty
    return torch.stack([d, -b, m2, -c, a, m5], 1).view(-1, 2, 3).float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images holding values in [0, 256) -> uint8, truncated as `.to(torch.uint8)` does.

    Through int32: PyTorch's direct float -> uint8 cast has no vectorised CPU kernel and costs
    twice the two casts (both exact here: every value fits either type).
    """
    return x.to(torch.int32).to(torch.uint8)


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    """torchvision's _affine_grid + _apply_grid_transform (zeros outside), batched over theta.

    torchvision's grid is base (HW,3) @ theta^T by bmm, which sums the three products left to
    right in float32; the elementwise form below does the same at a tenth of a batched bmm's
    cost. Where the bmm fuses multiply-adds (AVX-512 CPUs) a coordinate can differ in its last
    bit: nearest warps stay exact, a bilinear value can move by one grey level (tested).
    It is built as (N,2,H,W), whose broadcasts run along whole rows, and handed over permuted.
    """
    n, _, h, w = x.shape
    dev = x.device
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev).view(1, 1, w)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).view(1, h, 1)
    rescaled = torch.stack((theta[:, 0] / (0.5 * w), theta[:, 1] / (0.5 * h)), 1)
    rescaled = rescaled.view(n, 2, 3, 1, 1)
    grid = (xs * rescaled[:, :, 0] + ys * rescaled[:, :, 1]).add_(rescaled[:, :, 2])
    out = F.grid_sample(x.float(), grid.permute(0, 2, 3, 1), mode=mode, padding_mode="zeros",
                        align_corners=False)
    # Nearest copies grey levels (or the zero fill): only bilinear values need rounding.
    return to_uint8(out if mode == "nearest" else out.round_())


def _blend(x: torch.Tensor, degenerate: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend of uint8 images, given as float x (overwritten), with a per-sample
    ratio (N,1,1,1) float64: truncated to uint8. Like torchvision's Python-float scalars, ratio
    and 1 - ratio are rounded to float32 separately, so the result is the same to the grey
    level."""
    out = x.mul_(ratio.float()).addcmul_(degenerate, (1.0 - ratio).float())
    return to_uint8(out.clamp_(0, 255))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb_to_grayscale_image of uint8 images, given as float x (floored):
    (N,1,H,W)."""
    r, g, b = x.unbind(-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(-3).floor_()


def _sharpen(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_sharpness_image with a per-sample factor (N,1,1,1) float64.

    Its blur is a float32 conv with the weights 1/13 (5/13 in the centre), rounded: that is
    round(k / 13) for the integer k = (3x3 sum) + 4 * centre, which no rounding error of the
    conv can move across a half (k / 13 is at least 1/26 from one), so the exact sum, done in
    float32 with whole numbers up to 3315, gives the same grey levels without a grouped conv.
    """
    out = x.float()
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]
    view = out[..., 1:-1, 1:-1]
    k = (rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]).add_(view, alpha=4.0)
    blurred = k.div_(13.0).round_()
    view.addcmul_(blurred.sub_(view), (1.0 - factor).float())
    return to_uint8(out.clamp_(0, 255))


def _geometric(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, theta: torch.Tensor,
               mode: str) -> torch.Tensor:
    return _warp(x, theta, mode)


def _blends(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, theta: torch.Tensor,
            mode: str) -> torch.Tensor:
    """Brightness: a blend with black; Color: with the grey image; Contrast: with its mean."""
    n = len(x)
    x = x.float()  # converted once for the grey image and the blend
    grey = _grey(x)
    # grey * 1 + mean * 0 (and the like) is exact: cheaper than a where over the pixels.
    is_color = (op == OP["Color"]).float().view(n, 1, 1, 1)
    is_contrast = (op == OP["Contrast"]).float().view(n, 1, 1, 1)
    degenerate = (grey * is_color).add_(grey.mean(dim=(-3, -2, -1), keepdim=True) * is_contrast)
    return _blend(x, degenerate, (1.0 + m).view(n, 1, 1, 1))


def _sharpness(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, theta: torch.Tensor,
               mode: str) -> torch.Tensor:
    return _sharpen(x, (1.0 + m).view(-1, 1, 1, 1))


def _posterize_solarize(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor,
                        theta: torch.Tensor, mode: str) -> torch.Tensor:
    n = len(x)
    bits = torch.where(op == OP["Posterize"], m, 8.0).long()
    x = x & (((1 << bits) - 1) << (8 - bits)).to(torch.uint8).view(n, 1, 1, 1)
    # Invert is solarize at threshold 0; 256 (no pixel reaches it) leaves a sample unchanged.
    threshold = torch.where(op == OP["Solarize"], 255.0 * m,
                            torch.where(op == OP["Invert"], 0.0, 256.0)).float()
    # torchvision compares the pixels with the float32 threshold; for whole numbers that is
    # x >= ceil(threshold), a uint8 comparison (a float one converts every pixel). A threshold
    # above 255 flips nothing: its flip mask is 0.
    lowest = threshold.ceil().clamp_(max=255).to(torch.uint8).view(n, 1, 1, 1)
    flip = torch.where(threshold <= 255, 255, 0).to(torch.uint8).view(n, 1, 1, 1)
    # Flipping every bit of the pixels at or above it (x ^ 255 = 255 - x) without a where.
    return x ^ (x >= lowest).to(torch.uint8).mul_(flip)


def _autocontrast(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, theta: torch.Tensor,
                  mode: str) -> torch.Tensor:
    return TF.autocontrast(x)


def _equalize(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor, theta: torch.Tensor,
              mode: str) -> torch.Tensor:
    """torchvision's equalize_image (PIL's LUT per channel, left as is where it is flat), with
    all histograms counted at once (one bincount on the CPU, twice as fast as index_add_; one
    index_add_ elsewhere, which needs no host sync) and the LUTs applied by one lookup, both on
    int32 indices (torchvision's need int64)."""
    n, c, h, w = x.shape
    rows = n * c
    offsets = torch.arange(0, rows * 256, 256, dtype=torch.int32, device=x.device)
    index = (x.reshape(rows, h * w).int() + offsets.view(rows, 1)).view(-1)
    if x.device.type == "cpu":  # bincount reads the largest index first: a host sync on CUDA
        hist = torch.bincount(index, minlength=rows * 256).view(rows, 256)
    else:
        hist = torch.zeros(rows * 256, dtype=torch.int32, device=x.device)
        hist = hist.index_add_(0, index, hist.new_ones(1).expand(len(index))).view(rows, 256)
    cum = hist.cumsum(-1)
    step = (h * w - hist.gather(-1, cum.argmax(-1, keepdim=True))).div_(255, rounding_mode="floor")
    lut = (cum[:, :-1] + step // 2).div_(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([lut.new_zeros(rows, 1), lut], 1)
    lut = torch.where(step != 0, lut, torch.arange(256, device=x.device)).to(torch.uint8)
    return lut.view(-1).index_select(0, index).view_as(x)


# The stages: (the ops a stage implements, its kernel). A kernel gets (x, op, m, theta,
# interpolation), theta the rows' affine matrices (read by the geometric stage alone), and
# returns the result for rows whose op is one of its ops (other rows' results are not used).
_STAGES = ((("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"), _geometric),
           (("Brightness", "Color", "Contrast"), _blends), (("Sharpness",), _sharpness),
           (("Posterize", "Solarize", "Invert"), _posterize_solarize),
           (("AutoContrast",), _autocontrast), (("Equalize",), _equalize))


@functools.lru_cache(maxsize=None)
def _stage_of(device: torch.device) -> torch.Tensor:
    """The stage of each op (index into _STAGES; -1 for Identity, which needs none), (len(OPS),)
    on `device`: built once per device, so no call copies it from the host."""
    return torch.tensor([next((s for s, (names, _) in enumerate(_STAGES) if name in names), -1)
                         for name in OPS], device=device)


def apply_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor,
              interpolation: str = "nearest", grouped: bool | None = None,
              theta: torch.Tensor | None = None) -> torch.Tensor:
    """Apply op[i] (an index into OPS) at magnitude[i] (torchvision's signed magnitude) to x[i].

    x: (N,C,H,W) uint8; op: (N,) int64; magnitude: (N,) float64, on x's device. Returns uint8.
    theta: the rows' inverse affine matrices (N,2,3) float32 where the caller has them (the
    policies look them up in their tables); computed from op and magnitude otherwise.
    grouped (default: on the CPU): the rows are sorted by stage and each stage runs on its
    slice only (the group sizes are a host read, which costs nothing on the CPU). Otherwise
    every stage runs on every row and a `where` keeps each row's own stage, so no shape depends
    on the draw and nothing waits for the device.
    """
    m = magnitude.to(torch.float64)
    if theta is None:
        theta = _affine_theta(op, m, *x.shape[-2:])
    stage = _stage_of(op.device)[op]
    if grouped is None:
        grouped = x.device.type == "cpu"
    if not grouped:
        for s, (_, kernel) in enumerate(_STAGES):
            x = torch.where((stage == s).view(-1, 1, 1, 1), kernel(x, op, m, theta, interpolation),
                            x)
        return x
    # Sorted by stage and back by index_select: on the CPU far cheaper than an index_copy_.
    order = torch.argsort(stage, stable=True)
    counts = torch.bincount(stage + 1, minlength=len(_STAGES) + 1).tolist()
    parts = []
    for s, x_s, op_s, m_s, theta_s in zip(range(-1, len(_STAGES)),
                                          x.index_select(0, order).split(counts),
                                          op[order].split(counts), m[order].split(counts),
                                          theta[order].split(counts)):
        if len(x_s):
            parts.append(x_s if s < 0 else _STAGES[s][1](x_s, op_s, m_s, theta_s, interpolation))
    return torch.cat(parts).index_select(0, torch.argsort(order))


def _pick(table: tuple[torch.Tensor, ...], n: int, bins: torch.Tensor,
          g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A uniformly drawn op of the table per sample, at magnitude bin `bins` (N,), signed:
    (op, magnitude, theta) as apply_ops takes them."""
    ops = table[0]
    k = torch.randint(len(ops), (n,), device=ops.device, generator=g)
    return ops[k], *_signed(table, k, bins, g)


def trivial_augment(x: torch.Tensor, g: torch.Generator | None = None,
                    num_magnitude_bins: int = 31) -> torch.Tensor:
    """TrivialAugmentWide per sample: one uniform op at a uniform magnitude bin. uint8 (N,C,H,W)."""
    n, _, h, w = x.shape
    table = _table("trivialaugment", num_magnitude_bins, h, w, x.device)
    bins = torch.randint(num_magnitude_bins, (n,), device=x.device, generator=g)
    op, magnitude, theta = _pick(table, n, bins, g)
    return apply_ops(x, op, magnitude, theta=theta)


def rand_augment(x: torch.Tensor, g: torch.Generator | None = None, num_ops: int = 2,
                 magnitude: int = 9, num_magnitude_bins: int = 31) -> torch.Tensor:
    """RandAugment per sample: `num_ops` uniform ops at bin `magnitude`. uint8 (N,C,H,W)."""
    n, _, h, w = x.shape
    table = _table("randaugment", num_magnitude_bins, h, w, x.device)
    bins = torch.full((n,), magnitude, device=x.device)
    for _ in range(num_ops):
        op, magnitude, theta = _pick(table, n, bins, g)
        x = apply_ops(x, op, magnitude, theta=theta)
    return x


@functools.lru_cache(maxsize=None)
def _sub_policies(policy: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """AUTOAUGMENT_POLICIES[policy] as (op row in _AUTOAUGMENT_SPACE, probability, magnitude
    bin), each (25, 2), on `device`; built once (callers only read them)."""
    row = list(_AUTOAUGMENT_SPACE).index
    subs = AUTOAUGMENT_POLICIES[policy]
    return (torch.tensor([[row(name) for name, _, _ in s] for s in subs], device=device),
            torch.tensor([[p for _, p, _ in s] for s in subs], device=device),
            torch.tensor([[b or 0 for _, _, b in s] for s in subs], device=device))


def autoaugment_draw(n: int, h: int, w: int, device: torch.device, g: torch.Generator | None,
                     policy: str = "cifar10") -> list[tuple[torch.Tensor, ...]]:
    """AutoAugment's draw per sample: a uniform sub-policy of `policy`, each of its two ops
    kept with its probability (else Identity). Returns [(op (N,), magnitude (N,), theta
    (N,2,3))] per slot, as apply_ops takes them."""
    table = _table("autoaugment", 10, h, w, device)
    ops = table[0]
    sub_op, sub_p, sub_bin = _sub_policies(policy, device)
    k = torch.randint(len(sub_op), (n,), device=device, generator=g)
    slots = []
    for slot in range(2):
        r = sub_op[k, slot]
        applied = torch.rand(n, device=device, generator=g) <= sub_p[k, slot]
        magnitude, theta = _signed(table, r, sub_bin[k, slot], g)
        slots.append((torch.where(applied, ops[r], OP["Identity"]), magnitude, theta))
    return slots


def auto_augment(x: torch.Tensor, g: torch.Generator | None = None,
                 policy: str = "cifar10") -> torch.Tensor:
    """AutoAugment per sample with `policy` ("cifar10" | "imagenet"). uint8 (N,C,H,W)."""
    n, _, h, w = x.shape
    for op, magnitude, theta in autoaugment_draw(n, h, w, x.device, g, policy):
        x = apply_ops(x, op, magnitude, theta=theta)
    return x


def augmix_weights(n: int, mixture_width: int, alpha: float, device: torch.device,
                   g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """AugMix's weights: the image's m0 ~ Beta(alpha, alpha) (N,), the chains' Dirichlet(alpha)
    weights scaled by 1 - m0 (N, mixture_width); they sum to 1 per sample."""
    m = torch._sample_dirichlet(torch.full((n, 2), alpha, device=device), generator=g)
    weights = torch._sample_dirichlet(torch.full((n, mixture_width), alpha, device=device),
                                      generator=g) * m[:, 1:]
    return m[:, 0], weights


def augmix(x: torch.Tensor, g: torch.Generator | None = None, severity: int = 3,
           mixture_width: int = 3, chain_depth: int = -1, alpha: float = 1.0) -> torch.Tensor:
    """AugMix per sample (torchvision's defaults, bilinear warps): `mixture_width` chains of
    1-3 ops (or `chain_depth`) at a uniform magnitude bin below `severity`, mixed with the
    image by augmix_weights. uint8 (N,C,H,W).

    The chains are independent, so they run side by side as one batch of width * N rows (row
    i * N + j is chain i of sample j): one apply_ops call per step instead of one per chain."""
    n, _, h, w = x.shape
    dev = x.device
    rows = mixture_width * n
    table = _table("augmix", 10, h, w, dev)
    m0, weights = augmix_weights(n, mixture_width, alpha, dev, g)
    depth = (torch.full((rows,), chain_depth, device=dev) if chain_depth > 0
             else torch.randint(1, 4, (rows,), device=dev, generator=g))
    aug = x.repeat(mixture_width, 1, 1, 1)
    for step in range(chain_depth if chain_depth > 0 else 3):
        bins = torch.randint(severity, (rows,), device=dev, generator=g)
        op, magnitude, theta = _pick(table, rows, bins, g)
        aug = apply_ops(aug, torch.where(step < depth, op, OP["Identity"]), magnitude,
                        interpolation="bilinear", theta=theta)
    mix = m0.view(n, 1, 1, 1) * x
    weighted = torch.empty_like(mix)  # one buffer for the chains' weight * image
    for i, chain in enumerate(aug.split(n)):
        # torchvision's mix.add_(weight * aug), same roundings (an addcmul_ would fuse them)
        mix.add_(torch.mul(weights[:, i].view(n, 1, 1, 1), chain, out=weighted))
    return to_uint8(mix)


POLICIES = {"trivialaugment": trivial_augment, "randaugment": rand_augment,
            "autoaugment": auto_augment, "augmix": augmix}
