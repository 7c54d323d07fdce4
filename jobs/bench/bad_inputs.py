"""How fast every bad-argument case of the reliability issue fails: each runs `raymoll ...` as
its own process and must exit 2 (a RaymollError or an argparse error) before Ray starts.

    PYTHONPATH=. python jobs/bench/bad_inputs.py

Target: the slowest case < 2 s wall on an idle machine. Set-up (a small prepared synthetic
data folder, a binary file, a read-only-by-type path) is not timed. Each case's CPU time (user +
sys of its process) is printed beside its wall time: a start-up is one busy thread, so on a
loaded machine the CPU time is what the wall time would be when idle.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import report_result

TARGET_S = 2.0


def cases(data: Path, scratch: Path) -> dict[str, list[str]]:
    """{description: raymoll arguments}, each one a user mistake."""
    file = scratch / "a-file"
    binary = scratch / "weights.bin"
    bad_meta = scratch / "bad-meta"
    train = ["train", f"data.path={data}", f"run.storage_path={scratch / 'runs'}"]
    space = "tune.space={mollify.t_beta: {type: uniform, low: 1, high: 9}}"
    tune = ["tune", f"data.path={data}", f"run.storage_path={scratch / 'runs'}", space]
    return {
        "train: data.train_subset > split": [*train, "data.train_subset=100000"],
        "train: sigma_min >= image width": [*train, "mollify.sigma_min=32"],
        "train: batch_size > training subset": [*train, "data.train_subset=50",
                                                "data.batch_size=64"],
        "train: unknown tune.objective key": [*train, "tune.objective={val_acc: 1}"],
        "train: storage_path is a file": [*train, f"run.storage_path={file}"],
        "train: missing data folder": ["train", "data.path=/nonexistent"],
        "train: meta.json image_size [32]": ["train", f"data.path={bad_meta}"],
        "train: binary --config": ["train", "--config", str(binary)],
        "train: folder as --config": ["train", "--config", str(scratch)],
        "tune: sigma_min range past width": [
            "tune", f"data.path={data}", f"run.storage_path={scratch / 'runs'}",
            "tune.space={mollify.sigma_min: {type: uniform, low: 0.1, high: 40}}"],
        "tune: --resume with nothing to resume": [*tune, "--resume"],
        "prepare: unknown dataset": ["prepare", "--dataset", "nosuch", "--out",
                                     str(scratch / "x")],
        "prepare: --out is a file": ["prepare", "--dataset", "synthetic", "--out", str(file)],
        "evaluate: --subset -5": ["evaluate", "--data", str(data), "--checkpoint", str(file),
                                  "--subset", "-5"],
        "evaluate: --batch-size 0": ["evaluate", "--data", str(data), "--checkpoint", str(file),
                                     "--batch-size", "0"],
        "evaluate: --subset > test split": ["evaluate", "--data", str(data), "--checkpoint",
                                            str(file), "--subset", "100000"],
        "evaluate: missing data folder": ["evaluate", "--data", "/nonexistent", "--checkpoint",
                                          str(file)],
        "report: --out is a file": ["report", str(scratch / "none.parquet"), "--out", str(file)],
        "demo: --epochs 0": ["demo", "--epochs", "0"],
        "demo: --width 0": ["demo", "--width", "0"],
    }


def _children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def set_up(scratch: Path) -> Path:
    from raymoll.data import prepare
    data = prepare("synthetic", scratch / "data", progress=False, num_train=200, num_test=50)
    (scratch / "a-file").write_text("not a folder")
    (scratch / "weights.bin").write_bytes(bytes(range(256)) * 16)
    (scratch / "bad-meta").mkdir()
    meta = json.loads((data / "meta.json").read_text())
    (scratch / "bad-meta" / "meta.json").write_text(json.dumps(meta | {"image_size": [32]}))
    return data


def main() -> int:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    with tempfile.TemporaryDirectory(prefix="raymoll-bad-inputs-") as folder:
        scratch = Path(folder)
        data = set_up(scratch)
        times, cpu_times, wrong = {}, {}, []
        for name, argv in cases(data, scratch).items():
            started, cpu_before = time.perf_counter(), _children_cpu_s()
            done = subprocess.run([sys.executable, "-m", "raymoll.cli", *argv],
                                  capture_output=True, text=True, timeout=300)
            times[name] = time.perf_counter() - started
            cpu_times[name] = _children_cpu_s() - cpu_before
            if done.returncode != 2 or "Traceback" in done.stderr:
                wrong.append(f"{name}: exit {done.returncode}")
            print(f"{times[name]:6.2f} s wall {cpu_times[name]:5.2f} s CPU  "
                  f"exit {done.returncode}  {name}", flush=True)
    slowest = max(times, key=times.get)
    busiest = max(cpu_times, key=cpu_times.get)
    report_result("bad_inputs", f"slowest of {len(times)} bad-argument cases ({slowest})",
                  times[slowest], "s", f"< {TARGET_S:g} s idle, exit 2",
                  times[slowest] < TARGET_S and not wrong, "cpu",
                  ("; ".join(wrong) or "all exit 2 without a traceback")
                  + f"; most CPU: {cpu_times[busiest]:.2f} s ({busiest})")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
