"""Dataset sources: each split is an indexable of (uint8 (H,W,3) numpy image, int label).

`load_source(name, root, **kwargs)` checks that the data is there (or downloads it, for the
torchvision sets) and returns a `Source` whose splits decode images lazily where the set is
large; small sets are held as arrays. Nothing here knows about FFCV.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from raymoll.errors import RaymollError

DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagefolder", "fashion-mnist", "synthetic")
DEFAULT_ROOT = Path("~/.cache/raymoll/datasets").expanduser()
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(RaymollError):
    """Missing, unknown or inconsistent data; the message says what would be right."""


class Split(Protocol):
    image_size: tuple[int, int] | None  # (H, W) when every image has it, else None
    labels: Sequence[int]  # label of every sample, without decoding the images

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


@dataclass
class Source:
    name: str
    train: Split
    test: Split
    class_names: list[str]
    image_size: tuple[int, int]  # (H, W) of the images the loader delivers


class ArraySplit:
    """A split held in memory: images uint8 (N,H,W,3), labels int64 (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels.astype(np.int64)
        self.image_size = tuple(images.shape[1:3])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


class FileSplit:
    """A split of image files decoded on access (PIL, converted to RGB)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int],
                 image_size: tuple[int, int] | None = None):
        self.files, self.labels, self.image_size = list(files), list(labels), image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        with Image.open(self.files[i]) as img:
            image = np.asarray(img.convert("RGB"))
        if self.image_size is not None and image.shape[:2] != self.image_size:
            raise DataError(f"image {self.files[i]} is {image.shape[1]}x{image.shape[0]}, "
                            f"but every image of this dataset should be "
                            f"{self.image_size[1]}x{self.image_size[0]}.")
        return image, self.labels[i]


class SyntheticSplit:
    """Seeded random images: a per-class low-frequency colour pattern plus pixel noise.

    Image i has label i % num_classes and is generated from (seed, split, i) alone, so a split
    of any length costs no memory and round-trips can be checked against `split[i]`.
    """

    def __init__(self, count: int, templates: np.ndarray, seed: int, split_id: int,
                 noise: float):
        self.count, self.templates, self.seed, self.split_id = count, templates, seed, split_id
        self.noise = noise
        self.image_size = tuple(templates.shape[1:3])
        self.labels = np.arange(count) % len(templates)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        label = i % len(self.templates)
        rng = np.random.default_rng([self.seed, self.split_id, i])
        image = self.templates[label] + rng.normal(0.0, self.noise, self.templates.shape[1:])
        return np.clip(image, 0, 255).astype(np.uint8), label


class SubsetSplit:
    """The samples `indices` (int64 (M,), into `split`) of a split, in that order."""

    def __init__(self, split: Split, indices: np.ndarray):
        self.split, self.indices = split, np.asarray(indices, dtype=np.int64)
        self.image_size = split.image_size
        self.labels = np.asarray(split.labels, dtype=np.int64)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.split[int(self.indices[i])]


def subset(split: Split, indices: np.ndarray) -> Split:
    """The samples `indices` of `split`: an ArraySplit of an ArraySplit (in memory, so the
    channel statistics stay exact), else a SubsetSplit view."""
    if isinstance(split, ArraySplit):
        return ArraySplit(split.images[indices], split.labels[indices])
    return SubsetSplit(split, indices)


def stratified_indices(labels: Sequence[int], fraction: float,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (held_out, rest), both sorted int64, class-stratified.

    Class c with n_c samples gives floor or ceil of fraction * n_c samples to held_out (largest
    remainders get the ceil, ties broken at random, so held_out has round(fraction * N)
    samples in all), drawn uniformly with numpy's generator seeded by `seed`: the same seed
    gives the same split.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    take = np.floor(exact).astype(np.int64)
    extra = int(round(fraction * len(labels))) - int(take.sum())
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(classes))  # ties in the remainder are broken at random
    ranked = order[np.argsort(-(exact - take)[order], kind="stable")]
    take[ranked[:max(extra, 0)]] += 1
    held_out = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
                for c, k in zip(classes, take)]
    held_out = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(labels)), held_out)
    return held_out.astype(np.int64), rest.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The sources, one function each


def synthetic(root: Path | None = None, num_train: int = 2000, num_test: int = 500,
              num_classes: int = 10, image_size: int | tuple[int, int] = 32, seed: int = 0,
              noise: float = 24.0) -> Source:
    """Learnable random data for tests; `root` is ignored."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    rng = np.random.default_rng(seed)
    # 4x4 random colour grids upsampled to the image size: structure a small CNN can learn.
    grid = rng.uniform(32, 224, size=(num_classes, 4, 4, 3))
    rows = np.arange(height) * 4 // height
    cols = np.arange(width) * 4 // width
    templates = grid[:, rows][:, :, cols]
    return Source("synthetic", SyntheticSplit(num_train, templates, seed, 0, noise),
                  SyntheticSplit(num_test, templates, seed, 1, noise),
                  [f"class_{k}" for k in range(num_classes)], (height, width))


def _cifar(name: str, root: Path | None) -> Source:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(root) if root is not None else DEFAULT_ROOT
    try:
        train = cls(root, train=True, download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted"
        try:
            train = cls(root, train=True, download=True)
        except Exception as err:
            raise DataError(f"{name} is not under {root} and could not be downloaded ({err}). "
                            f"Connect to the internet once, or pass --root pointing at a folder "
                            f"holding torchvision's {cls.base_folder} folder.") from None
    test = cls(root, train=False, download=False)
    return Source(name, ArraySplit(train.data, np.array(train.targets)),
                  ArraySplit(test.data, np.array(test.targets)), list(train.classes), (32, 32))


def cifar10(root: Path | None = None) -> Source:
    return _cifar("cifar10", root)


def cifar100(root: Path | None = None) -> Source:
    return _cifar("cifar100", root)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) of unsigned bytes: the MNIST family's format."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        for candidate in (folder / name, folder / "FashionMNIST" / "raw" / name):
            if candidate.is_file():
                return candidate
    return None


def _fashion_mnist_folder(root: Path | None) -> Path:
    """The folder holding the four IDX files: root, the Debian package's, or a download."""
    stems = [stem for pair in _FASHION_FILES.values() for stem in pair]
    candidates = [Path(root)] if root is not None else [FASHION_MNIST_SYSTEM_DIR, DEFAULT_ROOT]
    for folder in candidates:
        if all(_find_idx(folder, stem) for stem in stems):
            return folder
    target = candidates[-1]
    try:
        from torchvision.datasets import FashionMNIST
        FashionMNIST(target, train=True, download=True)
        FashionMNIST(target, train=False, download=True)
    except Exception as err:
        raise DataError(f"Fashion-MNIST IDX files are not in {' or '.join(map(str, candidates))} "
                        f"and could not be downloaded ({err}). Install them with "
                        f"`apt-get install dataset-fashion-mnist` (Debian), or pass --root "
                        f"pointing at a folder with {', '.join(s + '.gz' for s in stems)}.") \
            from None
    return target


def fashion_mnist(root: Path | None = None) -> Source:
    """28x28 grey images zero-padded to 32x32 and repeated to 3 channels (CIFAR-shaped)."""
    folder = _fashion_mnist_folder(root)
    splits = []
    for image_stem, label_stem in _FASHION_FILES.values():
        grey = read_idx(_find_idx(folder, image_stem))
        images = np.repeat(np.pad(grey, ((0, 0), (2, 2), (2, 2)))[..., None], 3, axis=3)
        splits.append(ArraySplit(images, read_idx(_find_idx(folder, label_stem))))
    return Source("fashion-mnist", *splits, list(FASHION_MNIST_CLASSES), (32, 32))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def tinyimagenet(root: Path | None = None) -> Source:
    """The standard `tiny-imagenet-200` folder; its labelled `val` split is the test split."""
    root = Path(root) if root is not None else DEFAULT_ROOT / "tiny-imagenet-200"
    needed = [root / "wnids.txt", root / "train", root / "val" / "val_annotations.txt"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise DataError(f"Tiny-ImageNet is incomplete or absent: missing {', '.join(missing)}. "
                        f"Download tiny-imagenet-200.zip (cs231n.stanford.edu), unpack it and "
                        f"pass --root pointing at the tiny-imagenet-200 folder.")
    wnids = (root / "wnids.txt").read_text().split()
    index = {wnid: k for k, wnid in enumerate(wnids)}
    words = {}
    if (root / "words.txt").is_file():
        for line in (root / "words.txt").read_text().splitlines():
            wnid, _, text = line.partition("\t")
            words[wnid] = text.split(",")[0].strip()
    train_files, train_labels = [], []
    for wnid in wnids:
        files = _image_files(root / "train" / wnid / "images")
        train_files += files
        train_labels += [index[wnid]] * len(files)
    test_files, test_labels = [], []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid = line.split("\t")[:2]
        test_files.append(root / "val" / "images" / name)
        test_labels.append(index[wnid])
    return Source("tinyimagenet", FileSplit(train_files, train_labels, (64, 64)),
                  FileSplit(test_files, test_labels, (64, 64)),
                  [words.get(wnid, wnid) for wnid in wnids], (64, 64))


def imagefolder(root: Path | None = None, image_size: int = 224) -> Source:
    """ImageNet-style root/train/<class>/* and root/val/<class>/* (images of any size).

    The loader crops and resizes them to image_size x image_size (random-resized crops for
    training, centre crops for evaluation).
    """
    if root is None or not (Path(root) / "train").is_dir() or not (Path(root) / "val").is_dir():
        raise DataError(f"imagefolder needs --root pointing at a folder with train/<class>/ and "
                        f"val/<class>/ subfolders of images; got {root}.")
    root = Path(root)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    unknown = sorted({p.name for p in (root / "val").iterdir() if p.is_dir()} - set(classes))
    if not classes or unknown:
        raise DataError(f"imagefolder {root}: train/ has classes {classes[:5]}... and val/ has "
                        f"classes not in train/: {unknown[:5]}; both need the same class folders.")
    splits = []
    for split in ("train", "val"):
        files, labels = [], []
        for k, name in enumerate(classes):
            folder = root / split / name
            found = _image_files(folder) if folder.is_dir() else []
            files += found
            labels += [k] * len(found)
        splits.append(FileSplit(files, labels))
    return Source("imagefolder", *splits, classes, (image_size, image_size))


_SOURCES = {"cifar10": cifar10, "cifar100": cifar100, "tinyimagenet": tinyimagenet,
            "imagefolder": imagefolder, "fashion-mnist": fashion_mnist, "synthetic": synthetic}


def load_source(name: str, root: str | Path | None = None, **kwargs) -> Source:
    """The named dataset's splits; raises DataError when it is unknown or absent."""
    if name not in _SOURCES:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}.")
    return _SOURCES[name](Path(root) if root is not None else None, **kwargs)
