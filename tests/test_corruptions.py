"""raymoll.corruptions against the definitions in docs/corruptions.md, on real Fashion-MNIST
test images (padded to 32x32, repeated to RGB), with PIL and scipy as independent references."""
import colorsys
import gzip
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
from PIL import Image

from raymoll.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS, corrupt
from raymoll.corruptions.official import CorruptionFilesError, check_corruptions_dir, read_corrupted
from raymoll.corruptions.presets import CIFAR

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
NAMES = CORRUPTIONS + VALIDATION_CORRUPTIONS
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
          "snow", "frost", "fog", "elastic_transform", "spatter")
# Where the CIFAR table itself does not grow in strength with severity, the mean change need not.
NON_MONOTONE = {
    "glass_blur": "sigma goes .05, .25, .4, .25, .4, and blurring partly averages out the shuffle",
    "elastic_transform": "the affine jitter shrinks from 2.56 px to .96 px while the elastic field grows",
    "frost": "severity 4 lowers only the image weight (.9 -> .85) at the same frost weight .4",
    "spatter": "severities 1-3 add water drops, 4-5 cover with mud (another mode)",
    "saturate": "severities 1-2 desaturate (x.3, x.1), 3-5 saturate (x1.5 .. x2.5 + offset)",
}


def fashion_mnist(start: int, count: int) -> np.ndarray:
    with gzip.open(FASHION_MNIST) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return np.pad(raw[start:start + count], ((0, 0), (2, 2), (2, 2)))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """8 real images, uint8 (8, 3, 32, 32), grey."""
    return torch.from_numpy(fashion_mnist(0, 8))[:, None].repeat(1, 3, 1, 1).contiguous()


@pytest.fixture(scope="module")
def colour_images() -> torch.Tensor:
    """8 colour images, uint8 (8, 3, 32, 32): three different real images as R, G and B."""
    return torch.from_numpy(fashion_mnist(8, 24).reshape(8, 3, 32, 32)).contiguous()


def mean_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_names_and_families():
    assert len(CORRUPTIONS) == 15 and len(set(NAMES)) == 19
    assert set(FAMILIES) == set(NAMES)
    assert {FAMILIES[n] for n in VALIDATION_CORRUPTIONS} == {"validation"}
    assert [FAMILIES[n] for n in CORRUPTIONS] == ["noise"] * 3 + ["blur"] * 4 + ["weather"] * 4 + ["digital"] * 4


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_change_and_severity_order(name, images, colour_images):
    # Grey pixels have saturation 0, which saturate's multipliers cannot change.
    x = colour_images if name == "saturate" else images
    changes = []
    for severity in range(1, 6):
        out = corrupt(x, name, severity, seeded())
        assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
        changes.append(mean_change(out, x))
        assert changes[-1] > 0, f"{name} severity {severity} left the images unchanged"
    if name not in NON_MONOTONE:
        assert all(b >= a - 0.05 for a, b in zip(changes, changes[1:])), (name, changes)


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_are_reproducible(name, images):
    first = corrupt(images, name, 3, seeded(1))
    assert torch.equal(first, corrupt(images, name, 3, seeded(1)))
    assert not torch.equal(first, corrupt(images, name, 3, seeded(2)))


def test_bad_arguments_are_refused(images):
    with pytest.raises(ValueError, match="gaussian_noise"):
        corrupt(images, "rain", 1)
    for severity in (0, 6, 2.0):
        with pytest.raises(ValueError, match="1 to 5"):
            corrupt(images, "fog", severity)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images.float(), "fog", 1)
    with pytest.raises(ValueError, match="preset"):
        corrupt(images, "fog", 1, preset="mnist")


def grey_images(value: int = 128) -> torch.Tensor:
    return torch.full((8, 3, 32, 32), value, dtype=torch.uint8)


@pytest.mark.parametrize("severity", range(1, 6))
def test_noise_parameters_match_the_table(severity):
    x = grey_images()
    level = 128 / 255
    delta = (corrupt(x, "gaussian_noise", severity, seeded()).float() - x.float()) / 255
    assert delta.std().item() == pytest.approx(CIFAR["gaussian_noise"][severity - 1], rel=0.03)
    rate = CIFAR["shot_noise"][severity - 1]
    delta = (corrupt(x, "shot_noise", severity, seeded()).float() - x.float()) / 255
    assert delta.std().item() == pytest.approx((level / rate) ** 0.5, rel=0.03)
    std = CIFAR["speckle_noise"][severity - 1]
    delta = (corrupt(x, "speckle_noise", severity, seeded()).float() - x.float()) / 255
    assert delta.std().item() == pytest.approx(level * std, rel=0.03)
    amount = CIFAR["impulse_noise"][severity - 1]
    out = corrupt(x, "impulse_noise", severity, seeded())
    hit = ((out == 0) | (out == 255)).float()
    assert hit.mean().item() == pytest.approx(amount, abs=5 * (amount * (1 - amount) / hit.numel()) ** 0.5)
    assert (out == 0).sum().item() == pytest.approx((out == 255).sum().item(), rel=0.35)


@pytest.mark.parametrize("severity", range(1, 6))
def test_contrast_factor_matches_the_table(severity, images):
    out = corrupt(images, "contrast", severity).double()
    x = images.double()
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    # Least-squares slope of the output against the input around the channel means.
    slope = (centred * (out - out.mean(dim=(2, 3), keepdim=True))).sum() / (centred**2).sum()
    assert slope.item() == pytest.approx(CIFAR["contrast"][severity - 1], abs=0.005)


@pytest.mark.parametrize("severity", range(1, 6))
def test_jpeg_matches_pil_at_the_same_quality(severity, colour_images):
    quality = CIFAR["jpeg_compression"][severity - 1]
    ours = corrupt(colour_images, "jpeg_compression", severity)
    pil = []
    for image in colour_images.permute(0, 2, 3, 1).numpy():
        buffer = BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        pil.append(np.asarray(Image.open(buffer).convert("RGB")))
    pil = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2)
    assert mean_change(ours, pil) < 0.2 * mean_change(pil, colour_images)


@pytest.mark.parametrize("severity", range(1, 6))
def test_pixelate_matches_pil_box_resizes(severity, colour_images):
    factor = CIFAR["pixelate"][severity - 1]
    small = int(32 * factor)
    pil = [np.asarray(Image.fromarray(image).resize((small, small), Image.BOX).resize((32, 32), Image.BOX))
           for image in colour_images.permute(0, 2, 3, 1).numpy()]
    pil = torch.from_numpy(np.stack(pil)).permute(0, 3, 1, 2)
    ours = corrupt(colour_images, "pixelate", severity)
    # PIL rounds to uint8 between its two passes and its two resizes; we round once.
    assert (ours.int() - pil.int()).abs().max().item() <= 2
    assert mean_change(ours, pil) < 0.5


@pytest.mark.parametrize("severity", range(1, 6))
def test_gaussian_blur_matches_scipy(severity, colour_images):
    sigma = CIFAR["gaussian_blur"][severity - 1]
    x = colour_images.double().numpy() / 255
    reference = scipy.ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    reference = torch.from_numpy(np.round(np.clip(reference, 0, 1) * 255))
    ours = corrupt(colour_images, "gaussian_blur", severity)
    assert (ours.double() - reference).abs().max().item() <= 1


def scipy_zoom_blur(x: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """make_cifar_c.py's zoom_blur on float (H, W, C) with scipy.ndimage.zoom."""
    h = x.shape[0]
    out = x.copy()
    for factor in factors:
        ch = int(np.ceil(h / factor))
        top = (h - ch) // 2
        zoomed = scipy.ndimage.zoom(x[top:top + ch, top:top + ch], (factor, factor, 1), order=1)
        trim = (zoomed.shape[0] - h) // 2
        out += zoomed[trim:trim + h, trim:trim + h]
    return out / (len(factors) + 1)


@pytest.mark.parametrize("severity", [1, 5])
def test_zoom_blur_matches_scipy(severity, colour_images):
    factors = np.arange(*CIFAR["zoom_blur"][severity - 1])
    x = colour_images.permute(0, 2, 3, 1).double().numpy() / 255
    reference = np.stack([scipy_zoom_blur(image, factors) for image in x])
    reference = torch.from_numpy(np.round(np.clip(reference, 0, 1) * 255)).permute(0, 3, 1, 2)
    ours = corrupt(colour_images, "zoom_blur", severity)
    assert (ours.double() - reference).abs().max().item() <= 1


@pytest.mark.parametrize("name", ["brightness", "saturate"])
@pytest.mark.parametrize("severity", [1, 5])
def test_hsv_corruptions_match_colorsys(name, severity, colour_images):
    x = colour_images[:2]
    ours = corrupt(x, name, severity).permute(0, 2, 3, 1).reshape(-1, 3)
    param = CIFAR[name][severity - 1]
    expected = []
    for r, g, b in (x.permute(0, 2, 3, 1).reshape(-1, 3).double() / 255).tolist():
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        if name == "brightness":
            v = min(max(v + param, 0.0), 1.0)
        else:
            s = min(max(s * param[0] + param[1], 0.0), 1.0)
        expected.append(colorsys.hsv_to_rgb(h, s, v))
    expected = torch.tensor(expected).mul(255).round()
    assert (ours.double() - expected).abs().max().item() <= 1


@pytest.mark.parametrize("size, preset", [(64, "tinyimagenet"), (224, "imagenet")])
def test_larger_presets_run(size, preset, colour_images):
    x = torch.nn.functional.interpolate(colour_images[:2].float(), size=size, mode="bilinear")
    x = x.round().clamp(0, 255).to(torch.uint8)
    for name in NAMES:
        out = corrupt(x, name, 3, seeded())
        assert out.shape == x.shape and out.dtype == torch.uint8
        assert mean_change(out, x) > 0, name
    # None picks the preset by size: contrast is deterministic, so the tables must agree.
    assert torch.equal(corrupt(x, "contrast", 5), corrupt(x, "contrast", 5, preset=preset))
    assert not torch.equal(corrupt(x, "contrast", 5), corrupt(x, "contrast", 5, preset="cifar"))


def write_npy_layout(root: Path, names: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(0, 256, (5 * 4, 8, 8, 3), dtype=np.uint8) for name in names}
    for name, array in arrays.items():
        np.save(root / f"{name}.npy", array)
    np.save(root / "labels.npy", np.tile(np.arange(4), 5).astype(np.uint8) * 2)
    return arrays


def test_reads_the_official_npy_layout(tmp_path):
    arrays = write_npy_layout(tmp_path, ["fog", "snow"])
    check_corruptions_dir(tmp_path, ["fog", "snow"])
    images, labels = read_corrupted(tmp_path, "fog", 3)
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert torch.equal(images, torch.from_numpy(arrays["fog"][8:12]).permute(0, 3, 1, 2))
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 2, 4, 6]


def test_missing_files_are_named_before_reading(tmp_path):
    write_npy_layout(tmp_path, ["fog"])
    (tmp_path / "labels.npy").unlink()
    with pytest.raises(CorruptionFilesError) as error:
        check_corruptions_dir(tmp_path, ["fog", "frost", "snow"])
    message = str(error.value)
    assert "frost.npy" in message and "snow.npy" in message and "labels.npy" in message
    assert "fog.npy" not in message
    np.save(tmp_path / "frost.npy", np.zeros((7, 8, 8, 3), np.uint8))  # not 5 severity blocks
    with pytest.raises(ValueError, match="frost.npy has shape"):
        check_corruptions_dir(tmp_path, ["frost"])
    with pytest.raises(FileNotFoundError):
        read_corrupted(tmp_path / "absent", "fog", 1)


def test_reads_the_tiny_imagenet_c_tree(tmp_path):
    class_names = ["n001", "n002", "n003"]
    rng = np.random.default_rng(1)
    written = {}
    for severity in range(1, 6):
        for wnid in ("n003", "n001"):
            folder = tmp_path / "fog" / str(severity) / wnid
            folder.mkdir(parents=True)
            image = np.full((64, 64, 3), rng.integers(0, 256, 3), dtype=np.uint8)  # flat: JPEG keeps it
            Image.fromarray(image).save(folder / "val_0.JPEG", quality=95)
            written[(severity, wnid)] = image
    check_corruptions_dir(tmp_path, ["fog"])
    images, labels = read_corrupted(tmp_path, "fog", 2, class_names)
    assert images.shape == (2, 3, 64, 64) and labels.tolist() == [0, 2]
    expected = torch.from_numpy(np.stack([written[(2, "n001")], written[(2, "n003")]])).permute(0, 3, 1, 2)
    assert (images.int() - expected.int()).abs().max().item() <= 2
    with pytest.raises(ValueError, match="class_names"):
        read_corrupted(tmp_path, "fog", 2)
    with pytest.raises(ValueError, match="n003"):
        read_corrupted(tmp_path, "fog", 2, class_names[:2])
