"""The cells of a study: the product of `study.axes` and `study.seeds`, each a config.

An axis maps a config key (`data.augment`, `optim.lr`, ...) or the special key `method` to a
list of values. A method is a preset of the keys that make a training method:

    plain            mollify.enabled false, optim.label_smoothing 0
    label_smoothing  mollify.enabled false, optim.label_smoothing = study.label_smoothing
    mollified        the mollify section at the paper's defaults, optim.label_smoothing 0
    tuned:PATH       the mollify section of PATH (a best.yaml of `raymoll tune`), enabled

A named axis (a key without a dot, e.g. `augmentation`) sets several keys per value: each value
is a mapping with a `name` (its label in the tables) and config keys, e.g.
`{name: fcr+mixup, data.augment: [fcr], data.mixup_alpha: 1.0}` (MixUp is no data.augment entry).

`expand` checks everything (every cell's config is validated) before Ray starts. Pure Python.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raymoll.config import Config, ConfigError, MollifyConfig, from_dict, to_dict
from raymoll.tune.space import apply_point

METHOD = "method"
METHODS = ("plain", "label_smoothing", "mollified")
TUNED = "tuned:"
# Keys the study itself sets or that name where its outputs go: never an axis.
RESERVED = ("run.seed", "run.name", "run.storage_path")


class StudyError(ConfigError):
    """A bad `study:` section: the message names the axis, the value and what is allowed."""


@dataclass(frozen=True)
class Cell:
    """One training run of a study."""
    name: str                  # unique, file-name safe: the cell's trial and results label
    values: dict[str, Any]     # axis key -> value, in the order of study.axes (method first)
    seed: int                  # run.seed
    point: dict[str, Any]      # config key -> value: the cell's config is the base with these


def label(value: Any) -> Any:
    """An axis value as a table entry: lists join with '+' ([fcr, augmix] -> 'fcr+augmix'), a
    named axis's mapping is its name."""
    if isinstance(value, dict):
        return value["name"]
    return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else value


def _axis_point(key: str, value: Any) -> dict[str, Any]:
    """The config keys one axis value sets."""
    if "." in key:
        return {key: value}
    return {k: v for k, v in value.items() if k != "name"}


def _check_named(key: str, values: list) -> None:
    """Each value of a named axis: a mapping with a string `name` and config keys."""
    for value in values:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str) \
                or len(value) < 2:
            raise StudyError(f"study.axes[{key!r}]: {value!r} is not a preset; a named axis "
                             f"(a key without a dot) takes mappings like {{name: fcr+mixup, "
                             f"data.augment: [fcr], data.mixup_alpha: 1.0}}.")
        for config_key in value:
            if config_key != "name":
                _check_key(config_key)


def method_point(method: str, label_smoothing: float) -> dict[str, Any]:
    """The config keys a method sets; raises StudyError for an unknown method or a tuned:
    path that is missing or holds no valid mollify section."""
    if method.startswith(TUNED):
        mollify = _tuned_mollify(method[len(TUNED):])
    elif method == "mollified":
        mollify = to_dict(MollifyConfig())
    elif method in ("plain", "label_smoothing"):
        mollify = {"enabled": False}
    else:
        raise StudyError(f"study.axes['method'] value {method!r} is not a method: choose "
                         f"{', '.join(METHODS)} or tuned:PATH (a best.yaml of raymoll tune).")
    smoothing = label_smoothing if method == "label_smoothing" else 0.0
    return {**{f"mollify.{k}": v for k, v in mollify.items()}, "optim.label_smoothing": smoothing}


def _tuned_mollify(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise StudyError(f"study.axes['method'] value 'tuned:{path}': {str(file.resolve())!r} "
                         f"does not exist; give the best.yaml that `raymoll tune` wrote.")
    try:
        section = (yaml.safe_load(file.read_text()) or {}).get("mollify")
        mollify = to_dict(from_dict({"mollify": section}).mollify)
    except (yaml.YAMLError, AttributeError, ConfigError) as err:
        raise StudyError(f"study.axes['method'] value 'tuned:{path}' holds no valid mollify "
                         f"section ({err}); give the best.yaml that `raymoll tune` "
                         f"wrote.") from None
    return {**mollify, "enabled": True}


def _check_key(key: Any) -> None:
    """An axis key must name a field of a config section (or be `method`)."""
    sections = [f.name for f in dataclasses.fields(Config)]
    parts = key.split(".") if isinstance(key, str) else []
    hint = "an axis key is `method` or section.key, e.g. data.augment or optim.lr"
    if len(parts) != 2 or parts[0] not in sections or parts[0] in ("study", "tune"):
        raise StudyError(f"study.axes key {key!r} is not a training config key: {hint}.")
    section = getattr(Config(), parts[0])
    names = [f.name for f in dataclasses.fields(section)]
    if parts[1] not in names:
        raise StudyError(f"study.axes key {key!r} is not a config key: section {parts[0]!r} "
                         f"has {', '.join(names)}.")
    if key in RESERVED:
        raise StudyError(f"study.axes key {key!r} is set by the study itself (seeds come from "
                         f"study.seeds, names and storage from run.name / run.storage_path).")


def _slug(values: dict[str, Any], seed: int) -> str:
    text = "_".join(str(label(v)) for v in values.values()) + f"_s{seed}"
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text)[:80]


def expand(cfg: Config) -> list[Cell]:
    """Every cell of `cfg.study`, in axis order then seed order; raises StudyError (before
    anything runs) on a bad axis key, an empty or repeated axis value, a value the key does not
    accept, bad or repeated seeds, a missing tuned: path or a reference not among the methods."""
    s = cfg.study
    if not s.axes:
        raise StudyError("study.axes is empty: give at least `method: [plain, mollified]`.")
    if METHOD not in s.axes:
        raise StudyError("study.axes has no `method` axis: a study compares methods, e.g. "
                         "`method: [plain, label_smoothing, mollified]`.")
    for key, values in s.axes.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"study.axes[{key!r}] must be a non-empty list of values, got "
                             f"{values!r}.")
        if isinstance(key, str) and "." not in key and key != METHOD:
            _check_named(key, values)
        elif key != METHOD:
            _check_key(key)
        labels = [repr(label(v)) for v in values]
        if len(set(labels)) != len(labels):
            raise StudyError(f"study.axes[{key!r}] repeats a value: {values!r}.")
    methods = s.axes[METHOD]
    if not all(isinstance(m, str) for m in methods):
        raise StudyError(f"study.axes['method'] values must be strings, got {methods!r}.")
    if s.reference not in methods:
        raise StudyError(f"study.reference {s.reference!r} is not among the methods "
                         f"{methods}: the other methods are compared with it.")
    if not s.seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                              for x in s.seeds):
        raise StudyError(f"study.seeds must be a non-empty list of integers >= 0, got "
                         f"{s.seeds!r}.")
    if len(set(s.seeds)) != len(s.seeds):
        raise StudyError(f"study.seeds repeats a seed: {s.seeds!r}; each seed is one "
                         f"repetition of every cell.")

    presets = {m: method_point(m, s.label_smoothing) for m in methods}
    keys = [METHOD] + [k for k in s.axes if k != METHOD]
    cells = []
    for combo in itertools.product(*(s.axes[k] for k in keys)):
        values = dict(zip(keys, combo))
        point = dict(presets[values[METHOD]])
        for key, value in values.items():
            if key != METHOD:
                point |= _axis_point(key, value)
        try:
            apply_point(cfg, point)
        except ConfigError as err:
            shown = {k: label(v) for k, v in values.items()}
            raise StudyError(f"study cell {shown}: {err}") from None
        for seed in s.seeds:
            name = f"{len(cells):03d}_{_slug(values, seed)}"
            cells.append(Cell(name, values, seed, {**point, "run.seed": seed}))
    return cells


def cell_config(cfg: Config, cell: Cell) -> Config:
    """The training config of one cell."""
    return apply_point(cfg, cell.point)
