"""Mollification: schedules, DCT heat blur, Beta sampling and the Mollifier (docs/method.md)."""
import dataclasses
import math

import numpy as np
import pytest
import scipy.fft
import scipy.stats
import torch

from raymoll.config import ConfigError
from raymoll.mollify import (Mollifier, MollifyConfig, blur_sigma, blur_smoothing, heat_blur,
                             noise_coefficients, noise_smoothing, sample_beta)

K = 10


def make_mollifier(image_size: int = 16, **overrides) -> Mollifier:
    return Mollifier(dataclasses.replace(MollifyConfig(), **overrides), image_size, K)


def batch(n: int = 6, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


def reference_heat_blur(x: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """docs/method.md §5 written with scipy's orthonormal 2-D DCT-II."""
    n = x.shape[-1]
    freq = (np.pi * np.arange(n) / n) ** 2
    lam = freq[:, None] + freq[None, :]
    coeffs = scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")
    decayed = coeffs * np.exp(-lam * tau[:, None, None, None])
    return scipy.fft.idctn(decayed, axes=(-2, -1), norm="ortho")


# --- configuration -------------------------------------------------------------------------


def test_default_config_is_the_paper():
    c = MollifyConfig()
    assert c.enabled
    assert (c.p_clean, c.p_noise, c.p_blur, c.p_both) == pytest.approx((1 / 3, 1 / 3, 1 / 3, 0))
    assert (c.t_alpha, c.t_beta) == (1.0, 2.0)
    assert (c.noise_schedule, c.blur_schedule) == ("cosine", "loglinear")
    assert c.sigma_min == 0.3
    assert c.sigma_max == 0.0  # 0 = the image width
    assert (c.noise_smoothing_power, c.blur_smoothing_power) == (1.0, 1.0)
    assert make_mollifier(64).sigma_max == 64.0


# --- schedules -----------------------------------------------------------------------------


def test_blur_sigma_matches_paper_table_at_64px():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    table = [0.3, 0.5, 0.9, 1.5, 2.6, 4.4, 7.5, 12.8, 21.9, 37.4, 64.0]
    assert [round(s, 1) for s in blur_sigma(t, 0.3, 64.0).tolist()] == table


def test_blur_sigma_linear_schedule_interpolates_the_ends():
    t = torch.tensor([0.0, 0.5, 1.0])
    assert blur_sigma(t, 0.5, 32.0, "linear").tolist() == pytest.approx([0.5, 16.25, 32.0])


@pytest.mark.parametrize("schedule,shape", [("cosine", 1.0), ("linear", 1.0), ("power", 2.0),
                                            ("power", 0.5)])
def test_noise_schedules_are_variance_preserving(schedule, shape):
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    alpha, sigma = noise_coefficients(t, schedule, shape)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(t))
    assert (alpha[0], sigma[0]) == (1, 0)
    assert sigma[-1] == pytest.approx(1.0) and alpha[-1] == pytest.approx(0.0, abs=1e-12)


def test_noise_schedules_follow_their_definitions():
    t = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha, sigma = noise_coefficients(t)
    assert torch.allclose(alpha, torch.cos(math.pi * t / 2))
    assert torch.allclose(sigma, torch.sin(math.pi * t / 2))
    assert torch.allclose(noise_coefficients(t, "linear")[1] ** 2, t)
    assert torch.allclose(noise_coefficients(t, "power", 1.0)[1], sigma)
    assert torch.allclose(noise_coefficients(t, "power", 3.0)[1], torch.sin(math.pi / 2 * t**3))


def test_smoothing_weights_are_the_papers():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9], dtype=torch.float64)
    snr = torch.cos(math.pi * t / 2) ** 2 / torch.sin(math.pi * t / 2) ** 2
    assert torch.allclose(noise_smoothing(t), (1 + snr) ** -1.0)
    assert torch.allclose(noise_smoothing(t, power=2.0), (1 + snr) ** -2.0)
    assert noise_smoothing(torch.tensor([0.5])).item() == pytest.approx(0.5)
    assert torch.allclose(blur_smoothing(t), t)
    assert torch.allclose(blur_smoothing(t, 3.0), t**3)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        noise_coefficients(torch.zeros(2), "quadratic")
    with pytest.raises(ValueError, match="loglinear"):
        blur_sigma(torch.zeros(2), schedule="cubic")


# --- heat blur -----------------------------------------------------------------------------


def test_heat_blur_matches_scipy_reference():
    x, _ = batch(4, 12)
    tau = torch.tensor([0.0, 0.045, 2.0, 50.0])
    expected = reference_heat_blur(x.double().numpy(), tau.double().numpy())
    assert np.abs(heat_blur(x, tau).numpy() - expected).max() < 1e-5


def test_heat_blur_at_zero_returns_input():
    x, _ = batch(3)
    assert torch.equal(heat_blur(x, torch.zeros(3)), x)


def test_heat_blur_keeps_channel_means_and_loses_energy():
    x0, _ = batch(1, 16)
    tau = torch.tensor([0.0, 0.1, 0.5, 1.0, 4.0, 16.0, 64.0, 512.0])
    x = x0.expand(len(tau), -1, -1, -1)
    out = heat_blur(x, tau)
    assert torch.allclose(out.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-5)
    energy = out.pow(2).sum(dim=(1, 2, 3))
    assert (energy.diff() < 0).all()


def test_full_blur_leaves_almost_only_channel_means():
    # t = 1: sigma_B = image width, tau = 32^2 / 2 (docs/method.md §5).
    x, _ = batch(2, 32)
    out = heat_blur(x, torch.full((2,), 32.0**2 / 2))
    assert out.std(dim=(2, 3)).max() < 0.01 * x.std(dim=(2, 3)).min()


def test_heat_blur_is_differentiable():
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor([0.2, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(heat_blur, (x, tau))


def test_heat_blur_ignores_autocast_and_keeps_dtype():
    x, _ = batch(2)
    tau = torch.tensor([0.3, 3.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = heat_blur(x, tau)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, heat_blur(x, tau), atol=1e-6)
    assert heat_blur(x.bfloat16(), tau).dtype == torch.bfloat16


@pytest.mark.parametrize("shape,tau_len", [((2, 3, 16, 12), 2), ((3, 16, 16), 3),
                                           ((2, 3, 16, 16), 3)])
def test_heat_blur_refuses_bad_shapes(shape, tau_len):
    with pytest.raises(ValueError):
        heat_blur(torch.zeros(shape), torch.zeros(tau_len))


# --- Beta sampling -------------------------------------------------------------------------


# In closed form (a or b is 1) and by Gamma draws (the others).
@pytest.mark.parametrize("a,b", [(1.0, 2.0), (1.0, 9.0), (3.0, 1.0), (1.0, 1.0), (0.3, 0.7),
                                 (5.0, 1.5)])
def test_beta_samples_follow_scipy_beta(a, b):
    t = sample_beta(a, b, 20_000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() <= 1
    assert scipy.stats.kstest(t.double().numpy(), scipy.stats.beta(a, b).cdf).pvalue > 1e-3


def test_beta_samples_are_reproducible():
    draw = lambda seed: sample_beta(1.0, 2.0, 100, torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# --- Mollifier -----------------------------------------------------------------------------


@pytest.mark.parametrize("probs", [(1 / 3, 1 / 3, 1 / 3, 0.0), (0.1, 0.2, 0.3, 0.4)])
def test_role_frequencies_match_probabilities(probs):
    m = make_mollifier(p_clean=probs[0], p_noise=probs[1], p_blur=probs[2], p_both=probs[3])
    n = 60_000
    t, role = m.sample(n, "cpu", torch.Generator().manual_seed(0))
    counts = torch.bincount(role, minlength=4).numpy()
    used = np.array(probs) > 0
    assert (counts[~used] == 0).all()
    assert scipy.stats.chisquare(counts[used], n * np.array(probs)[used]).pvalue > 1e-3
    assert (t[role == 0] == 0).all() and (t[role != 0] > 0).all()


@pytest.mark.parametrize("probs", [(1 / 3, 1 / 3, 1 / 3, 0.0), (0.1, 0.2, 0.3, 0.4),
                                   (0.05, 0.0, 0.9, 0.05)])
@pytest.mark.parametrize("n", [7, 128])
def test_stratified_roles_have_exact_counts_and_per_sample_marginals(probs, n):
    """Per batch: each role's count is floor or ceil of n p_r, and the rows windows hold every
    blurred and noised sample; per sample (over many batches): role r with probability p_r."""
    m = make_mollifier(p_clean=probs[0], p_noise=probs[1], p_blur=probs[2], p_both=probs[3])
    g = torch.Generator().manual_seed(0)
    batches = 1500
    per_sample = torch.zeros(n, 4)
    blur_end, noise_start, rows_end = m.windows(n)
    for _ in range(batches):
        t, role, rows = m.sample_stratified(n, "cpu", g)
        counts = torch.bincount(role, minlength=4)
        expected = n * torch.tensor(probs, dtype=torch.float64)
        assert ((counts >= expected.floor() - 1e-9) & (counts <= expected.ceil() + 1e-9)).all()
        assert counts.sum() == n
        assert len(rows) == len(set(rows.tolist())) == rows_end
        for window, flag in ((rows[:blur_end], 2), (rows[noise_start:], 1)):
            covered = torch.zeros(n, dtype=torch.bool)
            covered[window] = True
            assert covered[(role & flag) != 0].all()
        assert (t[role == 0] == 0).all() and (t[role != 0] > 0).all()
        per_sample[torch.arange(n), role] += 1
    used = np.array(probs) > 0
    for i in (0, n - 1):  # a sample's marginal, first and last position
        counts = per_sample[i].numpy()
        assert (counts[~used] == 0).all()
        assert scipy.stats.chisquare(counts[used], batches * np.array(probs)[used]).pvalue > 1e-3
    total = per_sample.sum(0).numpy()
    assert np.allclose(total / (n * batches), probs, atol=0.5 / n / batches ** 0.5 + 1e-3)


@pytest.mark.parametrize("channels_last", [False, True])
def test_stratified_forward_equals_apply_for_the_same_draw(channels_last):
    m = make_mollifier(p_clean=0.2, p_noise=0.3, p_blur=0.3, p_both=0.2)
    x, y = batch(50)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_t, y_t = m(x, y, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    t, role, rows = m.sample_stratified(len(x), "cpu", g)
    noise_rows = rows[m.windows(len(x))[1]:]
    eps_rows = torch.randn((len(noise_rows), *x.shape[1:]), generator=g)
    eps = torch.zeros_like(x).index_copy(0, noise_rows, eps_rows)
    x_ref, y_ref = m.apply(x, y, t, role, eps=eps)
    torch.testing.assert_close(x_t, x_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(y_t, y_ref, rtol=0, atol=0)
    assert x_t.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("role_sampling", ["stratified", "iid"])
def test_gradients_flow_through_the_mollifier(role_sampling):
    """Differentiable in x on both paths (e.g. for adversarial inputs): the gradient of
    sum(x_t * w) is the mollifier's linear map applied to w, checked against finite
    differences in float64."""
    m = make_mollifier(p_clean=0.25, p_noise=0.25, p_blur=0.25, p_both=0.25,
                       role_sampling=role_sampling).double()  # its DCT basis too
    x, y = batch(6)
    x = x.double().requires_grad_()
    run = lambda images: m(images, y, torch.Generator().manual_seed(2))[0]
    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-5)


def test_sampled_times_follow_the_configured_beta():
    m = make_mollifier(p_clean=0.0, p_noise=0.5, p_blur=0.5, t_alpha=1.0, t_beta=4.0)
    t, _ = m.sample(20_000, "cpu", torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(t.double().numpy(), scipy.stats.beta(1, 4).cdf).pvalue > 1e-3


@pytest.mark.parametrize("t", [0.1, 0.5, 0.8])
def test_labels_get_exactly_the_papers_smoothing(t):
    m = make_mollifier()
    x, y = batch(4)
    role = torch.tensor([0, 1, 2, 3])
    _, y_t = m.apply(x, y, torch.full((4,), t), role)
    gamma_n, gamma_b = math.sin(math.pi * t / 2) ** 2, t
    expected_gamma = [0.0, gamma_n, gamma_b, 1 - (1 - gamma_n) * (1 - gamma_b)]
    gamma = (1 - y_t[torch.arange(4), y]) * K / (K - 1)  # y_t = (1 - g) onehot + g / K
    assert gamma.tolist() == pytest.approx(expected_gamma, abs=1e-6)
    assert torch.allclose(y_t.sum(dim=1), torch.ones(4))


def test_soft_labels_are_smoothed_further():
    m = make_mollifier()
    x, _ = batch(3)
    y = torch.softmax(torch.randn(3, K, generator=torch.Generator().manual_seed(1)), dim=1)
    t = torch.full((3,), 0.4)
    _, y_t = m.apply(x, y, t, torch.tensor([0, 1, 2]))
    gamma = torch.tensor([0.0, math.sin(math.pi * 0.2) ** 2, 0.4])[:, None]
    assert torch.allclose(y_t, (1 - gamma) * y + gamma / K, atol=1e-6)
    assert torch.allclose(y_t.sum(dim=1), torch.ones(3))


def test_each_role_applies_its_own_degradation():
    m = make_mollifier()
    x, y = batch(4)
    t = torch.full((4,), 0.3)
    x_t, _ = m.apply(x, y, t, torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(5))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    alpha, sigma = math.cos(math.pi * 0.3 / 2), math.sin(math.pi * 0.3 / 2)
    tau = torch.full((4,), (0.3 ** 0.7 * 16 ** 0.3) ** 2 / 2)  # sigma_B = sigma_min^(1-t) S^t
    blurred = torch.from_numpy(reference_heat_blur(x.double().numpy(), tau.double().numpy()))
    assert torch.equal(x_t[0], x[0])
    assert torch.allclose(x_t[1], alpha * x[1] + sigma * eps[1], atol=1e-6)
    assert torch.allclose(x_t[2], blurred[2].float(), atol=1e-5)
    assert torch.allclose(x_t[3], alpha * blurred[3].float() + sigma * eps[3], atol=1e-5)


SAMPLING = pytest.mark.parametrize("role_sampling", ["stratified", "iid"])


@SAMPLING
def test_noise_keeps_unit_variance(role_sampling):
    m = make_mollifier(p_clean=0.0, p_noise=1.0, p_blur=0.0, role_sampling=role_sampling)
    x, y = batch(256)
    x_t, _ = m(x, y, torch.Generator().manual_seed(1))
    assert x_t.var().item() == pytest.approx(1.0, abs=0.02)
    assert not torch.allclose(x_t, x)


@SAMPLING
def test_same_generator_same_output(role_sampling):
    m = make_mollifier(role_sampling=role_sampling)
    x, y = batch(32)
    first = m(x, y, torch.Generator().manual_seed(7))
    second = m(x, y, torch.Generator().manual_seed(7))
    third = m(x, y, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])


def test_disabled_mollifier_is_identity():
    m = make_mollifier(enabled=False)
    x, y = batch()
    x_t, y_t = m(x, y)
    assert x_t is x
    assert torch.equal(y_t, torch.eye(K)[y])
    soft = torch.full((len(x), K), 1 / K)
    assert torch.equal(m(x, soft)[1], soft)


def test_buffers_follow_the_module_and_stay_out_of_checkpoints():
    m = make_mollifier().to(torch.device("meta"))
    assert {b.device.type for b in m.buffers()} == {"meta"}
    assert make_mollifier().state_dict() == {}


@SAMPLING
def test_no_graph_breaks(role_sampling):
    m = make_mollifier(p_both=0.25, p_clean=0.25, p_noise=0.25, p_blur=0.25,
                       role_sampling=role_sampling)
    x, y = batch(8)
    explanation = torch._dynamo.explain(m)(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@SAMPLING
def test_fullgraph_compile_matches_eager(role_sampling):
    m = make_mollifier(p_both=0.25, p_clean=0.25, p_noise=0.25, p_blur=0.25,
                       role_sampling=role_sampling)
    x, y = batch(8)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.manual_seed(3)
    x_c, y_c = compiled(x, y)
    torch.manual_seed(3)
    x_e, y_e = m(x, y)
    assert torch.equal(x_c, x_e) and torch.equal(y_c, y_e)


def test_bad_inputs_are_refused():
    m = make_mollifier(16)
    x, y = batch(4, 16)
    with pytest.raises(ValueError, match="square"):
        m(torch.zeros(4, 3, 16, 12), y)
    with pytest.raises(ValueError, match="16 x 16"):
        m(torch.zeros(4, 3, 8, 8), y)
    with pytest.raises(ValueError, match="float"):
        m(x.to(torch.uint8), y)
    with pytest.raises(ValueError, match="labels"):
        m(x, torch.zeros(4, K + 1))
    with pytest.raises(ValueError, match="shape"):
        m.apply(x, y, torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="sum to 1"):
        make_mollifier(p_clean=0.5, p_noise=0.5, p_blur=0.5)
    with pytest.raises(ConfigError, match="sigma_min"):
        make_mollifier(8, sigma_min=10.0)  # sigma_max = 0 means the image width, 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@SAMPLING
def test_cuda_runs_without_host_syncs(role_sampling):
    m = make_mollifier(role_sampling=role_sampling).cuda()
    x, y = batch(16)
    x, y = x.cuda(), y.cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    m(x, y, generator)  # warm-up: the first call may allocate and initialise
    torch.cuda.set_sync_debug_mode("error")
    try:
        x_t, y_t = m(x, y, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x_t.device == x.device and torch.allclose(y_t.sum(dim=1), torch.ones_like(y_t[:, 0]))


def test_channels_last_input_gives_channels_last_output():
    m = Mollifier(MollifyConfig(), image_size=8, num_classes=3)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    x_t, _ = m(x, torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    assert x_t.is_contiguous(memory_format=torch.channels_last)
    x_t, _ = m(x.contiguous(), torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    assert x_t.is_contiguous()
