"""Models from outside raymoll: `--model torchvision:NAME | timm:NAME | python:FILE.py:FN`.

torchvision and timm models are built with the data's class count (no pretrained download);
`python:` calls FN(num_classes) when it takes an argument, else FN(). Weights, when given, load
with `torch.load(weights_only=True)` (a state dict, optionally under "state_dict" or "model").
`--input` says what the model expects: the data's normalisation, [0, 1] floats (RobustBench's
convention) or ImageNet's mean/std.
"""
from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch
from torch import nn

from raymoll.data import normalizer
from raymoll.data.loader import Normalize
from raymoll.errors import RaymollError

INPUTS = ("normalized", "unit", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelSpecError(RaymollError):
    """A --model SPEC, --weights file or --input that cannot give a classifier for the data."""


def check_spec(spec: str, input_kind: str) -> tuple[str, str]:
    """(kind, rest) of a SPEC, checked without importing anything heavy."""
    kind, _, rest = spec.partition(":")
    if kind not in ("torchvision", "timm", "python") or not rest:
        raise ModelSpecError(f"--model {spec!r} is not torchvision:NAME, timm:NAME or "
                             f"python:FILE.py:FN (e.g. torchvision:resnet18).")
    if kind == "python":
        file, _, fn = rest.rpartition(":")
        if not file or not fn or not Path(file).is_file():
            raise ModelSpecError(f"--model {spec!r}: expected python:FILE.py:FN with an existing "
                                 f"FILE.py and a function name FN.")
    if input_kind not in INPUTS:
        raise ModelSpecError(f"--input must be one of {', '.join(INPUTS)}, got {input_kind!r}.")
    return kind, rest


def input_normalizer(input_kind: str, meta: dict) -> Normalize:
    """uint8 images -> what the model expects (all three as one Normalize, in 0-255 units)."""
    if input_kind == "unit":
        return Normalize([0.0] * 3, [255.0] * 3)
    if input_kind == "imagenet":
        return Normalize([255 * m for m in IMAGENET_MEAN], [255 * s for s in IMAGENET_STD])
    return normalizer(meta)


def _build(kind: str, rest: str, num_classes: int) -> nn.Module:
    if kind == "torchvision":
        import torchvision
        try:
            return torchvision.models.get_model(rest, weights=None, num_classes=num_classes)
        except (ValueError, KeyError) as err:
            raise ModelSpecError(f"torchvision has no model {rest!r} ({err}); see "
                                 f"torchvision.models.list_models().") from None
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ModelSpecError("timm: models need the timm package: pip install "
                                 "'raymoll[timm]'.") from None
        if not timm.is_model(rest):
            raise ModelSpecError(f"timm has no model {rest!r}; see timm.list_models().")
        return timm.create_model(rest, pretrained=False, num_classes=num_classes)
    file, _, fn = rest.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, fn, None)
    if not callable(factory):
        raise ModelSpecError(f"{file} has no function {fn!r}.")
    model = factory(num_classes) if inspect.signature(factory).parameters else factory()
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{file}:{fn} returned {type(model).__name__}, not an nn.Module.")
    return model


def load_external(spec: str, weights: str | Path | None, num_classes: int) -> nn.Module:
    """The model of `spec` for `num_classes` classes with `weights` loaded (eval mode, CPU)."""
    model = _build(*check_spec(spec, "normalized"), num_classes)
    if weights is not None:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a file that is not a checkpoint
            raise ModelSpecError(f"--weights {str(weights)!r} is not a PyTorch state dict "
                                 f"loadable with weights_only=True ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200]}).") from None
        if isinstance(state, dict) and ("state_dict" in state or "model" in state):
            state = state.get("state_dict", state.get("model"))
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ModelSpecError(f"--weights {str(weights)!r} do not fit {spec}: "
                                 f"{str(err).strip().splitlines()[0][:300]}") from None
    return model.eval()


def check_output(model: nn.Module, normalize: nn.Module, images: torch.Tensor,
                 num_classes: int, spec: str) -> None:
    """Raise ModelSpecError unless one small batch of uint8 images gives (N, num_classes)."""
    with torch.no_grad():
        try:
            out = model(normalize(images[:2]))
        except Exception as err:  # a model that cannot take these images at all
            raise ModelSpecError(f"{spec} fails on a batch of {tuple(images[:2].shape)} images "
                                 f"({type(err).__name__}: {err}).") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(images[:2]), num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelSpecError(f"{spec} returns {shape} for a batch of {len(images[:2])} images; "
                             f"expected logits of shape (N, {num_classes}) for the "
                             f"{num_classes} classes of the data.")
