"""The evaluation sets: clean, the 15 test corruptions and the 4 validation corruptions at each
severity (1 + 19 x 5 = 96 rows), and where each set's images come from.

Corrupted images come from an official -C folder when one is given (the 4 validation
corruptions only where the folder has them); else they are generated from the clean test images
with one torch.Generator per set, seeded from (seed, corruption, severity), so any single set
can be reproduced alone (docs/protocol.md).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from raymoll.corruptions import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS
from raymoll.corruptions.official import check_corruptions_dir, read_corrupted
from raymoll.preflight import SEVERITIES



@dataclass(frozen=True)
class EvalSet:
    """One row of the results table: a corruption at a severity (clean: "clean", 0)."""
    corruption: str
    family: str
    severity: int


def eval_sets(severities: Sequence[int] = SEVERITIES) -> list[EvalSet]:
    """Clean, then the 15 test corruptions, then the 4 validation ones, each at `severities`."""
    return ([EvalSet("clean", "clean", 0)]
            + [EvalSet(name, FAMILIES[name], s) for name in CORRUPTIONS for s in severities]
            + [EvalSet(name, "validation", s) for name in VALIDATION_CORRUPTIONS
               for s in severities])


def set_seed(seed: int, corruption: str, severity: int) -> int:
    """The generator seed of one set: a 63-bit hash of (seed, corruption, severity)."""
    digest = hashlib.sha256(f"{seed}/{corruption}/{severity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


OfficialSource = Callable[[EvalSet], "tuple[torch.Tensor, torch.Tensor] | None"]


def official_source(corruptions_dir: str | Path | None, meta: dict,
                    subset: int = 0) -> tuple[OfficialSource, list[str]]:
    """Check the -C folder (all 15 test corruptions required, the validation ones optional;
    every .npy's shape and dtype by its header, against the data's image size); returns the
    reader of one set (None: generate it) and the names read from the folder."""
    if corruptions_dir is None:
        return (lambda spec: None), []
    root = Path(corruptions_dir)
    # Either layout: <name>.npy (CIFAR-C) or <name>/<severity>/ (Tiny-ImageNet-C).
    names = list(CORRUPTIONS) + [n for n in VALIDATION_CORRUPTIONS
                                 if (root / f"{n}.npy").is_file() or (root / n).is_dir()]
    check_corruptions_dir(root, names, image_size=tuple(meta["image_size"]))

    def source(spec: EvalSet) -> tuple[torch.Tensor, torch.Tensor] | None:
        if spec.corruption not in names:
            return None
        images, labels = read_corrupted(root, spec.corruption, spec.severity, meta["class_names"])
        return (images[:subset], labels[:subset]) if subset else (images, labels)

    return source, names
