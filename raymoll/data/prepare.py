"""Write a source to train.beton, val.beton, test.beton and meta.json; read and check them back.

val.beton is a seeded, class-stratified share of the source's training split (meta.json's "val"
records the fraction, the seed and the source indices it holds); train.beton holds the rest.
Training, checkpoint selection and search read train and val only; the test split is for
`raymoll evaluate` alone.

A prepared folder is finished exactly when meta.json exists: prepare writes every file under a
temporary name, renames the .beton files into place and writes meta.json last, so an interrupted
run never leaves a folder that looks finished (and an earlier finished set survives until the
new one is complete).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import __version__
from .beton import check_beton, field_layout, keep_torch_threads, make_fields
from .sources import ArraySplit, DataError, Split, load_source, stratified_indices, subset

with keep_torch_threads():
    from ffcv.writer import DatasetWriter

SPLITS = ("train", "val", "test")
VAL_FRACTION, VAL_SEED = 0.1, 0  # prepare's defaults for the validation split
IMAGE_FORMATS = ("auto", "raw", "jpeg")
RAW_MAX_SIDE = 64  # "auto" stores images up to this size raw (exact), larger ones as JPEG
FULL_HASH_LIMIT = 1 << 30  # read_meta re-hashes whole files below this size, the ends above
MIB = 1 << 20
STATS_IMAGES = 10_000  # file-backed sets estimate mean/std from this many random images


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[raymoll prepare] {message}", file=sys.stderr, flush=True)


def _pixel_chunks(split: Split, seed: int = 0) -> Iterator[np.ndarray]:
    if isinstance(split, ArraySplit):
        for start in range(0, len(split), 4096):
            yield split.images[start:start + 4096]
        return
    rng = np.random.default_rng(seed)
    count = min(len(split), STATS_IMAGES)
    for i in np.sort(rng.choice(len(split), count, replace=False)):
        yield split[int(i)][0]


def channel_stats(split: Split) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels, in [0, 255] units."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for chunk in _pixel_chunks(split):
        pixels = chunk.reshape(-1, 3).astype(np.float64)
        total += pixels.sum(0)
        total_sq += (pixels ** 2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.tolist(), std.tolist()


def _sha256(path: Path, ends_only: bool = False) -> str:
    """sha256 of the file, or of its first and last MiB (cheap for huge files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if ends_only:
            digest.update(f.read(MIB))
            f.seek(max(path.stat().st_size - MIB, 0))
            digest.update(f.read(MIB))
        else:
            while block := f.read(4 * MIB):
                digest.update(block)
    return digest.hexdigest()


class _Checked:
    """Wraps a split for FFCV's writer, whose progress loop waits forever when a worker process
    dies on a bad sample: a failing sample is logged to `error_file` and written as a blank
    placeholder, and prepare raises after the writer returns."""

    def __init__(self, split: Split, error_file: Path):
        self.split, self.error_file = split, error_file
        self.blank = np.zeros((*(split.image_size or (8, 8)), 3), np.uint8)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            image, label = self.split[i]
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise DataError(f"got a {image.dtype} image of shape {image.shape}; sources "
                                f"must give uint8 (H, W, 3).")
            return image, label
        except Exception as err:
            with open(self.error_file, "a") as f:
                f.write(f"sample {i}: {err}\n")
            return self.blank, -1


def _write_split(split: Split, path: Path, layout: dict) -> None:
    errors = path.with_name(path.name + ".errors")
    try:
        with keep_torch_threads():
            writer = DatasetWriter(str(path), make_fields(layout),
                                   num_workers=min(os.cpu_count() or 1, 16))
            writer.from_indexed_dataset(_Checked(split, errors), chunksize=256)
        if errors.exists():
            lines = errors.read_text().splitlines()
            raise DataError(f"{len(lines)} samples could not be read while writing {path.name}; "
                            f"the first: {lines[0]}. Fix or remove those files and re-run.")
    finally:
        errors.unlink(missing_ok=True)


def _write_mode(image_format: str, image_size: tuple[int, int] | None) -> str:
    if image_format == "auto":
        small = image_size is not None and max(image_size) <= RAW_MAX_SIDE
        return "raw" if small else "jpg"
    return {"raw": "raw", "jpeg": "jpg"}[image_format]


def prepare(dataset: str, out: str | Path, root: str | Path | None = None,
            image_format: str = "auto", max_side: int = 256, jpeg_quality: int = 90,
            val_fraction: float = VAL_FRACTION, val_seed: int = VAL_SEED,
            progress: bool = True, **source_kwargs) -> Path:
    """Write `dataset` to out/{train,val,test}.beton and out/meta.json; returns `out`.

    val: `val_fraction` of the source's training images, class-stratified (each class gives
    floor or ceil of val_fraction times its count) and drawn with `val_seed`; train: the rest.
    image_format "auto" stores images of at most 64 px raw (exact) and larger or variable-size
    ones as JPEG (longest side <= max_side, quality jpeg_quality).
    """
    if image_format not in IMAGE_FORMATS:
        raise DataError(f"image_format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}.")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction {val_fraction!r} must be in (0, 1): the validation split "
                        f"is what training selects on, so it cannot be empty.")
    if val_seed < 0:
        raise DataError(f"val_seed {val_seed!r} must be >= 0.")
    source = load_source(dataset, root, **source_kwargs)  # fails before anything is written
    val_indices, train_indices = stratified_indices(source.train.labels, val_fraction, val_seed)
    if len(val_indices) == 0 or len(train_indices) == 0:
        raise DataError(f"val_fraction {val_fraction} of {len(source.train)} training images "
                        f"leaves an empty split; choose a fraction that keeps both non-empty.")
    splits = {"train": subset(source.train, train_indices),
              "val": subset(source.train, val_indices), "test": source.test}
    height, width = source.image_size
    if height != width:
        raise DataError(f"{dataset} images are {width}x{height}; raymoll needs square images "
                        f"(the heat blur and the corruption presets assume them).")
    native = source.train.image_size
    write_mode = _write_mode(image_format, native)
    layout = field_layout(write_mode, max_side if write_mode == "jpg" else None, jpeg_quality)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = {split: out / f".{split}.beton.tmp-{os.getpid()}" for split in SPLITS}
    try:
        files, counts = {}, {}
        for split in SPLITS:
            data = splits[split]
            _say(progress, f"{dataset} {split}: writing {len(data)} images ({write_mode}) "
                           f"to {out / (split + '.beton')}")
            _write_split(data, temporary[split], layout)
            check_beton(temporary[split], len(data))
            size = temporary[split].stat().st_size
            files[split] = {"file": f"{split}.beton", "bytes": size,
                            "sha256": _sha256(temporary[split]),
                            "ends_sha256": _sha256(temporary[split], ends_only=True)}
            counts[split] = len(data)
        _say(progress, f"{dataset}: computing channel mean/std of the train split")
        mean, std = channel_stats(splits["train"])
        meta = {"dataset": dataset, "num_classes": len(source.class_names),
                "class_names": source.class_names, "image_size": [height, width],
                "variable_size": native is None, "mean": mean, "std": std, "counts": counts,
                "val": {"fraction": val_fraction, "seed": val_seed,
                        "source_indices": val_indices.tolist()},
                "fields": layout, "files": files, "raymoll_version": __version__}
        # From here on the folder must not look finished until the new meta.json is in place.
        (out / "meta.json").unlink(missing_ok=True)
        for split in SPLITS:
            os.replace(temporary[split], out / f"{split}.beton")
        meta_tmp = out / f".meta.json.tmp-{os.getpid()}"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, out / "meta.json")
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    _say(progress, f"{dataset}: done, {counts['train']} train / {counts['val']} val / "
                   f"{counts['test']} test images in {out}")
    return out


_VERIFIED: set[tuple] = set()  # (path, bytes, mtime_ns, sha256) already checked this process


def _check_file(path: Path, info: dict, count: int) -> None:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, info["sha256"])
    if key in _VERIFIED:
        return
    check_beton(path, count)
    if stat.st_size != info["bytes"]:
        raise DataError(f"{path} has {stat.st_size} bytes but meta.json records {info['bytes']}: "
                        f"the file was replaced or damaged after prepare; re-run prepare.")
    full = stat.st_size < FULL_HASH_LIMIT
    expected = info["sha256"] if full else info["ends_sha256"]
    if _sha256(path, ends_only=not full) != expected:
        raise DataError(f"{path} does not match the content hash in meta.json: the file was "
                        f"replaced or damaged after prepare; re-run prepare.")
    _VERIFIED.add(key)


META_KEYS = ("dataset", "num_classes", "class_names", "image_size", "variable_size", "mean",
             "std", "counts", "val", "fields", "files")


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared folder, after checking it against its .beton files."""
    data_dir = Path(data_dir)
    hint = "create it with `raymoll prepare --dataset NAME --out DIR`"
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; {hint}.")
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{data_dir} has no meta.json: it is not a prepared data folder, or "
                        f"prepare was interrupted; {hint}.")
    try:
        meta = json.loads(meta_path.read_text())
        missing = [key for key in META_KEYS if key not in meta]
    except (json.JSONDecodeError, TypeError) as err:
        raise DataError(f"{meta_path} is not valid JSON ({err}); {hint}.") from None
    if "val" in missing and "counts" not in missing and "val" not in meta["counts"]:
        dataset = meta.get("dataset", "NAME")
        raise DataError(f"{data_dir} was prepared before raymoll held out a validation split "
                        f"(it has no val.beton): training would select on the test split. "
                        f"Re-prepare it with `raymoll prepare --dataset {dataset} --out "
                        f"{data_dir}` (--val-fraction, --val-seed choose the split).")
    if missing:
        raise DataError(f"{meta_path} lacks {', '.join(missing)}: written by another tool or "
                        f"version; {hint}.")
    height, width = meta["image_size"]
    if height != width:
        raise DataError(f"{data_dir} holds {width}x{height} images; raymoll needs square "
                        f"images (the heat blur and the corruption presets assume them).")
    for split in SPLITS:
        path = data_dir / meta["files"][split]["file"]
        if not path.is_file():
            raise DataError(f"{path} is missing; {hint}.")
        _check_file(path, meta["files"][split], meta["counts"][split])
    return meta
