"""The batched policies against torchvision v2's definitions: each op at the same parameters,
the op spaces and magnitude bins, the draw frequencies, and BatchAugment's order and seeding."""
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2

from raymoll.data import BatchAugment, flip_crop_rotate
from raymoll.data import policies as P

# Magnitudes as torchvision's policies produce them (float32 bins, signs, the extremes, the
# rotations that take torchvision's rot90 fast path).
MAGNITUDES = {
    "Identity": [0.0], "ShearX": [0.3, -0.99, 0.5], "ShearY": [0.2, -0.7],
    "TranslateX": [9.6, -3.0, 32.0], "TranslateY": [5.5, -14.2],
    "Rotate": [30.0, -135.0, 90.0, -90.0, 180.0, 4.5], "Brightness": [0.5, -0.9, 0.33],
    "Color": [0.9, -0.5], "Contrast": [0.7, -0.66], "Sharpness": [0.9, -0.99, 0.3],
    "Posterize": [4, 2, 7], "Solarize": [0.5, 0.0, 1.0, 0.3, 0.6, 0.2], "AutoContrast": [0.0],
    "Equalize": [0.0], "Invert": [0.0]}
CASES = [(name, m) for name, ms in MAGNITUDES.items() for m in ms]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8)
    x[:4] = x[:4] // 4 + 60  # low contrast, so autocontrast and equalize have work to do
    x[4] = 77  # flat: equalize and autocontrast leave it
    return x


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("name,magnitude", CASES)
def test_each_op_equals_torchvision(images, name, magnitude, interpolation):
    """Exact on uint8, the nearest warps included. A bilinear warp (AugMix's) is within one grey
    level on under 1% of pixels: torchvision builds its sampling grid with a bmm, which fuses
    multiply-adds on some CPUs (AVX-512) and not on others, and the last bit of a coordinate
    can move a value across a rounding boundary."""
    magnitude = float(torch.tensor(magnitude, dtype=torch.float32))
    policy = v2.TrivialAugmentWide()
    expected = torch.stack([policy._apply_image_or_video_transform(
        image, name, magnitude, interpolation=interpolation, fill=policy._fill)
        for image in images])
    n = len(images)
    out = P.apply_ops(images, torch.full((n,), P.OP[name]),
                      torch.full((n,), magnitude, dtype=torch.float64), interpolation)
    if interpolation == "nearest":
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    else:
        difference = (out.int() - expected.int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


@pytest.mark.parametrize("grouped", [True, False])
def test_mixed_ops_in_one_batch_equal_torchvision_per_image(images, grouped):
    """Every sample its own op and magnitude in one call: grouped by stage (the CPU's path) and
    every stage on every row (an accelerator's path, run here on the CPU)."""
    g = torch.Generator().manual_seed(3)
    n = len(images)
    op = (torch.arange(n) % len(P.OPS))[torch.randperm(n, generator=g)]  # every op, mixed
    choices = [MAGNITUDES[P.OPS[o]] for o in op.tolist()]
    magnitude = torch.tensor([float(torch.tensor(c[i % len(c)])) for i, c in enumerate(choices)],
                             dtype=torch.float64)
    policy = v2.TrivialAugmentWide()
    expected = torch.stack([policy._apply_image_or_video_transform(
        image, P.OPS[o], float(m), interpolation="nearest", fill=policy._fill)
        for image, o, m in zip(images, op.tolist(), magnitude.tolist())])
    torch.testing.assert_close(P.apply_ops(images, op, magnitude, grouped=grouped), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("space,policy,bins", [
    (P._TRIVIAL_SPACE, v2.TrivialAugmentWide, 31), (P._RANDAUGMENT_SPACE, v2.RandAugment, 31),
    (P._AUTOAUGMENT_SPACE, v2.AutoAugment, 10), (P._AUGMIX_SPACE, v2.AugMix, 10)])
def test_op_spaces_and_magnitude_bins_are_torchvisions(space, policy, bins):
    assert set(space) == set(policy._AUGMENTATION_SPACE)
    for name, (magnitudes, signed) in policy._AUGMENTATION_SPACE.items():
        expected = magnitudes(bins, 32, 24)
        got = space[name](bins, 32, 24)
        if expected is None:
            assert (got == 0).all()
        else:
            torch.testing.assert_close(got, expected.double(), rtol=0, atol=0)
        assert (name in P.SIGNED) == signed


def test_autoaugment_sub_policies_are_torchvisions():
    for key, policy in (("cifar10", v2.AutoAugmentPolicy.CIFAR10),
                        ("imagenet", v2.AutoAugmentPolicy.IMAGENET)):
        assert P.AUTOAUGMENT_POLICIES[key] == v2.AutoAugment(policy)._policies


@pytest.mark.parametrize("space,bins", [("trivialaugment", 31), ("randaugment", 31),
                                        ("augmix", 10)])
def test_op_and_magnitude_frequencies_are_uniform(space, bins):
    """Chi-square over a large batch: op uniform over the space, bin uniform (TrivialAugment's
    draw), sign 1/2 for the signed ops."""
    g = torch.Generator().manual_seed(0)
    n = 60_000
    table = P._table(space, bins, 32, 32, torch.device("cpu"))
    drawn_bins = torch.randint(bins, (n,), generator=g)
    op, magnitude, theta = P._pick(table, n, drawn_bins, g)
    counts = torch.bincount(op, minlength=len(P.OPS))[[P.OP[name] for name in P._SPACES[space]]]
    assert counts.sum() == n
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    bin_counts = torch.bincount(drawn_bins, minlength=bins)
    assert stats.chisquare(bin_counts.numpy()).pvalue > 1e-3
    signed = torch.isin(op, torch.tensor([P.OP[s] for s in P.SIGNED])) & (magnitude != 0)
    negative = (magnitude[signed] < 0).sum().item()
    assert stats.binomtest(negative, signed.sum().item()).pvalue > 1e-3
    # The magnitude is the drawn bin's value of the drawn op.
    row = {P.OP[name]: i for i, name in enumerate(P._SPACES[space])}
    expected = table[1][[row[o] for o in op.tolist()], drawn_bins]
    torch.testing.assert_close(magnitude.abs(), expected.abs(), rtol=0, atol=0)
    # The looked-up affine matrices are the drawn (op, signed magnitude)'s.
    torch.testing.assert_close(theta, P._affine_theta(op, magnitude, 32, 32), rtol=0, atol=0)


@pytest.mark.parametrize("policy", ["cifar10", "imagenet"])
def test_autoaugment_op_frequencies_follow_the_policy(policy):
    """Chi-square per slot: P(op) = mean over sub-policies of its probability (+ Identity)."""
    g = torch.Generator().manual_seed(1)
    n = 60_000
    subs = P.AUTOAUGMENT_POLICIES[policy]
    for slot, (op, _, _) in enumerate(P.autoaugment_draw(n, 32, 32, torch.device("cpu"), g,
                                                         policy)):
        expected = torch.zeros(len(P.OPS), dtype=torch.float64)
        for sub in subs:
            name, p, _ = sub[slot]
            expected[P.OP[name]] += p / len(subs)
            expected[P.OP["Identity"]] += (1 - p) / len(subs)
        used = expected > 0
        counts = torch.bincount(op, minlength=len(P.OPS))
        assert counts[~used].sum() == 0
        assert stats.chisquare(counts[used].numpy(), (expected[used] * n).numpy()).pvalue > 1e-3


def test_augmix_weights_follow_beta_and_dirichlet():
    m0, w = P.augmix_weights(40_000, 3, 1.0, torch.device("cpu"), torch.Generator().manual_seed(0))
    torch.testing.assert_close(m0 + w.sum(1), torch.ones_like(m0))
    assert stats.kstest(m0.numpy(), stats.beta(1, 1).cdf).pvalue > 1e-3
    # Dirichlet(1, 1, 1)'s marginal is Beta(1, 2)
    assert stats.kstest((w[:, 0] / (1 - m0)).numpy(), stats.beta(1, 2).cdf).pvalue > 1e-3


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment", "autoaugment", "augmix"])
def test_policies_are_seeded_by_the_generator(images, name):
    augment = BatchAugment(name, torch.Generator().manual_seed(5))
    first = augment(images)
    augment.generator.manual_seed(5)
    assert torch.equal(augment(images), first)
    assert first.dtype == torch.uint8 and first.shape == images.shape
    assert not torch.equal(augment(images), first)  # a fresh draw


def test_fcr_then_trivialaugment_applies_both_in_order(images):
    seed = 11
    augment = BatchAugment(["fcr", "trivialaugment"], torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    expected = P.trivial_augment(flip_crop_rotate(images, generator=g), g)
    assert torch.equal(augment(images), expected)
    g = torch.Generator().manual_seed(seed)
    swapped = flip_crop_rotate(P.trivial_augment(images, g), generator=g)
    augment.generator.manual_seed(seed)
    assert not torch.equal(augment(images), swapped)


def test_autoaugment_picks_the_cifar10_policy_for_small_images(images):
    g = torch.Generator().manual_seed(2)
    expected = P.auto_augment(images, g, policy="cifar10")
    assert torch.equal(BatchAugment("autoaugment", torch.Generator().manual_seed(2))(images),
                       expected)
