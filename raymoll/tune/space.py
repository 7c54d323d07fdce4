"""The search space: declared in `tune.space`, checked before Ray starts, mapped onto configs.

`tune.space` maps a config key (`mollify.t_beta`, `optim.lr`, ...) or a derived name to a spec:

    {type: uniform | loguniform, low: L, high: H}
    {type: quniform, low: L, high: H, q: Q}     # multiples of Q in [L, H]
    {type: randint, low: L, high: H}            # integers L <= k < H (as Ray's tune.randint)
    {type: choice, values: [...]}               # one value, drawn by the searcher
    {type: grid, values: [...]}                 # every value in turn (random search only)

The derived names set the role probabilities so that they always sum to 1:

    clean_fraction    p_clean
    both_fraction     p_both (blur, then noise)
    noise_blur_ratio  the noised share of the rest:  p_noise = (1 - p_clean - p_both) * ratio,
                      p_blur = (1 - p_clean - p_both) * (1 - ratio)

The paper's roles (1/3 each, never both) are clean_fraction 1/3, noise_blur_ratio 1/2,
both_fraction 0. This module is pure Python (no Ray), so `check_space` runs in milliseconds.
"""
from __future__ import annotations

import math
from typing import Any

from raymoll.config import (Config, ConfigError, MollifyConfig, TuneConfig, from_dict,
                            to_dict)

DERIVED = ("clean_fraction", "noise_blur_ratio", "both_fraction")
ROLE_KEYS = ("mollify.p_clean", "mollify.p_noise", "mollify.p_blur", "mollify.p_both")
SPEC_FIELDS = {"uniform": ("low", "high"), "loguniform": ("low", "high"),
               "quniform": ("low", "high", "q"), "randint": ("low", "high"),
               "choice": ("values",), "grid": ("values",)}
# What a trial reports per epoch that a search may select on, and which way is better.
METRIC_MODES = {"val_score": "max", "val_accuracy": "max", "clean_accuracy": "max",
                "val_nll": "min", "clean_nll": "min", "val_ece": "min", "clean_ece": "min"}
OBJECTIVE_KEYS = tuple(k for k in METRIC_MODES if k != "val_score")


def role_probabilities(m: MollifyConfig, clean_fraction: float | None = None,
                       noise_blur_ratio: float | None = None,
                       both_fraction: float | None = None) -> dict[str, float]:
    """p_clean, p_noise, p_blur, p_both from the derived names; a name not given keeps the
    value that `m` implies. Raises ConfigError when the fractions cannot sum to 1."""
    mollified = m.p_noise + m.p_blur
    values = {"clean_fraction": m.p_clean if clean_fraction is None else clean_fraction,
              "noise_blur_ratio": (m.p_noise / mollified if mollified else 0.5)
              if noise_blur_ratio is None else noise_blur_ratio,
              "both_fraction": m.p_both if both_fraction is None else both_fraction}
    for name, value in values.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"search space value {name} = {value!r} must lie in [0, 1].")
    clean, ratio, both = values.values()
    if clean + both > 1.0 + 1e-9:
        raise ConfigError(f"clean_fraction + both_fraction = {clean:g} + {both:g} > 1: the role "
                          "probabilities cannot sum to 1; lower the high bound of one of them.")
    rest = max(0.0, 1.0 - clean - both)
    return {"p_clean": clean, "p_noise": rest * ratio, "p_blur": rest * (1.0 - ratio),
            "p_both": both}


def _set(data: dict, key: str, value: Any) -> None:
    """data['a']['b'] = value for key 'a.b'; raises ConfigError when 'a' is not a section."""
    *sections, name = key.split(".")
    if not sections:
        raise ConfigError(f"search space key {key!r} is neither a config key (section.key, e.g. "
                          f"mollify.t_beta) nor a derived name ({', '.join(DERIVED)}).")
    node = data
    for part in sections:
        node = node.get(part)
        if not isinstance(node, dict):
            raise ConfigError(f"search space key {key!r}: '{part}' is not a config section "
                              f"(sections: {', '.join(data)}).")
    node[name] = value


def _plain(value: Any) -> Any:
    """Searchers hand out numpy scalars (np.int64 is no int); the config wants Python ones."""
    return value.item() if hasattr(value, "item") else value


def apply_point(cfg: Config, point: dict[str, Any]) -> Config:
    """The config of one trial: `cfg` with the values of `point` set, derived names mapped to
    the role probabilities. Pure and validated; raises ConfigError on a bad key or value."""
    point = {key: _plain(value) for key, value in point.items()}
    data = to_dict(cfg)
    derived = {key: point[key] for key in DERIVED if key in point}
    if derived:
        data["mollify"].update(role_probabilities(cfg.mollify, **derived))
    for key, value in point.items():
        if key not in DERIVED:
            _set(data, key, value)
    return from_dict(data)


def searched_keys(space: dict) -> list[str]:
    """The config keys a search changes: its dotted keys, and the role probabilities when a
    derived name is searched."""
    keys = [key for key in space if key not in DERIVED]
    return keys + list(ROLE_KEYS) * any(key in DERIVED for key in space)


def expected_trials(t: TuneConfig) -> int:
    """Trials in a whole search: num_samples, times each grid's length."""
    return t.num_samples * math.prod(len(spec["values"]) for spec in t.space.values()
                                     if spec["type"] == "grid")


def metric_mode(metric: str) -> str:
    """'max' or 'min': which way `metric` is better."""
    if metric not in METRIC_MODES:
        raise ConfigError(f"config key 'tune.metric' = {metric!r} is not a reported metric: "
                          f"choose one of {', '.join(METRIC_MODES)}.")
    return METRIC_MODES[metric]


def _check_spec(key: str, spec: Any, search: str) -> None:
    where = f"tune.space['{key}']"
    if not isinstance(spec, dict) or spec.get("type") not in SPEC_FIELDS:
        raise ConfigError(f"{where} = {spec!r} must be a mapping with a type, one of "
                          f"{', '.join(SPEC_FIELDS)}; e.g. {{type: uniform, low: 1, high: 4}}.")
    kind, fields = spec["type"], SPEC_FIELDS[spec["type"]]
    given = set(spec) - {"type"}
    if given != set(fields):
        raise ConfigError(f"{where} of type {kind} needs exactly the fields {', '.join(fields)}, "
                          f"got {', '.join(sorted(given)) or 'none'}.")
    if "values" in fields:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}: 'values' must be a non-empty list, got "
                              f"{spec['values']!r}.")
        if kind == "grid" and search != "random":
            raise ConfigError(f"{where} is a grid, which only random search expands; use type "
                              f"choice with tune.search = {search}, or tune.search = random.")
        return
    numbers = {name: spec[name] for name in fields}
    for name, value in numbers.items():
        ok_type = int if kind == "randint" else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value):
            raise ConfigError(f"{where}: {name} = {value!r} must be a finite "
                              f"{'integer' if kind == 'randint' else 'number'}.")
    if numbers["low"] >= numbers["high"]:
        raise ConfigError(f"{where}: low = {numbers['low']!r} must be smaller than high = "
                          f"{numbers['high']!r}.")
    if kind == "loguniform" and numbers["low"] <= 0:
        raise ConfigError(f"{where}: a loguniform range needs low > 0, got {numbers['low']!r}.")
    if kind == "quniform" and numbers["q"] <= 0:
        raise ConfigError(f"{where}: q = {numbers['q']!r} must be > 0.")


def probe_points(space: dict) -> list[dict[str, Any]]:
    """Points that `check_space` builds configs for: both corners of every numeric range,
    each combined with every value of every choice (values cycled in step)."""
    values = {key: spec["values"] for key, spec in space.items() if "values" in spec}
    steps = max((len(v) for v in values.values()), default=1)
    low = {key: spec["low"] for key, spec in space.items() if key not in values}
    high = {key: spec["high"] - 1 if spec["type"] == "randint" else spec["high"]  # exclusive
            for key, spec in space.items() if key not in values}
    return [corner | {key: v[i % len(v)] for key, v in values.items()}
            for corner in (low, high) for i in range(steps)]


def check_objective(t: TuneConfig) -> None:
    """Raise ConfigError unless tune.objective weighs known metrics (train reports it too)."""
    weights = list((t.objective or {}).values())
    if (not t.objective or set(t.objective) - set(OBJECTIVE_KEYS)
            or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights)):
        raise ConfigError(f"config key 'tune.objective' = {t.objective!r} must give finite weights "
                          f"to one or more of {', '.join(OBJECTIVE_KEYS)} (never the 15 test "
                          "corruptions).")


def check_space(cfg: Config) -> None:
    """Raise ConfigError for an empty, malformed or inconsistent search space or objective,
    before Ray starts: every spec is checked, then configs are built at the probe points."""
    t = cfg.tune
    space = t.space
    if not space:
        raise ConfigError("tune.space is empty: declare at least one key to search, e.g. "
                          "tune.space: {mollify.t_beta: {type: uniform, low: 1, high: 9}}; "
                          "jobs/configs/fashion_tune.yaml holds the default space.")
    for key, spec in space.items():
        if key in ROLE_KEYS:
            raise ConfigError(f"tune.space['{key}']: role probabilities drawn one by one do not "
                              f"sum to 1; search {', '.join(DERIVED)} instead.")
        if key.split(".")[0] == "tune":
            raise ConfigError(f"tune.space['{key}']: a search cannot search its own settings.")
        _check_spec(key, spec, t.search)
    metric_mode(t.metric)
    check_objective(t)
    if not t.trial_cpus > 0:
        raise ConfigError("config key 'tune.trial_cpus' must be > 0 (Ray refuses a trial with "
                          "no CPU); a fraction such as 0.25 lets trial drivers share a core.")
    for point in probe_points(space):
        try:
            apply_point(cfg, point)
        except ConfigError as err:
            raise ConfigError(f"tune.space is inconsistent: the point {point} gives a bad "
                              f"config: {err}") from None
