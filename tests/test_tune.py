"""The search space (no Ray) and, marked `ray`, searches on a real local Ray."""
import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from ray import tune

from raymoll.cli import main
from raymoll.config import Config, ConfigError, MollifyConfig, from_dict, load_config, to_dict
from raymoll.tune import apply_point, check_space, role_probabilities
from raymoll.tune.space import expected_trials, probe_points

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
TUNE_CONFIGS = sorted(CONFIGS.glob("*tune*.yaml"))
# The paper's roles (docs/method.md §2) in the derived names, by their definition.
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
            source = MollifyConfig() if section == "mollify" else getattr(cfg, section)
            value = getattr(source, name)
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


# --- searches on a real local Ray -------------------------------------------------------------

EPOCHS = 3
GOOD_LR, BAD_LR = 0.05, 1e-5  # written 1.0e-5 in YAML


class InterruptAfter(tune.Callback):
    """Ctrl-C for a search: SIGUSR1 (Tune saves its state and returns) once `n` trials have
    completed. The ids of those go into `marker`, whose existence also keeps the copy of this
    callback that a resumed search restores from firing again."""

    def __init__(self, n: int, marker: Path):
        self.n, self.marker, self.completed = n, marker, []

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed.append(trial.trial_id)
        if len(self.completed) == self.n and not self.marker.exists():
            self.marker.write_text("\n".join(self.completed))
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def interrupted_search(ray_local, fashion_mnist_dir, tmp_path_factory):
    """4 trials, 2 at a time: one good learning rate, then three that barely learn, so ASHA
    (grace 1 epoch, reduction factor 2) stops a bad one at epoch 1 whichever reports first.
    Interrupted once 3 trials completed, then resumed."""
    from raymoll.tune import run_search
    out = tmp_path_factory.mktemp("tune")
    cfg = load_config(CONFIGS / "fashion_tune.yaml", [
        f"data.path={fashion_mnist_dir}", "data.train_subset=1024",
        "data.batch_size=32", "data.num_workers=1", "eval.val_subset=128", "model.width=8",
        f"optim.epochs={EPOCHS}", f"run.storage_path={out}", "run.name=search",
        # Ray Train's placement groups of trials that ASHA stops are freed by a helper that
        # needs the dashboard (absent here): small worker CPUs keep any leak from blocking.
        # One worker per trial: DDP is test_train's; each worker costs ~10 s of imports.
        "run.num_workers=1", "run.cpus_per_worker=0.25", "tune.trial_cpus=0.5",
        "tune.max_concurrent=2", "tune.num_samples=1", "tune.objective={val_accuracy: 1.0}",
        "tune.space={optim.lr: {type: grid, values: [0.05, 1.0e-5, 1.0e-5, 1.0e-5]},"
        " clean_fraction: {type: uniform, low: 0.2, high: 0.5}}"])
    marker = out / "interrupted"
    first = run_search(cfg, callbacks=[InterruptAfter(3, marker)])
    first_trials = pd.read_parquet(first.trials)
    second = run_search(cfg, resume=True)
    return cfg, first, first_trials, marker.read_text().split(), second


@pytest.mark.ray
def test_search_stops_early_and_writes_trials_and_a_trainable_best_config(interrupted_search,
                                                                          tmp_path):
    from raymoll.train import fit
    cfg, _, _, _, result = interrupted_search
    trials = pd.read_parquet(result.trials)
    last = trials.sort_values("epoch").groupby("trial_id").tail(1).set_index("trial_id")
    assert len(last) == 4
    assert (last["epoch"] < EPOCHS).sum() >= 1            # ASHA stopped at least one early
    assert (last["epoch"] == EPOCHS).sum() >= 1
    assert set(last["trial_status"]) <= {"completed", "stopped"}
    assert (last["trial_status"] == "stopped").sum() == (last["epoch"] < EPOCHS).sum()
    assert (trials["config/mollify.p_clean"] == trials["config/clean_fraction"]).all()
    assert sorted(last["config/optim.lr"]) == sorted([GOOD_LR] + 3 * [BAD_LR])
    # best.yaml is the trial with the best final metric, and it trains
    best_id = last["val_score"].idxmax()
    best = load_config(result.best_config, [f"run.storage_path={tmp_path}", "optim.epochs=1"])
    assert best.run.name == "search-best"
    assert best.optim.lr == last.loc[best_id, "config/optim.lr"]
    assert best.mollify.p_clean == pytest.approx(last.loc[best_id, "config/clean_fraction"])
    trained = fit(best)
    assert trained.metrics["epoch"] == 1 and trained.last_checkpoint


@pytest.mark.ray
def test_interrupted_search_resumes_without_rerunning_finished_trials(interrupted_search):
    _, first, first_trials, completed, second = interrupted_search
    assert not first.finished and first.best_config is None
    assert second.finished and Path(second.best_config).is_file()
    assert len(completed) == 3
    assert set(first_trials.loc[~first_trials["trial_id"].isin(completed), "trial_status"]) == {
        "unfinished"}
    trials = pd.read_parquet(second.trials)
    assert trials["trial_id"].nunique() == 4
    columns = ["trial_id", "epoch", "val_score", "timestamp"]
    for trial_id in completed:  # the same rows, reported once, before the interruption
        before = first_trials.loc[first_trials["trial_id"] == trial_id, columns]
        after = trials.loc[trials["trial_id"] == trial_id, columns]
        pd.testing.assert_frame_equal(before.reset_index(drop=True), after.reset_index(drop=True),
                                      check_dtype=False)
    resumed = trials[~trials["trial_id"].isin(completed)]
    assert resumed["epoch"].max() == EPOCHS and resumed["epoch"].is_unique
