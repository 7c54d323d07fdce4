"""Reading the official corrupted test sets.

Two layouts, chosen per corruption by what is on disk:
- CIFAR-10-C / CIFAR-100-C: `<root>/<name>.npy`, uint8 (5 n, H, W, 3) with the severities
  stacked in blocks of n (10000) in order 1..5, and `<root>/labels.npy`, int (5 n,) or (n,).
  Arrays are memory-mapped, so reading one severity reads one block.
- Tiny-ImageNet-C: `<root>/<name>/<severity>/<wnid>/*.JPEG`; `class_names` lists the wnids in
  class-index order.
"""
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image

from raymoll.errors import RaymollError
from raymoll.preflight import SEVERITIES

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class CorruptionFilesError(RaymollError, FileNotFoundError):
    """A corrupted-set folder lacks files or holds files of the wrong shape."""


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy file at `path` from its header alone (no data is read);
    raises ValueError or OSError for a file that is not .npy."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(file)
    return shape, dtype


def _npy_problem(path: Path, image_size: tuple[int, int] | None) -> str | None:
    """Why the .npy file at `path` is not a (5 n, H, W, 3) uint8 array of `image_size` (H, W),
    or None."""
    try:
        shape, dtype = npy_header(path)
    except (ValueError, OSError) as error:  # truncated or not an .npy file
        return f"{path.name} cannot be read ({error})"
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or shape[0] % len(SEVERITIES):
        return f"{path.name} has shape {shape} and dtype {dtype}, expected uint8 (5 n, H, W, 3)"
    if image_size is not None and tuple(shape[1:3]) != tuple(image_size):
        return (f"{path.name} holds {shape[2]}x{shape[1]} images but the data folder's are "
                f"{image_size[1]}x{image_size[0]}")
    return None


def _labels_problem(root: Path, npy_lengths: set[int]) -> str | None:
    path = root / "labels.npy"
    if not path.is_file():
        return "labels.npy is missing"
    try:
        shape, dtype = npy_header(path)
    except (ValueError, OSError) as error:
        return f"labels.npy cannot be read ({error})"
    if len(shape) != 1 or dtype.kind not in "iu":
        return f"labels.npy has shape {shape} and dtype {dtype}, expected integers (5 n,) or (n,)"
    allowed = npy_lengths | {n // len(SEVERITIES) for n in npy_lengths}
    if len(npy_lengths) == 1 and shape[0] not in allowed:
        return f"labels.npy has {shape[0]} labels, expected one per image ({sorted(allowed)})"
    return None


def check_corruptions_dir(root: str | Path, names: tuple[str, ...] | list[str],
                          image_size: tuple[int, int] | None = None) -> None:
    """Raise CorruptionFilesError naming every missing or malformed file for `names` under
    `root` (every .npy's shape and dtype, and its image size (H, W) when given); cheap (reads
    only .npy headers), so call it before any evaluation starts."""
    root = Path(root)
    if not root.is_dir():
        raise CorruptionFilesError(f"the corruptions folder {root} does not exist; point it at the folder holding "
                                   "<corruption>.npy and labels.npy (CIFAR-10-C) or <corruption>/<severity>/ "
                                   "(Tiny-ImageNet-C).")
    problems = []
    npy_lengths = set()
    for name in names:
        npy = root / f"{name}.npy"
        if npy.is_file():
            problem = _npy_problem(npy, image_size)
            if problem:
                problems.append(problem)
            else:
                npy_lengths.add(npy_header(npy)[0][0])
        elif not all((root / name / str(s)).is_dir() for s in SEVERITIES):
            problems.append(f"{name}.npy (or the folders {name}/1 .. {name}/5) is missing")
    if npy_lengths or any((root / f"{name}.npy").is_file() for name in names):
        problem = _labels_problem(root, npy_lengths)
        if problem:
            problems.append(problem)
    if problems:
        raise CorruptionFilesError(f"the corruptions folder {root} is incomplete or malformed: "
                                   f"{'; '.join(problems)}. "
                                   "Download the official -C files (e.g. CIFAR-10-C from Zenodo) into it, or "
                                   "evaluate on corruptions generated on the fly instead.")


def _read_npy(root: Path, name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(root / f"{name}.npy", mmap_mode="r")
    n = len(data) // len(SEVERITIES)
    block = slice((severity - 1) * n, severity * n)
    labels = np.load(root / "labels.npy", mmap_mode="r")
    if len(labels) == len(data):
        labels = labels[block]
    elif len(labels) != n:
        raise CorruptionFilesError(f"{root / 'labels.npy'} has {len(labels)} labels; expected {len(data)} "
                                   f"(one per image of {name}.npy) or {n} (one per image of a severity).")
    images = torch.from_numpy(np.array(data[block])).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(np.array(labels, dtype=np.int64))


def _read_tree(root: Path, name: str, severity: int, class_names: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    if class_names is None:
        raise ValueError(f"{root / name} is a folder tree (Tiny-ImageNet-C layout); reading it needs class_names, "
                         "the wnids in class-index order.")
    index = {wnid: i for i, wnid in enumerate(class_names)}
    folder = root / name / str(severity)
    files = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    unknown = sorted({p.parent.name for p in files} - index.keys())
    if unknown:
        raise ValueError(f"{folder} has class folders not in class_names: {', '.join(unknown[:10])}.")
    if not files:
        raise CorruptionFilesError(f"{folder} holds no images (<wnid>/*.JPEG).")
    images = [decode_image(str(p), mode=ImageReadMode.RGB) for p in files]
    if len({tuple(im.shape) for im in images}) > 1:
        raise ValueError(f"the images under {folder} differ in size; expected one size (64x64 for Tiny-ImageNet-C).")
    labels = torch.tensor([index[p.parent.name] for p in files], dtype=torch.int64)
    return torch.stack(images), labels


def read_corrupted(root: str | Path, name: str, severity: int,
                   class_names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One (corruption, severity) set: images uint8 (N, 3, H, W) and labels int64 (N,).
    class_names is needed only for the Tiny-ImageNet-C folder layout."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be an int from 1 to 5, got {severity!r}.")
    root = Path(root)
    check_corruptions_dir(root, [name])
    if (root / f"{name}.npy").is_file():
        return _read_npy(root, name, severity)
    return _read_tree(root, name, severity, class_names)
