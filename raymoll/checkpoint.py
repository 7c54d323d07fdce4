"""The checkpoint format: one `checkpoint.pt` per checkpoint folder, loadable with
`torch.load(weights_only=True)` (tensors, numbers, strings, lists and dicts only).

Keys: model (state dict, no DDP prefix), optimizer, scheduler, epoch (completed epochs),
config (the resolved Config as a dict), meta (the dataset's meta.json), metrics (what was
reported with it); with optim.ema_decay > 0 also ema (the EMA model's state dict, same keys as
model) and selected ("raw" or "ema": the weights selection chose). No random-generator state:
a run reseeds every stream each epoch from (run.seed, rank, epoch), see raymoll.train.loop.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymoll.models import build_model
from raymoll.errors import RaymollError
from raymoll.io import StorageError, atomic_path, is_file, is_uri, join, read_bytes

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
    """Read a checkpoint file, or the checkpoint.pt inside a folder; local or a URI
    (s3://bucket/run/checkpoint_..., read through raymoll.io)."""
    if is_uri(path):
        path = str(path)
        file = path if is_file(path) else join(path, CHECKPOINT_FILE)
        found = is_file(file)
    else:
        path = Path(path)
        file = path / CHECKPOINT_FILE if path.is_dir() else path
        found = file.is_file()
    if not found:
        raise CheckpointError(f"no raymoll checkpoint at {str(path)!r}: expected a folder with "
                              f"{CHECKPOINT_FILE} (as `raymoll train` prints) or that file.")
    try:
        source = io.BytesIO(read_bytes(file)) if is_uri(file) else file
        state = torch.load(source, map_location="cpu", weights_only=True)
    except StorageError:
        raise
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{str(file)!r} is not a readable raymoll checkpoint: "
                              f"{err}") from None
    missing = {"model", "config", "meta"} - set(state)
    if missing:
        raise CheckpointError(f"{str(file)!r} lacks {sorted(missing)}: not a raymoll checkpoint.")
    return state


WEIGHTS = ("selected", "raw", "ema")


def _weights_of(state: dict[str, Any], file: str, weights: str) -> tuple[dict, str]:
    """(state dict, "raw" or "ema") for `weights`: "raw" (key `model`), "ema" (key `ema`,
    present when optim.ema_decay > 0) or "selected" (key `selected`, what selection chose;
    "raw" for checkpoints that predate EMA)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}.")
    chosen = state.get("selected", "raw") if weights == "selected" else weights
    if chosen == "ema" and "ema" not in state:
        raise CheckpointError(f"checkpoint {file!r} has no EMA weights (it was trained with "
                              f"optim.ema_decay=0); evaluate it with --weights raw.")
    return state["ema" if chosen == "ema" else "model"], chosen


def load_model(path: str | Path, device: str | torch.device = "cpu",
               num_classes: int | None = None,
               weights: str = "selected") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from the registry and load its weights; returns (model in eval mode,
    checkpoint dict, with "weights" set to the weights loaded: "raw" or "ema"). With
    `num_classes`, a checkpoint for another class count is refused; `weights` as in WEIGHTS."""
    state = load_checkpoint(path)
    model_cfg, meta = state["config"].get("model"), state["meta"]
    if not isinstance(model_cfg, dict) or not {"name", "width"} <= set(model_cfg):
        raise CheckpointError(f"checkpoint {str(path)!r} has no model settings (config.model "
                              f"with name and width) to rebuild its network from; it was not "
                              f"written by `raymoll train`.")
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained on {meta['num_classes']} "
                              f"classes ({meta['dataset']}) but the data has {num_classes}.")
    weights_dict, state["weights"] = _weights_of(state, str(path), weights)
    model = build_model(model_cfg["name"], meta["num_classes"], width=model_cfg["width"])
    try:
        model.load_state_dict(weights_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise CheckpointError(f"the weights in checkpoint {str(path)!r} do not fit its config "
                              f"(model {model_cfg['name']!r}, width {model_cfg['width']}): "
                              f"{' '.join(line.strip() for line in first[:3])}") from None
    return model.to(device).eval(), state
