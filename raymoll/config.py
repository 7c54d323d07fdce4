"""Typed settings for every raymoll verb, loaded from YAML plus `a.b=value` overrides.

A config is a tree of dataclasses. Each field's metadata carries its help text and, where it
matters, the allowed range or choices; `validate` walks the tree and raises one `ConfigError`
naming the key, the value and what is allowed, before anything expensive (Ray, a download) runs.

This module is pure Python: no torch, Ray or FFCV, so the CLI can check a config in milliseconds.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymoll.errors import RaymollError


class ConfigError(RaymollError):
    """A bad setting: the message names the key, the value and what is allowed."""


def _field(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
           factory: Any = None) -> Any:
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    path: str = _field("runs/data/fashion-mnist", "folder with train.beton, val.beton, test.beton "
                       "and meta.json (written by `raymoll prepare`); training reads train and "
                       "val, only `raymoll evaluate` reads test")
    batch_size: int = _field(128, "training batch size per worker", low=1)
    eval_batch_size: int = _field(500, "evaluation batch size", low=1)
    num_workers: int = _field(2, "FFCV loader threads per worker", low=1)
    augment: list[str] = _field(None, "per-sample augmentations on the device, applied in order "
                                "(a single name is read as a one-item list); fcr = flip + "
                                "crop(pad 4) + rotate(15 deg), the paper's base, which the paper "
                                "combines with one policy, e.g. [fcr, trivialaugment]",
                                choices=("none", "fcr", "trivialaugment", "randaugment",
                                         "autoaugment", "augmix"), factory=lambda: ["fcr"])
    mixup_alpha: float = _field(0.0, "MixUp Beta(alpha, alpha); 0 turns it off", low=0.0)
    cutmix_alpha: float = _field(0.0, "CutMix Beta(alpha, alpha); 0 turns it off", low=0.0)
    train_subset: int = _field(0, "use only the first N training images (0 = all)", low=0)
    os_cache: bool = _field(True, "let the OS page cache hold the .beton (fast for small sets)")


@dataclass
class ModelConfig:
    name: str = _field("smallcnn", "architecture from the registry",
                       choices=("smallcnn", "preactresnet18", "preactresnet50", "wrn40_2",
                                "resnet50"))
    width: int = _field(32, "base channel width of smallcnn (other models ignore it)", low=4)
    channels_last: bool = _field(True, "use channels_last memory format on CUDA")


@dataclass
class OptimConfig:
    epochs: int = _field(300, "training epochs", low=1)
    lr: float = _field(0.01, "peak learning rate (SGD)", low=0.0, low_open=True)
    momentum: float = _field(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = _field(5e-4, "L2 weight decay", low=0.0)
    nesterov: bool = _field(False, "Nesterov momentum")
    warmup_epochs: float = _field(0.0, "linear warm-up before the cosine decay", low=0.0)
    label_smoothing: float = _field(0.0, "plain label smoothing eps: targets (1 - eps) onehot + "
                                    "eps / K for every sample; with mollification on it is "
                                    "applied first, then the mollifier smooths those targets",
                                    low=0.0, high=1.0, high_open=True)
    ema_decay: float = _field(0.0, "EMA of the weights (and BatchNorm statistics) after each "
                              "step, e.g. 0.999; reported as ema_* metrics, checkpointed, and "
                              "selected when its val_score is higher; 0 = off", low=0.0,
                              high=1.0, high_open=True)
    bf16: bool = _field(True, "bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = _field(False, "torch.compile the model (worth it on GPUs)")


@dataclass
class MollifyConfig:
    """Mollification settings; the defaults are exactly the paper's (docs/method.md)."""
    enabled: bool = _field(True, "mollify training batches (False = plain training)")
    p_clean: float = _field(1 / 3, "probability a sample stays clean", low=0.0, high=1.0)
    p_noise: float = _field(1 / 3, "probability a sample is noised", low=0.0, high=1.0)
    p_blur: float = _field(1 / 3, "probability a sample is blurred", low=0.0, high=1.0)
    p_both: float = _field(0.0, "probability a sample is blurred then noised (not in the paper)",
                           low=0.0, high=1.0)
    t_alpha: float = _field(1.0, "t ~ Beta(t_alpha, t_beta)", low=0.0, low_open=True)
    t_beta: float = _field(2.0, "t ~ Beta(t_alpha, t_beta)", low=0.0, low_open=True)
    noise_schedule: str = _field("cosine", "alpha_t, sigma_t schedule; cosine = paper; power: "
                                 "sigma_t = sin(pi/2 t^noise_shape)",
                                 choices=("cosine", "linear", "power"))
    noise_shape: float = _field(1.0, "exponent of the power noise schedule", low=0.0, low_open=True)
    blur_schedule: str = _field("loglinear", "sigma_B(t); loglinear = paper",
                                choices=("loglinear", "linear"))
    sigma_min: float = _field(0.3, "blur sigma at t = 0 (pixels)", low=0.0, low_open=True)
    sigma_max: float = _field(0.0, "blur sigma at t = 1 (pixels); 0 = the image width (paper)",
                              low=0.0)
    noise_smoothing_power: float = _field(1.0, "gamma_n = (1 + SNR)^-power", low=0.0,
                                          low_open=True)
    blur_smoothing_power: float = _field(1.0, "gamma_b = t^power", low=0.0, low_open=True)
    role_sampling: str = _field("stratified", "how a batch's roles are drawn: stratified = exact "
                                "per-batch counts (expected counts, remainder at random) in a "
                                "random order, so only the rows that need it are blurred or "
                                "noised; iid = one independent draw per sample. Both give every "
                                "sample the same role probabilities; only stratified fixes the "
                                "per-batch counts", choices=("stratified", "iid"))


@dataclass
class EvalConfig:
    val_severity: int = _field(3, "severity of the validation corruptions reported each epoch",
                               low=1, high=5)
    val_subset: int = _field(1000, "images of the validation split (val.beton) scored each "
                             "epoch, clean (clean_*) and under the 4 validation corruptions "
                             "(val_*); 0 = all", low=0)
    seed: int = _field(0, "seed of the corruption generator", low=0)


@dataclass
class RunConfig:
    name: str = _field("raymoll", "run name (folder under storage_path)")
    storage_path: str = _field("runs", "where Ray Train keeps checkpoints: a folder or a URI "
                               "(s3://...)")
    num_workers: int = _field(1, "DDP workers", low=1)
    use_gpu: bool = _field(False, "one GPU per worker")
    cpus_per_worker: float = _field(1.0, "CPUs reserved per worker", low=0.0)
    max_failures: int = _field(0, "worker-group restarts from the last checkpoint", low=-1)
    num_to_keep: int = _field(2, "checkpoints kept (the best by tune.metric, val_score by "
                              "default, is kept too)", low=1)
    seed: int = _field(0, "seed for weights and every random stream of each rank (data order, "
                       "augmentation, MixUp/CutMix, mollification)", low=0)
    tracker: str = _field("none", "live experiment tracking of every epoch (train) or trial "
                          "(tune); none sends nothing anywhere",
                          choices=("none", "tensorboard", "mlflow", "wandb"))
    tracker_uri: str = _field("", "tensorboard: log folder (default <run folder>/tensorboard); "
                              "mlflow: tracking URI, e.g. sqlite:///mlflow.db; wandb: its folder")
    tracker_project: str = _field("", "mlflow experiment or wandb project (default: run.name "
                                  "for mlflow, raymoll for wandb)")


@dataclass
class TuneConfig:
    num_samples: int = _field(8, "trials", low=1)
    search: str = _field("random", "searcher", choices=("random", "optuna"))
    metric: str = _field("val_score", "what a trial reports and the search selects on")
    objective: dict = _field(None, "weights of the selection score: keys "
                             "{val,clean}_{accuracy,nll,ece}; score = sum w * value, maximised",
                             factory=lambda: {"val_accuracy": 1.0, "val_ece": -1.0})
    grace_period: int = _field(1, "ASHA: epochs before a trial may be stopped", low=1)
    reduction_factor: float = _field(2.0, "ASHA reduction factor", low=1.0, low_open=True)
    max_concurrent: int = _field(0, "trials at once (0 = as many as resources allow)", low=0)
    trial_cpus: float = _field(1.0, "CPUs of each trial's driver process", low=0.0)
    space: dict = _field(None, "search space: {key: {type: uniform|loguniform|choice|randint, "
                         "...}}", factory=dict)
    final_evaluate: bool = _field(False, "evaluate the best checkpoint on the 15 test corruptions")


@dataclass
class StudyConfig:
    """A grid of runs for `raymoll study` (checked in full by raymoll.study.cells)."""
    axes: dict = _field(None, "config key (or `method`) -> list of values; the cells are the "
                        "product of the axes and the seeds. method values: plain, "
                        "label_smoothing, mollified, tuned:PATH (a best.yaml of raymoll tune)",
                        factory=dict)
    seeds: list = _field(None, "run.seed of each repetition of every cell (distinct ints)",
                         factory=lambda: [0])
    label_smoothing: float = _field(0.1, "optim.label_smoothing of the label_smoothing method",
                                    low=0.0, high=1.0, high_open=True)
    reference: str = _field("plain", "the method the others are compared with (paired by "
                            "seed and the other axis values)")
    bootstrap: int = _field(10000, "bootstrap resamples of the paired differences", low=100)
    eval_subset: int = _field(0, "score only the first N test images of each of a cell's 96 "
                              "evaluation sets (0 = all)", low=0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mollify: MollifyConfig = field(default_factory=MollifyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    study: StudyConfig = field(default_factory=StudyConfig)


# ---------------------------------------------------------------------------------------------
# Building a config from plain dicts, with types and ranges checked


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are, and a
    single item where a list is (it becomes a one-item list)."""
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_coerce(f"{key}[{i}]", item, item_tp) for i, item in enumerate(items)]
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string; accept what float() reads as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) == (tp is bool):  # bool is an int subclass: keep them apart
        if tp is float and isinstance(value, int):
            return float(value)
        if isinstance(value, tp):
            return value
    raise ConfigError(f"config key '{key}' = {value!r} has the wrong type: expected "
                      f"{_type_name(tp)}, got {type(value).__name__}.")


def _check_range(key: str, value: Any, meta: dict) -> None:
    choices, low, high = meta.get("choices"), meta.get("low"), meta.get("high")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_range(f"{key}[{i}]", item, meta)
        return
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' = {value!r} is not allowed: choose one of "
                          f"{', '.join(map(str, choices))}.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' = {value!r} must be a finite number.")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            op = ">" if meta.get("low_open") else ">="
            high_op = "<" if meta.get("high_open") else "<="
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: it must be "
                              f"{op} {low}" + (f" and {high_op} {high}." if high is not None
                                               else "."))
        if high is not None and (value > high or (meta.get("high_open") and value == high)):
            high_op = "<" if meta.get("high_open") else "<="
            raise ConfigError(f"config key '{key}' = {value!r} is out of range: it must be "
                              f"{high_op} {high}.")


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, "
                          f"got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}': allowed keys in "
                          f"'{prefix.rstrip('.') or '<top>'}' are {', '.join(fields)}.")
    kwargs = {}
    for name, value in data.items():
        key, tp = prefix + name, hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
            _check_range(key, kwargs[name], fields[name].metadata)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Check ranges and the cross-field rules; returns the checked config (list fields
    normalised, e.g. data.augment="fcr" -> ["fcr"]) or raises ConfigError."""
    cfg = _build(Config, to_dict(cfg), "")  # re-checks types and ranges of a config built in code
    m = cfg.mollify
    probs = {"mollify.p_clean": m.p_clean, "mollify.p_noise": m.p_noise,
             "mollify.p_blur": m.p_blur, "mollify.p_both": m.p_both}
    if abs(sum(probs.values()) - 1.0) > 1e-6:
        raise ConfigError("mollify role probabilities must sum to 1, got "
                          + " + ".join(f"{k}={v:g}" for k, v in probs.items())
                          + f" = {sum(probs.values()):g}.")
    if m.sigma_max and m.sigma_min >= m.sigma_max:
        raise ConfigError(f"config key 'mollify.sigma_min' = {m.sigma_min!r} must be smaller "
                          f"than mollify.sigma_max = {m.sigma_max!r}.")
    if cfg.data.mixup_alpha and cfg.data.cutmix_alpha:
        raise ConfigError("data.mixup_alpha and data.cutmix_alpha are both set: choose one "
                          "(set the other to 0).")
    return cfg


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (YAML-ready)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Build and validate a Config from nested dicts (missing keys take defaults)."""
    return validate(_build(Config, data or {}, ""))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.1' -> (['optim', 'lr'], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, "
                          "e.g. optim.epochs=2.")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `a.b=value` into the nested dict `data` (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is not a section.")
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate; raises ConfigError."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--config {str(path)!r} is a folder; pass a YAML file in it, "
                              f"e.g. {str(path / 'NAME.yaml')!r}.")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist.")
        data = _read_yaml(path)
    return from_dict(apply_overrides(data, list(overrides)))


def _merge(base: dict, top: dict) -> dict:
    """Nested dict update: `top` wins, sections merge."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML config; `extends: other.yaml` (relative to it) is read first and merged
    under it, so a variant states only what differs from its base."""
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} extends itself through {seen}.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text (UTF-8 YAML) file: it holds "
                          f"binary data.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections.")
    base = data.pop("extends", None)
    if base is None:
        return data
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"config file {str(path)!r} extends {base!r}, which does not exist.")
    return _merge(_read_yaml(base_path, seen + (path.resolve(),)), data)


def help_text(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key: `key (type, default): help` — for `raymoll train --help-config`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += help_text(tp, prefix + f.name + ".")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} ({_type_name(tp)}, default {default!r}): "
                         f"{f.metadata.get('help', '')}")
    return lines

