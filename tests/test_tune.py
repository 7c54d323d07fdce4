"""The search space (no Ray) and, marked `ray`, searches on a real local Ray."""
from pathlib import Path

import numpy as np
import pytest

from raymoll.cli import main
from raymoll.config import Config, ConfigError, MollifyConfig, from_dict, load_config, to_dict
from raymoll.tune import apply_point, check_space, role_probabilities
from raymoll.tune.space import expected_trials, probe_points

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
TUNE_CONFIGS = sorted(CONFIGS.glob("*tune*.yaml"))
# The paper's roles (METHOD.md §1.1) in the derived names, by their definition.
PAPER_ROLES = {"clean_fraction": 1 / 3, "noise_blur_ratio": 0.5, "both_fraction": 0.0}


def with_space(space: dict, **tune) -> Config:
    return from_dict({"tune": {"space": space, **tune}})


# --- the default spaces ----------------------------------------------------------------------


def test_tune_configs_exist():
    assert {p.name for p in TUNE_CONFIGS} >= {"fashion_tune.yaml", "cifar10_tune.yaml"}


@pytest.mark.parametrize("path", TUNE_CONFIGS, ids=lambda p: p.name)
def test_paper_defaults_are_a_point_of_the_default_space(path):
    cfg = load_config(path)
    check_space(cfg)
    point = {}
    for key, spec in cfg.tune.space.items():
        if key in PAPER_ROLES:
            value = PAPER_ROLES[key]
        else:  # mollify keys at MollifyConfig's (paper) defaults, others (optim.lr) as configured
            section, name = key.split(".")
            value = getattr(MollifyConfig() if section == "mollify" else getattr(cfg, section), name)
        if "values" in spec:
            assert value in spec["values"], key
        else:
            assert spec["low"] <= value <= spec["high"], key
        point[key] = value
    got = to_dict(apply_point(cfg, point).mollify)
    assert got == pytest.approx(to_dict(MollifyConfig()), abs=1e-12)


# --- mapping a point to a config -------------------------------------------------------------


@pytest.mark.parametrize("clean, ratio, both", [(1 / 3, 0.5, 0.0), (0.2, 0.9, 0.1),
                                                (0.0, 0.0, 0.0), (0.5, 1.0, 0.5), (1.0, 0.3, 0.0)])
def test_role_probabilities_follow_the_definition(clean, ratio, both):
    p = role_probabilities(MollifyConfig(), clean, ratio, both)
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-12)
    assert p["p_clean"] == clean and p["p_both"] == both
    assert p["p_noise"] == pytest.approx((1 - clean - both) * ratio, abs=1e-12)
    assert p["p_blur"] == pytest.approx((1 - clean - both) * (1 - ratio), abs=1e-12)


def test_derived_names_not_searched_keep_the_config_values():
    base = from_dict({"mollify": {"p_clean": 0.4, "p_noise": 0.45, "p_blur": 0.15, "p_both": 0.0}})
    m = apply_point(base, {"clean_fraction": 0.1}).mollify
    # the rest (0.9) keeps the base's noise:blur split of 0.45:0.15 = 3:1
    assert (m.p_clean, m.p_noise, m.p_blur, m.p_both) == pytest.approx((0.1, 0.675, 0.225, 0.0))


def test_apply_point_sets_keys_takes_numpy_scalars_and_is_pure():
    base = Config()
    before = to_dict(base)
    cfg = apply_point(base, {"mollify.t_beta": np.float64(4.5), "data.batch_size": np.int64(64),
                             "mollify.noise_schedule": "power", "optim.lr": 0.2})
    assert cfg.mollify.t_beta == 4.5 and type(cfg.data.batch_size) is int
    assert cfg.data.batch_size == 64 and cfg.mollify.noise_schedule == "power"
    assert cfg.optim.lr == 0.2
    assert to_dict(base) == before
    changed = {(s, k) for s, sec in to_dict(cfg).items() for k, v in sec.items()
               if before[s][k] != v}
    assert changed == {("mollify", "t_beta"), ("data", "batch_size"),
                       ("mollify", "noise_schedule"), ("optim", "lr")}


def test_probe_points_cover_both_bounds_and_every_choice():
    space = {"a.x": {"type": "uniform", "low": 1.0, "high": 2.0},
             "a.k": {"type": "randint", "low": 3, "high": 7},
             "a.c": {"type": "choice", "values": ["u", "v", "w"]}}
    points = probe_points(space)
    assert {p["a.x"] for p in points} == {1.0, 2.0}
    assert {p["a.k"] for p in points} == {3, 6}  # randint's high is exclusive
    assert {p["a.c"] for p in points} == {"u", "v", "w"}
    assert all(set(p) == set(space) for p in points)


def test_expected_trials_multiplies_grids():
    cfg = with_space({"mollify.t_beta": {"type": "grid", "values": [2.0, 4.0, 9.0]},
                      "mollify.sigma_max": {"type": "grid", "values": [0.0, 16.0]},
                      "mollify.t_alpha": {"type": "uniform", "low": 0.5, "high": 2.0}},
                     num_samples=2)
    check_space(cfg)
    assert expected_trials(cfg.tune) == 2 * 3 * 2


# --- bad spaces fail before Ray, with a message naming the problem ----------------------------

UNIFORM = {"type": "uniform", "low": 1.0, "high": 4.0}
BAD_SPACES = [
    ({}, {}, "tune.space is empty"),
    ({"mollify.t_bta": UNIFORM}, {}, "unknown config key 'mollify.t_bta'"),
    ({"lr": UNIFORM}, {}, "neither a config key"),
    ({"mollify.t_beta.x": UNIFORM}, {}, "'t_beta' is not a config section"),
    ({"mollify.t_beta": {"type": "uniform", "low": 4.0, "high": 4.0}}, {}, "must be smaller"),
    ({"mollify.t_beta": {"type": "uniform", "low": 4.0}}, {}, "needs exactly the fields"),
    ({"mollify.t_beta": {"type": "normal", "low": 1, "high": 2}}, {}, "must be a mapping with a"),
    ({"mollify.t_beta": [1, 2]}, {}, "must be a mapping with a"),
    ({"mollify.t_beta": {"type": "loguniform", "low": 0.0, "high": 2.0}}, {}, "low > 0"),
    ({"mollify.t_beta": {"type": "uniform", "low": "1", "high": 2}}, {}, "finite number"),
    ({"data.batch_size": {"type": "randint", "low": 16.5, "high": 64}}, {}, "finite integer"),
    ({"mollify.t_beta": {"type": "quniform", "low": 1, "high": 2, "q": 0}}, {}, "q = 0"),
    ({"mollify.noise_schedule": {"type": "choice", "values": []}}, {}, "non-empty list"),
    ({"mollify.noise_schedule": {"type": "choice", "values": ["cosine", "sigmoid"]}}, {},
     "'mollify.noise_schedule' = 'sigmoid' is not allowed"),
    ({"mollify.t_beta": {"type": "uniform", "low": -1.0, "high": 2.0}}, {}, "out of range"),
    ({"mollify.p_clean": {"type": "uniform", "low": 0.1, "high": 0.5}}, {}, "clean_fraction"),
    ({"clean_fraction": {"type": "uniform", "low": 0.5, "high": 0.8},
      "both_fraction": {"type": "uniform", "low": 0.0, "high": 0.3}}, {},
     "clean_fraction + both_fraction"),
    ({"noise_blur_ratio": {"type": "uniform", "low": 0.5, "high": 1.5}}, {}, "must lie in [0, 1]"),
    ({"mollify.sigma_min": {"type": "uniform", "low": 0.3, "high": 10.0},
      "mollify.sigma_max": {"type": "choice", "values": [0.0, 8.0]}}, {}, "sigma_min"),
    ({"mollify.t_beta": {"type": "grid", "values": [2.0, 4.0]}}, {"search": "optuna"},
     "only random search"),
    ({"tune.num_samples": {"type": "randint", "low": 1, "high": 4}}, {}, "its own settings"),
    ({"mollify.t_beta": UNIFORM}, {"metric": "test_accuracy"}, "tune.metric"),
    ({"mollify.t_beta": UNIFORM}, {"objective": {"gaussian_noise_accuracy": 1.0}},
     "never the 15 test corruptions"),
    ({"mollify.t_beta": UNIFORM}, {"objective": {}}, "tune.objective"),
    ({"mollify.t_beta": UNIFORM}, {"trial_cpus": 0.0}, "tune.trial_cpus"),
]


@pytest.mark.parametrize("space, tune, message", BAD_SPACES, ids=[m for *_, m in BAD_SPACES])
def test_check_space_rejects(space, tune, message):
    with pytest.raises(ConfigError) as err:
        check_space(with_space(space, **tune))
    assert message in str(err.value)


def test_cli_rejects_a_bad_space_before_ray(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(f"extends: {CONFIGS / 'fashion_tune.yaml'}\n"
                      "tune:\n  space:\n    mollify.t_beta: {type: uniform, low: 9, high: 1}\n")
    assert main(["tune", "--config", str(config)]) == 2
    assert "tune.space['mollify.t_beta']: low = 9" in capsys.readouterr().err
