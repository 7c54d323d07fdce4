"""What the benchmark scripts share: timing on a device and the one machine-readable result line
that jobs/bench/run_all.py collects.

The scripts import it as `from common import ...`: running `python jobs/bench/x.py` puts this
folder first on sys.path.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Iterable

import torch

RESULT_PREFIX = "RESULT "

Step = Callable[[torch.Tensor, torch.Tensor], None]


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: str | torch.device) -> str:
    """'cpu', or 'cuda (<GPU model>)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def images_per_second(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device, step: Step | None = None) -> float:
    """Images per second over one pass of `batches` (moved to `device`, fed to `step`),
    queued device work included."""
    synchronize(device)
    count, start = 0, time.perf_counter()
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if step is not None:
            step(x, y)
        count += len(y)
    synchronize(device)
    return count / (time.perf_counter() - start)


def report_result(bench: str, compared: str, measured: float, unit: str, target: str,
                  passed: bool | None, device: str, details: str = "") -> None:
    """Print the benchmark's result as one line: RESULT {json}.

    measured: a ratio (unit "x"), seconds ("s") or a fraction ("share"). target: the condition
    as text, e.g. "<= 1.02". passed: None when this run is not the configuration the target is
    set for (e.g. a CPU run of a GPU target).
    """
    # float() and bool(): NumPy scalars (e.g. from pandas) are not JSON-serialisable.
    result = {"bench": bench, "compared": compared, "ratio": float(measured), "unit": unit,
              "target": target, "passed": None if passed is None else bool(passed),
              "device": device, "details": details}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(line: str) -> dict | None:
    """The dict of a RESULT line, or None for any other line."""
    if not line.startswith(RESULT_PREFIX):
        return None
    return json.loads(line[len(RESULT_PREFIX):])
