"""The demo's comparison is fair: its three runs differ in the method and nothing else."""
from dataclasses import replace
from pathlib import Path

from raymoll.demo import LABEL_SMOOTHING, demo_configs
from raymoll.mollify import MollifyConfig


def test_demo_runs_differ_only_in_the_method(tmp_path: Path):
    plain, smoothed, mollified = demo_configs(tmp_path / "data", tmp_path, epochs=3,
                                              train_subset=100, width=8, use_gpu=False)
    assert (plain.run.name, smoothed.run.name, mollified.run.name) == (
        "plain", "label_smoothing", "mollified")
    assert plain.mollify == smoothed.mollify == MollifyConfig(enabled=False)
    assert mollified.mollify == MollifyConfig()  # the paper's defaults
    assert (plain.optim.label_smoothing, smoothed.optim.label_smoothing,
            mollified.optim.label_smoothing) == (0.0, LABEL_SMOOTHING, 0.0)
    for other in (smoothed, mollified):
        assert replace(plain, mollify=other.mollify, optim=other.optim, run=other.run) == other
        assert replace(plain.optim, label_smoothing=other.optim.label_smoothing) == other.optim
    assert plain.optim.epochs == 3 and plain.data.train_subset == 100
