"""Ray Tune over mollification settings: the search space (`space`, no Ray) and the search
(`search`: a Tuner whose trials each fit a TorchTrainer)."""
from __future__ import annotations

from raymoll.config import Config
from raymoll.tune.space import apply_point, check_space, role_probabilities

__all__ = ["apply_point", "check_space", "role_probabilities", "run_search"]


def run_search(cfg: Config, resume: bool = False, callbacks: list | None = None):
    """`raymoll.tune.search.run_search`, imported on first call: Ray Tune and Ray Train take
    seconds to import, and `raymoll tune` checks the space before that."""
    from raymoll.tune.search import run_search as search
    return search(cfg, resume, callbacks)
