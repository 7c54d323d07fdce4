"""Run the benchmarks, each in its own process, and tabulate their RESULT lines.

    PYTHONPATH=. python jobs/bench/run_all.py --quick                 # a few minutes on a CPU
    PYTHONPATH=. python jobs/bench/run_all.py --device cuda --markdown bench.md
    PYTHONPATH=. python jobs/bench/run_all.py --only pipeline loader

Without --quick every benchmark runs at its own default sizes (the targets' sizes).
tune_startup (a 4-trial Tune search) runs only with --with-tune or when named in --only;
corruptions builds its reference environment, .venv-bench/, on first use.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import device_name, parse_result

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Benchmark:
    takes_device: bool  # has a --device option
    quick: tuple[str, ...]  # arguments of the --quick run


BENCHMARKS = {
    "augment": Benchmark(True, ("--rounds", "3")),
    "mollify": Benchmark(True, ("--rounds", "5")),
    "loader": Benchmark(True, ("--subset", "10000", "--rounds", "2")),
    "pipeline": Benchmark(True, ("--subset", "5120", "--rounds", "5")),
    "corruptions": Benchmark(False, ("--n", "100")),
    "evaluate": Benchmark(True, ("--n", "500", "--model", "smallcnn")),
    "tune_startup": Benchmark(False, ("--trials", "2", "--epochs", "2")),
    "bad_inputs": Benchmark(False, ()),
}
COLUMNS = ("benchmark", "what was compared", "measured", "target", "result")


def machine(device: str) -> str:
    """CPU model, core count, torch version and the benchmarks' device, on one line."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"device {device_name(device)}")


def run(name: str, args: list[str], verbose: bool) -> tuple[list[dict], list[str], int]:
    """Run one benchmark script; returns its RESULT dicts (one per target it measures; none if
    it printed none), its output lines and its exit code."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
    process = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *args], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    results, lines = [], []
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        if verbose:
            print(f"    {line}", end="", flush=True)
        result = parse_result(line)
        if result is not None:
            results.append(result)
    return results, lines, process.wait()


def measured(result: dict) -> str:
    value, unit = result["ratio"], result["unit"]
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "share":
        return f"{value:.0%}"
    return f"{value:.3f}x" if value < 10 else f"{value:.1f}x"


def verdict(result: dict | None, code: int) -> str:
    if result is None or code != 0:
        return f"error (exit {code})"
    return {True: "pass", False: "MISS", None: "n/a (other config)"}[result["passed"]]


def table_rows(rows: list[tuple[str, dict | None, int]]) -> list[tuple[str, ...]]:
    return [(name, r["compared"] if r else "-", measured(r) if r else "-",
             r["target"] if r else "-", verdict(r, code)) for name, r, code in rows]


def text_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths))
             for row in [COLUMNS, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[tuple[str, ...]], details: list[str], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines + [""] + [f"- {d}" for d in details]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: minutes on a CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"), help="for the benchmarks that take one")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run just these, of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--with-tune", action="store_true", help="also run tune_startup")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table here")
    parser.add_argument("--verbose", action="store_true", help="echo each benchmark's output")
    args = parser.parse_args(argv)
    names = args.only or [n for n in BENCHMARKS if n != "tune_startup" or args.with_tune]

    header = f"machine: {machine(args.device)}"
    print(header, flush=True)
    rows = []
    for i, name in enumerate(names, 1):
        bench = BENCHMARKS[name]
        bench_args = [*(bench.quick if args.quick else ()),
                      *(("--device", args.device) if bench.takes_device else ())]
        print(f"[{i}/{len(names)}] {name} {' '.join(bench_args)} ...", flush=True)
        started = time.perf_counter()
        results, lines, code = run(name, bench_args, args.verbose)
        seconds = time.perf_counter() - started
        summary = ", ".join(f"{measured(r)} ({verdict(r, code)})" for r in results)
        print(f"[{i}/{len(names)}] {name}: {summary or '-'} in {seconds:.0f} s", flush=True)
        if (not results or code != 0) and not args.verbose:
            print("\n".join(f"    {line}" for line in lines[-15:]), flush=True)
        rows += [(r["bench"], r, code) for r in results] or [(name, None, code)]

    table = table_rows(rows)
    details = [f"{name}: {r['details']} [{r['device']}]" for name, r, _ in rows if r]
    print(f"\n{header}\n{text_table(table)}\n" + "\n".join(details))
    if args.markdown:
        args.markdown.write_text(markdown(table, details, header))
        print(f"wrote {args.markdown}")
    return 1 if any(r is None or code != 0 for _, r, code in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
