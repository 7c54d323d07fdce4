"""Data mollification coupled with label smoothing (docs/method.md), on batched tensors.

Schedules map a time t in [0, 1] to noise coefficients, a blur width and a label-smoothing
weight. `heat_blur` solves the heat equation in the DCT domain. `Mollifier` draws a role and a
time per sample and applies all of it on the device with no host syncs and no data-dependent
branches, so the module compiles to one graph. By default (mollify.role_sampling=stratified) a
batch's role counts are fixed up to one sample per role and the roles are dealt out in a random
order, so the blur and the noise run only on fixed-size windows of rows; `Mollifier.apply` is the
general path, every sample through every op with its own coefficients.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from raymoll.config import Config, ConfigError, MollifyConfig, validate

__all__ = ["MollifyConfig", "Mollifier", "heat_blur", "blur_sigma", "noise_coefficients",
           "noise_smoothing", "blur_smoothing", "sample_beta"]

# Roles are bit flags: BOTH = NOISE | BLUR (blur, then noise).
CLEAN, NOISE, BLUR, BOTH = 0, 1, 2, 3
NOISE_SCHEDULES = ("cosine", "linear", "power")
BLUR_SCHEDULES = ("loglinear", "linear")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}.")


# ---------------------------------------------------------------------------------------------
# Schedules: t (N,) float in [0, 1] -> coefficients (N,)


def noise_coefficients(t: Tensor, schedule: str = "cosine",
                       shape: float = 1.0) -> tuple[Tensor, Tensor]:
    """(alpha_t, sigma_t) of x_t = alpha_t x + sigma_t eps; all variance preserving.

    cosine (paper): alpha = cos(pi t / 2), sigma = sin(pi t / 2); linear: sigma^2 = t;
    power: sigma = sin(pi/2 t^shape), which is cosine at shape = 1.
    """
    _check_choice("noise schedule", schedule, NOISE_SCHEDULES)
    if schedule == "linear":
        return torch.sqrt(1 - t), torch.sqrt(t)
    angle = (math.pi / 2) * (t if schedule == "cosine" else t ** shape)
    return torch.cos(angle), torch.sin(angle)


def blur_sigma(t: Tensor, sigma_min: float = 0.3, sigma_max: float = 32.0,
               schedule: str = "loglinear") -> Tensor:
    """Blur width sigma_B(t) in pixels; loglinear (paper) interpolates log sigma linearly."""
    _check_choice("blur schedule", schedule, BLUR_SCHEDULES)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"blur widths must satisfy 0 < sigma_min < sigma_max, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}.")
    if schedule == "linear":
        return sigma_min + t * (sigma_max - sigma_min)
    return torch.exp((1 - t) * math.log(sigma_min) + t * math.log(sigma_max))


def noise_smoothing(t: Tensor, power: float = 1.0, schedule: str = "cosine",
                    shape: float = 1.0) -> Tensor:
    """Label-smoothing weight of a noised sample: (1 + SNR)^-power = sigma_t^(2 power)."""
    _, sigma = noise_coefficients(t, schedule, shape)
    return sigma ** (2 * power)


def blur_smoothing(t: Tensor, power: float = 1.0) -> Tensor:
    """Label-smoothing weight of a blurred sample: t^power."""
    return t ** power


# ---------------------------------------------------------------------------------------------
# Heat blur in the DCT domain


def _dct_basis(n: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Orthonormal DCT-II matrix D (n, n), X = D x D^T for an (n, n) image x, and the heat
    eigenvalues l of one axis (n,), in 1/pixels^2: frequency (i, j) decays as
    exp(-(l_i + l_j) tau)."""
    k = torch.arange(n, device=device, dtype=torch.float64)
    dct = torch.cos(math.pi * (k[None, :] + 0.5) * k[:, None] / n) * math.sqrt(2 / n)
    dct[0] /= math.sqrt(2)
    return dct.to(dtype), ((math.pi * k / n) ** 2).to(dtype)


_cached_dct_basis = functools.cache(_dct_basis)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; half precisions are promoted to float32."""
    return torch.promote_types(dtype, torch.float32)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images of shape (N, C, H, W), got a {x.dtype} tensor "
                         f"of shape {tuple(x.shape)}; convert uint8 images to float and "
                         "normalise them first.")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"the DCT heat blur needs square images (H == W), got H={x.shape[-2]}, "
                         f"W={x.shape[-1]}; crop or resize them to a square first.")


def _blur(x: Tensor, tau: Tensor, dct: Tensor, eigenvalues: Tensor,
          out: Tensor | None = None) -> Tensor:
    """heat_blur given the basis; samples with tau == 0 come back bit for bit.

    The decay exp(-(l_i + l_j) tau) factors into one per axis, a = exp(-l tau), so the blur is
    K x K with K = D^T diag(a) D (symmetric, (n, n) per sample, shared by the channels): two
    matrix products per image instead of the four of DCT, decay, inverse DCT. Both are single
    batched products, with no copy of K per channel, when the image's memory is laid out
    (N, H, C, W) (row h of every channel together): x K multiplies every (h, c) row, K (x K)
    every column of the (H, C*W) matrix. The Mollifier gathers its rows in that layout; other
    layouts are copied into it once. The result has that layout too (x's shape); `out`, if
    given, receives it instead (it may be x itself).
    """
    # Autocast would run the matmuls in bf16, whose rounding error is larger than the blur at
    # small tau; the basis already has the compute dtype.
    with torch.autocast(x.device.type, enabled=False):
        n, c, s, _ = x.shape
        decay = torch.exp(-eigenvalues * tau.to(dct.dtype)[:, None])  # (N, S)
        kernel = (dct.T * decay[:, None, :]) @ dct  # (N, S, S)
        rows = x.to(dct.dtype).permute(0, 2, 1, 3).contiguous()  # (N, H, C, W); free if so laid
        right = torch.bmm(rows.view(n, s * c, s), kernel)  # x K
        blurred = torch.bmm(kernel, right.view(n, s, c * s)).view(n, s, c, s).to(x.dtype)
    # In (N, H, C, W) terms throughout: the selection is per sample, whatever the layout.
    blurred_rows, x_rows = tau[:, None, None, None] > 0, x.permute(0, 2, 1, 3)
    if x.requires_grad or blurred.requires_grad:
        # Autograd refuses out= arguments: a differentiated blur gets a new buffer.
        kept = torch.where(blurred_rows, blurred, x_rows).permute(0, 2, 1, 3)
        return kept if out is None else out.copy_(kept)
    # Into `blurred` (ours, x's dtype) unless told otherwise: no second buffer of the batch's
    # size. Compiled graphs take only contiguous out= tensors, hence out's (N, H, C, W) view.
    target = blurred if out is None else out.permute(0, 2, 1, 3)
    return torch.where(blurred_rows, blurred, x_rows, out=target).permute(0, 2, 1, 3)


def heat_blur(x: Tensor, tau: Tensor) -> Tensor:
    """Heat-equation blur: IDCT(exp(-Lambda tau) * DCT(x)) per channel (docs/method.md §5).

    x: (N, C, H, W) float with H == W; tau: (N,) >= 0, the diffusion time (sigma_B^2 / 2, in
    pixels^2). Returns x's shape and dtype, its memory laid out (N, H, C, W) as the blur's
    products leave it (`.contiguous()` gives NCHW); each channel keeps its mean; tau == 0
    returns x. Runs in float32 (float64 for float64 input) even under autocast.
    """
    _check_images(x)
    if tau.shape != x.shape[:1]:
        raise ValueError(f"tau must have shape (N,) = ({x.shape[0]},), got {tuple(tau.shape)}.")
    dct, eigenvalues = _cached_dct_basis(x.shape[-1], x.device, _compute_dtype(x.dtype))
    return _blur(x, tau, dct, eigenvalues)


# ---------------------------------------------------------------------------------------------
# Sync-free Beta sampling with a torch.Generator

# Marsaglia-Tsang rejects at most 4.9% of candidates (at shape 1; fewer above), so with 16
# candidates per draw all are rejected with probability < 0.049^16 < 1e-20 per sample.
_GAMMA_CANDIDATES = 16


def _log_gamma_pair(a: float, b: float, n: int, generator: torch.Generator | None,
                    device: torch.device) -> Tensor:
    """log of n draws each from Gamma(a, 1) and Gamma(b, 1): float32 (2, n), without host syncs.

    Marsaglia & Tsang (2000) at shape + 1 >= 1, boosted to the shape by G_s = G_{s+1} U^(1/s)
    (their §6), in log space so small shapes do not underflow. Rejection sampling takes a random
    number of rounds; a fixed number of candidates, keeping the first accepted one, keeps shapes
    static. Should all be rejected (see _GAMMA_CANDIDATES) candidate 0 is kept regardless. Both
    shapes share every kernel launch: the mollifier runs this once per batch.
    """
    # The shapes as a device tensor built by arithmetic: copying a list to the GPU would sync.
    shape = a + (b - a) * torch.arange(2, device=device, dtype=torch.float32)[:, None]
    d = shape + 2 / 3  # (shape + 1) - 1/3
    c = torch.rsqrt(9 * d)[:, :, None]
    size = (2, n, _GAMMA_CANDIDATES)
    z = torch.randn(size, generator=generator, device=device)
    log_u = torch.log1p(-torch.rand(size, generator=generator, device=device))  # u in (0, 1]
    cz1 = 1 + c * z
    log_v = 3 * torch.log(cz1.clamp_min(1e-30))  # v = (1 + c z)^3, > 0 when accepted
    dd = d[:, :, None]
    accepted = (cz1 > 0) & (log_u < 0.5 * z**2 + dd - dd * log_v.exp() + dd * log_v)
    first = accepted.to(torch.float32).argmax(dim=2, keepdim=True)
    log_boost = torch.log1p(-torch.rand((2, n), generator=generator, device=device)) / shape
    return torch.log(d) + log_v.gather(2, first).squeeze(2) + log_boost


def sample_beta(a: float, b: float, n: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> Tensor:
    """n draws from Beta(a, b), float32 (n,) in [0, 1], reproducible given `generator`.

    Where a or b is 1 (the paper's Beta(1, 2) among them) the CDF inverts in closed form, one
    uniform per draw; otherwise two Gamma draws (_log_gamma_pair).
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta parameters must be positive, got a={a}, b={b}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if b == 1:  # CDF t^a: t = u^(1/a), u in (0, 1] so that t > 0
        return torch.exp(torch.log1p(-torch.rand(n, generator=generator, device=device)) / a)
    if a == 1:  # CDF 1 - (1 - t)^b: t = 1 - u^(1/b), u in [0, 1) so that t > 0
        return -torch.expm1(torch.log(torch.rand(n, generator=generator, device=device)) / b)
    log_ga, log_gb = _log_gamma_pair(a, b, n, generator, device)
    return torch.sigmoid(log_ga - log_gb)  # G_a / (G_a + G_b)


# ---------------------------------------------------------------------------------------------
# The mollifier


def _soft_labels(y: Tensor, n: int, num_classes: int) -> Tensor:
    """Integer labels (N,) or soft labels (N, K) -> float32 (N, K)."""
    if y.is_floating_point() and y.shape == (n, num_classes):
        return y.to(torch.float32)
    if not y.is_floating_point() and y.shape == (n,):
        # A comparison, not F.one_hot: one_hot checks the label range on the host (a sync).
        return (y[:, None] == torch.arange(num_classes, device=y.device)).to(torch.float32)
    raise ValueError(f"labels must be integer classes of shape ({n},) or soft labels of shape "
                     f"({n}, {num_classes}) in a float dtype, got a {y.dtype} tensor of shape "
                     f"{tuple(y.shape)}.")


class Mollifier(nn.Module):
    """Mollifies a training batch and smooths its labels to match (docs/method.md §2-§6).

    Each sample gets a role, 0 clean, 1 noise, 2 blur or 3 both (blur then noise), with
    probabilities (p_clean, p_noise, p_blur, p_both), and a time t ~ Beta(t_alpha, t_beta)
    (t = 0 when clean). Labels become y_t = (1 - gamma) y + gamma / K, with gamma = gamma_n for
    noise, gamma_b for blur and 1 - (1 - gamma_b)(1 - gamma_n) for both.
    """

    def __init__(self, cfg: MollifyConfig, image_size: int, num_classes: int) -> None:
        super().__init__()
        validate(Config(mollify=cfg))  # ranges and probabilities summing to 1, as ConfigError
        if image_size < 1 or num_classes < 2:
            raise ValueError(f"Mollifier needs image_size >= 1 and num_classes >= 2, got "
                             f"image_size={image_size}, num_classes={num_classes}.")
        self.cfg = cfg
        self.image_size = image_size
        self.num_classes = num_classes
        self.sigma_max = cfg.sigma_max or float(image_size)
        if cfg.sigma_min >= self.sigma_max:
            raise ConfigError(f"config key 'mollify.sigma_min' = {cfg.sigma_min!r} must be "
                              f"smaller than sigma_max = {self.sigma_max!r} (mollify.sigma_max, "
                              f"or the image width {image_size} when it is 0).")
        probs = [cfg.p_clean, cfg.p_noise, cfg.p_blur, cfg.p_both]
        # Role boundaries in [0, 1]: a uniform u falls in role r when it passes r boundaries.
        # Dividing by the same running sum makes the last boundary exactly 1, so a zero p_both
        # is never drawn through rounding.
        cumulative = [sum(probs[:i + 1]) / sum(probs) for i in range(3)]
        dct, eigenvalues = _dct_basis(image_size, torch.device("cpu"), torch.float32)
        # Derived constants, not state: non-persistent buffers follow .to(device) and stay out
        # of checkpoints.
        self.register_buffer("role_bounds", torch.tensor(cumulative), persistent=False)
        # Stratified roles are dealt in the order blur, both, noise, clean, so that the rows
        # that are blurred (blur, both) and those that are noised (both, noise) are each one
        # run of consecutive positions.
        dealt = [cfg.p_blur, cfg.p_both, cfg.p_noise, cfg.p_clean]
        self.dealt_bounds = [sum(dealt[:i + 1]) / sum(dealt) for i in range(3)]
        self.register_buffer("dealt_bounds_t", torch.tensor(self.dealt_bounds, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("dealt_roles", torch.tensor([BLUR, BOTH, NOISE, CLEAN]),
                             persistent=False)
        self.register_buffer("dct", dct, persistent=False)
        self.register_buffer("eigenvalues", eigenvalues, persistent=False)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"enabled={c.enabled}, roles(clean, noise, blur, both)=({c.p_clean:.3g}, "
                f"{c.p_noise:.3g}, {c.p_blur:.3g}, {c.p_both:.3g}), "
                f"t~Beta({c.t_alpha:g}, {c.t_beta:g}), image_size={self.image_size}")

    def sample(self, n: int, device: torch.device | str,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Roles int64 (n,) and times float32 (n,), t = 0 for clean samples; returns (t, role)."""
        u = torch.rand(n, generator=generator, device=device)
        role = (u[:, None] >= self.role_bounds.to(device)).sum(dim=1)
        t = sample_beta(self.cfg.t_alpha, self.cfg.t_beta, n, generator, device)
        return torch.where(role == CLEAN, 0.0, t), role

    def windows(self, n: int) -> tuple[int, int, int]:
        """(blur_end, noise_start, rows_end): in the dealt order of a stratified batch of n,
        positions [0, blur_end) hold every blurred sample, [noise_start, rows_end) every
        noised one, and [rows_end, n) only clean ones; fixed by n (see sample_stratified)."""
        b1, b2, b3 = (n * b for b in self.dealt_bounds)
        # Position i holds the role whose run contains i + u, u ~ U[0, 1): a run [lo, hi)
        # can only fill positions floor(lo) .. ceil(hi) - 1.
        return min(n, math.ceil(b2)), min(n, math.floor(b1)), min(n, math.ceil(b3))

    def sample_stratified(self, n: int, device: torch.device | str,
                          generator: torch.Generator | None = None
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """Stratified roles: returns (t, role, rows).

        Systematic sampling deals the roles to n positions: position i gets the role whose
        share of [0, n) (in the order blur, both, noise, clean) contains i + u, one u ~ U[0, 1)
        per batch, so role r gets floor or ceil of n p_r positions, n p_r on average. A random
        permutation then maps positions to samples: each sample has role r with probability
        exactly p_r, as with iid draws, but the batch's counts no longer vary. rows (int64, of
        length rows_end, fixed by n) are the samples at positions [0, rows_end) in dealt order:
        rows[:blur_end] a superset of the blurred samples, rows[noise_start:] of the noised
        ones (`windows`; the others there get no-op coefficients).
        """
        u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        position = torch.arange(n, device=device, dtype=torch.float64) + u
        dealt = (position[:, None] >= self.dealt_bounds_t.to(device) * n).sum(dim=1)
        order = torch.randperm(n, generator=generator, device=device)
        role = torch.empty(n, dtype=torch.int64, device=device)
        role[order] = self.dealt_roles.to(device)[dealt]
        t = sample_beta(self.cfg.t_alpha, self.cfg.t_beta, n, generator, device)
        return torch.where(role == CLEAN, 0.0, t), role, order[:self.windows(n)[2]]

    def _coefficients(self, t: Tensor, role: Tensor, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per sample: blur time tau (N,), noise alpha and sigma (N,1,1,1) of `dtype`, and the
        label-smoothing weight gamma (N,1); no-op values where the role does not ask."""
        c = self.cfg
        noised = (role & NOISE) != 0
        blurred = (role & BLUR) != 0
        tau = torch.where(blurred, blur_sigma(t, c.sigma_min, self.sigma_max,
                                              c.blur_schedule) ** 2 / 2, 0.0)
        alpha_t, sigma_t = noise_coefficients(t, c.noise_schedule, c.noise_shape)
        alpha = torch.where(noised, alpha_t, 1.0)[:, None, None, None].to(dtype)
        sigma = torch.where(noised, sigma_t, 0.0)[:, None, None, None].to(dtype)
        # noise_smoothing(t), reusing sigma_t: on a GPU each small op is a kernel launch.
        gamma_n = torch.where(noised, sigma_t ** (2 * c.noise_smoothing_power), 0.0)
        gamma_b = torch.where(blurred, blur_smoothing(t, c.blur_smoothing_power), 0.0)
        return tau, alpha, sigma, (1 - (1 - gamma_b) * (1 - gamma_n))[:, None]

    def _checked(self, x: Tensor, y: Tensor, t: Tensor, role: Tensor) -> Tensor:
        self._check_batch(x)
        n = x.shape[0]
        if t.shape != (n,) or role.shape != (n,):
            raise ValueError(f"t and role must have shape ({n},), got {tuple(t.shape)} and "
                             f"{tuple(role.shape)}.")
        return _soft_labels(y, n, self.num_classes)

    def _finish(self, x: Tensor, x_t: Tensor, y: Tensor, gamma: Tensor) -> tuple[Tensor, Tensor]:
        # The blur's matrix products leave their own layout; give the model back the one it
        # was fed (channels_last convolutions are faster, on GPUs and on the CPU alike).
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        x_t = x_t.contiguous(memory_format=torch.channels_last if channels_last
                             else torch.contiguous_format)
        return x_t, (1 - gamma) * y + gamma / self.num_classes

    def apply(self, x: Tensor, y: Tensor, t: Tensor, role: Tensor,
              generator: torch.Generator | None = None,
              eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mollify x (N, C, S, S) float and smooth y (N,) int or (N, K) soft, given t and role.

        t (N,) in [0, 1] and role (N,) int are not range-checked (that would sync the host).
        eps: the noise (x's shape), drawn from `generator` when None. Every sample runs every
        op; the roles only pick coefficients that make an op a no-op. Returns x_t, x's shape
        and dtype, and y_t float32 (N, K) with rows summing to 1.
        """
        y = self._checked(x, y, t, role)
        tau, alpha, sigma, gamma = self._coefficients(t, role, x.dtype)
        if eps is None:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_t = alpha * _blur(x, tau, self.dct, self.eigenvalues) + sigma * eps
        return self._finish(x, x_t, y, gamma)

    def apply_rows(self, x: Tensor, y: Tensor, t: Tensor, role: Tensor, rows: Tensor,
                   eps: Tensor) -> tuple[Tensor, Tensor]:
        """`apply` that touches only x[rows], in the dealt order of sample_stratified: it blurs
        rows[:blur_end] and noises rows[noise_start:] with eps (len(rows) - noise_start, C, S,
        S) (`windows`). The same result as apply(..., eps=E) where E holds eps at
        rows[noise_start:], provided the windows hold every blurred and every noised sample."""
        y = self._checked(x, y, t, role)
        tau, alpha, sigma, gamma = self._coefficients(t, role, x.dtype)
        blur_end, noise_start, _ = self.windows(len(x))
        # The rows, gathered once (a copy of ours) and laid out (R, H, C, W) as the blur's
        # products want them; both windows are slices of it, and everything happens in place.
        work = x.permute(0, 2, 1, 3).index_select(0, rows).permute(0, 2, 1, 3)
        blurred = work[:blur_end]
        _blur(blurred, tau.index_select(0, rows[:blur_end]), self.dct, self.eigenvalues,
              out=blurred)
        noised, noise_rows = work[noise_start:], rows[noise_start:]
        noised.mul_(alpha.index_select(0, noise_rows))
        noised.addcmul_(sigma.index_select(0, noise_rows), eps)
        x_t = x.clone()  # x's layout: channels_last stays channels_last
        x_t.permute(0, 2, 1, 3).index_copy_(0, rows, work.permute(0, 2, 1, 3))
        return self._finish(x, x_t, y, gamma)

    def forward(self, x: Tensor, y: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw roles and times (as mollify.role_sampling says), then mollify; when disabled
        returns x and y as (N, K) float32."""
        self._check_batch(x)
        if not self.cfg.enabled:
            return x, _soft_labels(y, x.shape[0], self.num_classes)
        if self.cfg.role_sampling == "iid":
            t, role = self.sample(x.shape[0], x.device, generator)
            return self.apply(x, y, t, role, generator)
        t, role, rows = self.sample_stratified(x.shape[0], x.device, generator)
        noise_start = self.windows(x.shape[0])[1]
        eps = torch.randn((len(rows) - noise_start, *x.shape[1:]), generator=generator,
                          device=x.device, dtype=x.dtype)
        return self.apply_rows(x, y, t, role, rows, eps)

    def _check_batch(self, x: Tensor) -> None:
        _check_images(x)
        if x.shape[-1] != self.image_size:
            raise ValueError(f"this Mollifier was built for {self.image_size} x "
                             f"{self.image_size} images, got {x.shape[-2]} x {x.shape[-1]}.")
