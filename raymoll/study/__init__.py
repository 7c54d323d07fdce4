"""`raymoll study`: a grid of training runs (methods x axes x seeds) as one Ray Tune
experiment, each cell evaluated on clean + corrupted sets, merged into one table and reported
with mean +- std over seeds and paired bootstrap confidence intervals.

`cells` (the grid, no Ray) and `report` (statistics and figures, no Ray) load light; `run`
(Ray Tune, Ray Train, the evaluation) loads on first call of `run_study`.
"""
from __future__ import annotations

from raymoll.config import Config
from raymoll.study.cells import Cell, StudyError, cell_config, expand

__all__ = ["Cell", "StudyError", "cell_config", "expand", "run_study"]


def run_study(cfg: Config, resume: bool = False, callbacks: list | None = None):
    """`raymoll.study.run.run_study`, imported on first call (Ray takes seconds to import)."""
    from raymoll.study.run import run_study as run
    return run(cfg, resume, callbacks)
