"""The checkpoint format: one `checkpoint.pt` per checkpoint folder, loadable with
`torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts only).

Keys: model (state dict, no DDP prefix), optimizer, scheduler, epoch (completed epochs),
config (the resolved Config as a dict), meta (the dataset's meta.json), metrics (what was
reported with it), rng (torch CPU state and the mollifier generator's state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymoll.models import build_model
from raymoll.errors import RaymollError
from raymoll.io import atomic_path

CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RaymollError):
    """A checkpoint that is missing, unreadable, or does not fit the data it is used with."""


def save_checkpoint(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to folder/checkpoint.pt atomically (raymoll.io); returns the file."""
    file = Path(folder) / CHECKPOINT_FILE
    with atomic_path(file) as temporary:
        torch.save(state, temporary)
    return file


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file, or the checkpoint.pt inside a folder."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no raymoll checkpoint at {str(path)!r}: expected a folder with "
                              f"{CHECKPOINT_FILE} (as `raymoll train` prints) or that file.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{str(file)!r} is not a readable raymoll checkpoint: {err}") from None
    missing = {"model", "config", "meta"} - set(state)
    if missing:
        raise CheckpointError(f"{str(file)!r} lacks {sorted(missing)}: not a raymoll checkpoint.")
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu",
               num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the registry and load its weights; returns (model in eval mode,
    checkpoint dict). With `num_classes`, a checkpoint for another class count is refused."""
    state = load_checkpoint(path)
    model_cfg, meta = state["config"]["model"], state["meta"]
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained on {meta['num_classes']} "
                              f"classes ({meta['dataset']}) but the data has {num_classes}.")
    model = build_model(model_cfg["name"], meta["num_classes"], width=model_cfg["width"])
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
