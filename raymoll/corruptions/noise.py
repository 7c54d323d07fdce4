"""Noise corruptions: gaussian, shot, impulse (test) and speckle (validation).

Each takes x float (N, 3, H, W) in [0, 1], the severity's parameter and a torch.Generator on
x's device, and returns float images that corrupt() clips. They match the reference exactly in
distribution; only the random number generator differs.
"""
import torch

from .kernels import normal


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """x + N(0, std^2), independently per value."""
    return x + normal(x.shape, 0.0, std, x, generator)


def shot_noise(x: torch.Tensor, rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Poisson(x * rate) / rate: photon counting noise at `rate` photons per unit intensity."""
    return torch.poisson(x * rate, generator=generator) / rate


def impulse_noise(x: torch.Tensor, amount: float, generator: torch.Generator | None) -> torch.Tensor:
    """Salt and pepper (skimage.util.random_noise, mode "s&p"): a fraction `amount` of the
    values, chosen independently per value, is set to 0 or 1 with equal probability."""
    hit = torch.rand(x.shape, generator=generator, device=x.device) < amount
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    return torch.where(hit, salt.to(x.dtype), x)


def speckle_noise(x: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """x + x * N(0, std^2): multiplicative noise."""
    return x + x * normal(x.shape, 0.0, std, x, generator)
