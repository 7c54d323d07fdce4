"""Datasets to FFCV .beton files, the FFCV loader for one DDP rank, batch augmentation and
MixUp/CutMix.

The names load on first use (PEP 562): importing FFCV and numba takes seconds, and the CLI's
up-front checks use `raymoll.data.sources` without them.
"""
from __future__ import annotations

import importlib
import sys
import types

_MODULE_OF = {"AUGMENTS": "augment", "BatchAugment": "augment", "flip_crop_rotate": "augment",
              "BatchMix": "mix", "batch_mix": "mix", "load_split": "loader", "make_loader": "loader",
              "normalizer": "loader", "prepare": "prepare", "read_meta": "prepare",
              "DATASETS": "sources", "DataError": "sources", "load_source": "sources"}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Loading the submodule `prepare` binds it as the package's attribute; the package's
        # `prepare` is the function (as an eager `from .prepare import prepare` made it).
        if name in _MODULE_OF and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
