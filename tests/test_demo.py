"""The demo's comparison is fair: its two runs differ in mollification and nothing else."""
from dataclasses import replace
from pathlib import Path

from raymoll.demo import demo_configs
from raymoll.mollify import MollifyConfig


def test_demo_runs_differ_only_in_mollification(tmp_path: Path):
    plain, mollified = demo_configs(tmp_path / "data", tmp_path, epochs=3, train_subset=100,
                                    width=8, use_gpu=False)
    assert plain.mollify == MollifyConfig(enabled=False)
    assert mollified.mollify == MollifyConfig()  # the paper's defaults
    assert (plain.run.name, mollified.run.name) == ("plain", "mollified")
    assert replace(plain, mollify=mollified.mollify, run=mollified.run) == mollified
    assert plain.optim.epochs == 3 and plain.data.train_subset == 100
