"""The up-front check of each verb: config + the data folder's meta.json + paths, decided before
heavy imports (torch, FFCV, numba) and before Ray starts, so a bad argument fails in about a
second instead of after a cluster start-up or an epoch.

Pure Python plus PyYAML (pyarrow.fs only for URI paths, through raymoll.io). What needs the
data files themselves (sizes, hashes, FFCV's structure) is `raymoll.data.read_meta`, run after
this and still before Ray.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from raymoll.config import Config, ConfigError
from raymoll.errors import RaymollError
from raymoll.io import absolute, check_writable_folder, is_file, join

META_FILE = "meta.json"
TUNER_STATE = "tuner.pkl"  # the file Ray Tune's Tuner.can_restore looks for
HINT = "create it with `raymoll prepare --dataset NAME --out DIR`"
SEVERITIES = (1, 2, 3, 4, 5)  # of every common corruption
EVALUATION_RUNNERS = ("local", "ray")  # raymoll.evaluation.runners
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")
META_KEYS = ("dataset", "num_classes", "class_names", "image_size", "variable_size", "mean",
             "std", "counts", "val", "fields", "files")


def read_meta_file(data_dir: str | Path) -> dict:
    """meta.json of a prepared folder, structure-checked (no .beton is opened)."""
    from raymoll.data.sources import DataError  # light module (numpy, PIL), no FFCV
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder {str(data_dir)!r} does not exist; {HINT}.")
    meta_path = data_dir / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{str(data_dir)!r} has no meta.json: it is not a prepared data folder, "
                        f"or prepare was interrupted; {HINT}.")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{str(meta_path)!r} is not valid JSON ({err}); {HINT}.") from None
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else ["all"]
    if "val" in missing and "counts" not in missing and "val" not in meta["counts"]:
        dataset = meta.get("dataset", "NAME")
        raise DataError(f"{str(data_dir)!r} was prepared before raymoll held out a validation "
                        f"split (it has no val.beton): training would select on the test split. "
                        f"Re-prepare it with `raymoll prepare --dataset {dataset} --out "
                        f"{data_dir}` (--val-fraction, --val-seed choose the split).")
    if missing:
        raise DataError(f"{str(meta_path)!r} lacks {', '.join(missing)}: written by another "
                        f"tool or version; {HINT}.")
    size = meta["image_size"]
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(s, int) and s > 0 for s in size)):
        raise DataError(f"{str(meta_path)!r} has image_size {size!r}; expected [height, width] "
                        f"in pixels, e.g. [32, 32]; {HINT}.")
    if size[0] != size[1]:
        raise DataError(f"{str(data_dir)!r} holds {size[1]}x{size[0]} images; raymoll needs "
                        f"square images (the heat blur and the corruption presets assume them).")
    counts = meta["counts"]
    splits = list(meta["files"]) if isinstance(meta["files"], dict) else []
    if not (splits and isinstance(counts, dict)
            and all(isinstance(counts.get(s), int) for s in splits)):
        raise DataError(f"{str(meta_path)!r} has counts {counts!r}; expected an image count per "
                        f"split of its files ({', '.join(splits)}); {HINT}.")
    return meta


def check_run_config(cfg: Config, meta: dict, where: str = "") -> None:
    """The settings that only the data can decide: subsets, batch size, blur range.
    `where` prefixes the message (e.g. the tune point that gives `cfg`)."""
    counts, width = meta["counts"], meta["image_size"][1]
    data = meta.get("dataset", "the data")

    def fail(message: str) -> None:
        raise ConfigError(f"{where}{message}")

    # eval.val_subset needs no check: the loader takes min(val_subset, the split's size).
    if cfg.data.train_subset > counts["train"]:
        fail(f"config key 'data.train_subset' = {cfg.data.train_subset} exceeds the "
             f"{counts['train']} training images of {data} (meta.json); use at most "
             f"{counts['train']}, or 0 for all.")
    images = cfg.data.train_subset or counts["train"]
    per_worker = images // cfg.run.num_workers
    if cfg.data.batch_size > per_worker:
        fail(f"config key 'data.batch_size' = {cfg.data.batch_size} is larger than the "
             f"{per_worker} training images each of the {cfg.run.num_workers} worker(s) gets "
             f"({images} in all): an epoch would have no batch. Use at most {per_worker}.")
    m = cfg.mollify
    if m.enabled and m.sigma_min >= (m.sigma_max or width):
        top = f"mollify.sigma_max = {m.sigma_max:g}" if m.sigma_max else \
            f"the image width ({width} px, the default sigma_max)"
        fail(f"config key 'mollify.sigma_min' = {m.sigma_min:g} must be smaller than {top}: "
             f"the blur schedule would run backwards.")


def check_storage(cfg: Config) -> None:
    """run.storage_path must accept files (checked by a real write probe), and the run.tracker
    client must be installed."""
    from raymoll.tracking import check_tracker
    check_tracker(cfg.run.tracker)
    try:
        check_writable_folder(cfg.run.storage_path)
    except RaymollError as err:
        raise ConfigError(f"config key 'run.storage_path' = {cfg.run.storage_path!r} cannot be "
                          f"used: {err}") from None


def check_train(cfg: Config) -> dict:
    """Everything `raymoll train` can check before Ray; returns the data's meta.json."""
    from raymoll.tune.space import check_objective  # the train loop reports tune's score too
    check_objective(cfg.tune)
    meta = read_meta_file(cfg.data.path)
    check_run_config(cfg, meta)
    check_storage(cfg)
    return meta


def check_study(cfg: Config, resume: bool) -> dict:
    """Everything `raymoll study` can check before Ray: every cell's config (raymoll.study
    expands and validates them), each against the data, the storage, and --resume."""
    from raymoll.study import cell_config, expand
    from raymoll.tune.space import check_objective
    check_objective(cfg.tune)
    cells = expand(cfg)  # the study's own settings first: they do not depend on what is on disk
    meta = read_meta_file(cfg.data.path)
    for cell in cells:
        check_run_config(cell_config(cfg, cell), meta, where=f"study cell {cell.name}: ")
    check_storage(cfg)
    check_search_state(join(absolute(cfg.run.storage_path), cfg.run.name), resume, "study")
    return meta


def search_exists(path: str) -> bool:
    """Whether a Ray Tune search was started at `path` (what `Tuner.can_restore` tests)."""
    return is_file(join(path, TUNER_STATE))


def check_search_state(path: str, resume: bool, what: str = "search") -> None:
    """--resume needs a started Tune experiment (a `what`: search or study) at `path`; a new one
    needs none there."""
    exists = search_exists(path)
    if resume and not exists:
        raise ConfigError(f"--resume: there is no {what} to continue at {path}; run without "
                          "--resume to start it.")
    if exists and not resume:
        raise ConfigError(f"a {what} already exists at {path}: pass --resume to continue it, "
                          "or choose another run.name.")


def check_tune(cfg: Config, resume: bool) -> dict:
    """Everything `raymoll tune` can check before Ray: the space, the data against every probe
    point of the space, the storage, and --resume against what is on disk."""
    from raymoll.tune.space import apply_point, check_space, probe_points
    check_space(cfg)
    meta = read_meta_file(cfg.data.path)
    for point in probe_points(cfg.tune.space):
        check_run_config(apply_point(cfg, point), meta, where=f"tune.space at {point}: ")
    check_storage(cfg)
    check_search_state(join(absolute(cfg.run.storage_path), cfg.run.name), resume)
    return meta


class EvaluateError(RaymollError):
    """Bad arguments to `evaluate` (severities, sizes, device, runner, model, output path)."""


def check_evaluate(data_dir: str | Path, severities: Sequence[int], device: str | None,
                   batch_size: int, subset: int, runner: str | None,
                   checkpoint: object, model: str | None) -> dict:
    """Everything `raymoll evaluate` can check before torch loads: the arguments and the data
    folder's meta.json (the subset against its test split); returns meta.json."""
    if not severities or len(set(severities)) != len(severities) \
            or any(s not in SEVERITIES for s in severities):
        raise EvaluateError(f"severities must be distinct values from 1 to 5, got "
                            f"{list(severities)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise EvaluateError(f"--batch-size must be a positive number of images, got "
                            f"{batch_size!r}.")
    if not isinstance(subset, int) or subset < 0:
        raise EvaluateError(f"--subset must be 0 (every test image) or a positive number of "
                            f"images, got {subset!r}.")
    if runner is not None and runner not in EVALUATION_RUNNERS:
        raise EvaluateError(f"--runner must be one of {', '.join(EVALUATION_RUNNERS)}, got "
                            f"{runner!r}.")
    if device is not None and not _DEVICE.fullmatch(device):
        raise EvaluateError(f"device {device!r} is not a torch device; use cpu or cuda "
                            f"(or cuda:N).")
    if (checkpoint is None) == (model is None):
        raise EvaluateError("give either a raymoll checkpoint (--checkpoint) or another "
                            "model (--model SPEC), not both or neither.")
    meta = read_meta_file(data_dir)
    if subset > meta["counts"]["test"]:
        raise EvaluateError(f"--subset {subset} is more than the {meta['counts']['test']} test "
                            f"images of {str(data_dir)!r}; use 0 for all of them.")
    return meta
