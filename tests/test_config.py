"""Config: YAML + overrides, validation with messages that name key, value and what is allowed."""
from pathlib import Path

import pytest

from raymoll.config import Config, ConfigError, from_dict, help_text, load_config, to_dict
from raymoll.mollify import MollifyConfig

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def test_defaults_round_trip():
    assert from_dict(to_dict(Config())) == Config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_extends_changes_only_what_it_states():
    base, plain = load_config(CONFIGS / "fashion_small.yaml"), load_config(
        CONFIGS / "fashion_small_plain.yaml")
    assert base.mollify.enabled and not plain.mollify.enabled
    assert plain.mollify == MollifyConfig(enabled=False)
    assert (plain.data, plain.model, plain.optim) == (base.data, base.model, base.optim)


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(CONFIGS / "fashion_small.yaml",
                      ["optim.epochs=7", "mollify.enabled=false", "optim.lr=1e-3",
                       "mollify.p_clean=0.5", "mollify.p_noise=0.5", "mollify.p_blur=0"])
    assert (cfg.optim.epochs, cfg.mollify.enabled, cfg.optim.lr) == (7, False, 1e-3)
    assert cfg.mollify.p_blur == 0.0 and isinstance(cfg.mollify.p_blur, float)


@pytest.mark.parametrize("override, words", [
    (["optimm.lr=1"], ["optimm", "allowed keys"]),
    (["optim.lrr=1"], ["optim.lrr", "lr"]),
    (["optim.epochs=two"], ["optim.epochs", "'two'", "int"]),
    (["optim.epochs=1.5"], ["optim.epochs", "int"]),
    (["mollify.enabled=3"], ["mollify.enabled", "bool"]),
    (["optim.epochs=0"], ["optim.epochs", ">= 1"]),
    (["optim.lr=0"], ["optim.lr", "> 0"]),
    (["mollify.p_noise=-0.1", "mollify.p_clean=0.7667"], ["mollify.p_noise", "-0.1"]),
    (["mollify.p_clean=0.5"], ["sum to 1"]),
    (["mollify.t_beta=0"], ["mollify.t_beta", "> 0"]),
    (["mollify.sigma_min=40", "mollify.sigma_max=32"], ["sigma_min", "40", "sigma_max"]),
    (["mollify.noise_schedule=sigmoid"], ["noise_schedule", "cosine", "linear"]),
    (["model.name=resnet9000"], ["model.name", "preactresnet18"]),
    (["data.mixup_alpha=1", "data.cutmix_alpha=1"], ["mixup", "cutmix"]),
    (["optim.lr=.nan"], ["optim.lr", "finite"]),
    (["optim"], ["section.key=value"]),
    (["data.augment=[fcr,cutout]"], ["data.augment[1]", "cutout", "trivialaugment"]),
    (["data.augment=[fcr,3]"], ["data.augment[1]", "str"]),
    (["optim.label_smoothing=1"], ["optim.label_smoothing", "< 1"]),
    (["optim.label_smoothing=-0.1"], ["optim.label_smoothing", ">= 0"]),
])
def test_bad_values_name_key_value_and_rule(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "fashion_small.yaml", override)
    for word in words:
        assert word in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_help_lists_every_key_with_its_help():
    lines = help_text()
    assert any(line.startswith("mollify.t_beta (float, default 2.0): t ~ Beta") for line in lines)
    assert len(lines) == sum(len(to_dict(Config())[s]) for s in to_dict(Config()))


def test_mollify_defaults_are_the_papers():
    m = MollifyConfig()
    assert (m.p_clean, m.p_noise, m.p_blur, m.p_both) == (1 / 3, 1 / 3, 1 / 3, 0.0)
    assert (m.t_alpha, m.t_beta, m.sigma_min) == (1.0, 2.0, 0.3)
    assert (m.noise_schedule, m.blur_schedule) == ("cosine", "loglinear")
    assert (m.noise_smoothing_power, m.blur_smoothing_power) == (1.0, 1.0)


def test_augment_is_a_list_applied_in_order():
    cfg = load_config(CONFIGS / "fashion_small.yaml", ["data.augment=[fcr,trivialaugment]"])
    assert cfg.data.augment == ["fcr", "trivialaugment"]
    assert load_config(None, ["data.augment=augmix"]).data.augment == ["augmix"]
    assert Config().data.augment == ["fcr"]
    from raymoll.config import DataConfig, validate
    assert validate(Config(data=DataConfig(augment="autoaugment"))).data.augment == ["autoaugment"]


def test_label_smoothing_default_is_off():
    assert Config().optim.label_smoothing == 0.0
    assert load_config(None, ["optim.label_smoothing=0.1"]).optim.label_smoothing == 0.1
