"""The study report: per cell mean +- std over seeds, paired differences against the reference
method with bootstrap confidence intervals, a Figure-5-style bar chart, summary.md.

Per run (one cell at one seed) the headline numbers are those of `raymoll report`: clean = the
clean set, corrupted = the mean over the 15 test corruptions at every severity in the table.
Std is the sample standard deviation over seeds (ddof = 1). A paired difference takes two runs
that share every axis value but the method, and the seed: d_s = method_s - reference_s. Its 95%
interval is the percentile bootstrap over seeds: `BOOTSTRAP_SEED` seeds a NumPy Generator,
which draws B resamples of the k seeds with replacement (one (B, k) index matrix, shared by
every comparison); the interval is the 2.5th and 97.5th percentiles of the B resampled means.
With few seeds the interval is coarse (k = 2 has only 3 distinct resampled means).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from raymoll.io import atomic_write, filesystem
from raymoll.report import TEST_FAMILIES, _save

STUDY_KEY = b"raymoll_study"  # schema metadata of study.parquet: the study section, the axes
BOOTSTRAP_SEED = 0
METRICS = ("accuracy", "nll", "ece", "nll_ts", "ece_ts")  # those present in the table are used
FIGURE_METRICS = ("corrupted_accuracy", "corrupted_nll", "corrupted_ece", "corrupted_ece_ts")
GROUP_AXES = ("data.augment", "augmentation")  # the figure's groups: the first axis present


def is_study(path: str | Path) -> bool:
    """True for a study.parquet (written by `raymoll study`), False for any other file."""
    try:
        fs, inner = filesystem(path)
        return STUDY_KEY in (pq.read_schema(inner, filesystem=fs).metadata or {})
    except (OSError, ValueError):  # StorageError is a ValueError
        return False


def per_run(rows: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """One row per (axis values, seed): clean_<m> and corrupted_<m> for each metric m present."""
    metrics = [m for m in METRICS if m in rows]
    keys = list(axes) + ["seed"]
    clean = rows[rows["family"] == "clean"].groupby(keys, sort=False)[metrics].mean()
    test = rows[rows["family"].isin(TEST_FAMILIES)].groupby(keys, sort=False)[metrics].mean()
    return pd.concat([clean.add_prefix("clean_"), test.add_prefix("corrupted_")],
                     axis=1).reset_index()


def mean_std(runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Per cell (axis values): n seeds, and <metric>_mean, <metric>_std (ddof 1) over seeds."""
    values = [c for c in runs if c not in list(axes) + ["seed"]]
    grouped = runs.groupby(list(axes), sort=False)
    out = pd.concat([grouped[values].mean().add_suffix("_mean"),
                     grouped[values].std(ddof=1).add_suffix("_std")], axis=1)
    out.insert(0, "seeds", grouped["seed"].count())
    return out[["seeds"] + [f"{v}_{s}" for v in values for s in ("mean", "std")]].reset_index()


def bootstrap_ci(differences: np.ndarray, resamples: int, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences` (k paired differences, one
    per seed): resample the k seeds with replacement `resamples` times."""
    d = np.asarray(differences, dtype=float)
    index = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[index].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_differences(runs: pd.DataFrame, axes: Sequence[str], reference: str,
                       resamples: int) -> pd.DataFrame:
    """Per method other than `reference` and per value of the other axes: for each metric the
    mean paired difference (method - reference) over the shared seeds and its 95% bootstrap
    interval (<metric>_diff, _low, _high), and the number of pairs."""
    others = [a for a in axes if a != "method"]
    values = [c for c in runs if c not in list(axes) + ["seed"]]
    ref = runs[runs["method"] == reference].drop(columns="method")
    rows = []
    for method in dict.fromkeys(runs["method"]):
        if method == reference:
            continue
        pairs = runs[runs["method"] == method].drop(columns="method").merge(
            ref, on=others + ["seed"], suffixes=("", "_ref"))
        for key, group in (pairs.groupby(others, sort=False) if others else [((), pairs)]):
            key = key if isinstance(key, tuple) else (key,)
            row = {"method": method, **dict(zip(others, key)), "pairs": len(group)}
            for v in values:
                d = (group[v] - group[f"{v}_ref"]).to_numpy()
                row[f"{v}_diff"] = float(d.mean())
                row[f"{v}_low"], row[f"{v}_high"] = bootstrap_ci(d, resamples)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(metric: str, value: float, signed: bool = False) -> str:
    if value != value:  # NaN: one seed has no std
        return "-"
    if "accuracy" in metric:
        return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _cell_table(cells: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str]) -> str:
    header = list(axes) + ["seeds"] + [m.replace("_", " ") for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(axes) + "---:|" * (
        len(metrics) + 1)]
    for _, row in cells.iterrows():
        entries = [str(row[a]) for a in axes] + [str(row["seeds"])] + [
            f"{_fmt(m, row[f'{m}_mean'])} ± {_fmt(m, row[f'{m}_std'])}" for m in metrics]
        lines.append("| " + " | ".join(entries) + " |")
    return "\n".join(lines)


def _diff_table(diffs: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str]) -> str:
    keys = ["method"] + [a for a in axes if a != "method"]
    header = keys + ["pairs"] + [m.replace("_", " ") for m in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(keys) + "---:|" * (
        len(metrics) + 1)]
    for _, row in diffs.iterrows():
        entries = [str(row[k]) for k in keys] + [str(row["pairs"])] + [
            f"{_fmt(m, row[f'{m}_diff'], True)} [{_fmt(m, row[f'{m}_low'], True)}, "
            f"{_fmt(m, row[f'{m}_high'], True)}]" for m in metrics]
        lines.append("| " + " | ".join(entries) + " |")
    return "\n".join(lines)


def figure(runs: pd.DataFrame, axes: Sequence[str], path: Path) -> None:
    """Figure 5 of the paper: one group per augmentation (or the first non-method axis), one
    bar per method, panels corrupted accuracy / NLL / ECE (and ECE after temperature scaling,
    when the table has it); error bars = std over the runs (seeds, and any further axis)."""
    others = [a for a in axes if a != "method"]
    group = next((a for a in GROUP_AXES if a in others), others[0] if others else None)
    groups = list(dict.fromkeys(runs[group])) if group else [""]
    methods = list(dict.fromkeys(runs["method"]))
    metrics = [m for m in FIGURE_METRICS if m in runs]
    fig = Figure(figsize=(4.5 * len(metrics), 4.2))
    width = 0.8 / len(methods)
    for ax, metric in zip(fig.subplots(1, len(metrics)), metrics):
        for k, method in enumerate(methods):
            chosen = [runs[(runs["method"] == method) & ((runs[group] == g) if group else True)]
                      [metric] for g in groups]
            scale = 100 if "accuracy" in metric else 1
            ax.bar(np.arange(len(groups)) + (k - (len(methods) - 1) / 2) * width,
                   [c.mean() * scale for c in chosen], width,
                   yerr=[c.std(ddof=1) * scale if len(c) > 1 else 0 for c in chosen],
                   capsize=3, label=method)
        ax.set_xticks(range(len(groups)), [str(g) for g in groups], rotation=20, ha="right")
        name = metric.removeprefix("corrupted_").removesuffix("_ts")
        ax.set_title("corrupted " + {"accuracy": "accuracy (%)", "nll": "NLL (nats)",
                                     "ece": "ECE"}[name]
                     + (", temperature-scaled" if metric.endswith("_ts") else ""))
        ax.grid(axis="y", alpha=0.3)
        if "accuracy" in metric:
            low = min(p.get_height() for p in ax.patches)
            ax.set_ylim(bottom=max(0.0, low - 10))
    fig.axes[0].legend(fontsize=9, frameon=False)
    fig.suptitle("Corrupted test sets (mean over 15 corruptions x severities); bars = mean over "
                 "seeds, error bars = std")
    fig.tight_layout()
    _save(fig, path)


def study_report(results: str | Path, out: str | Path) -> Path:
    """Write summary.md and study.png for a study.parquet into `out`; returns summary.md."""
    table = pq.read_table(results)
    study = json.loads(table.schema.metadata[STUDY_KEY])
    axes, settings = study["axes"], study["study"]
    runs = per_run(table.drop_columns([c for c in table.column_names
                                       if c.startswith("bin_")]).to_pandas(), axes)
    metrics = [c for c in runs if c not in axes + ["seed"]]
    cells = mean_std(runs, axes)
    diffs = paired_differences(runs, axes, settings["reference"], settings["bootstrap"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figure(runs, axes, out / "study.png")
    text = "\n".join([
        "# raymoll study report", "",
        f"{len(runs)} runs ({len(cells)} cells x seeds {sorted(set(runs['seed']))}) from "
        f"`{results}`. Clean = the clean test set; corrupted = mean over the 15 test "
        f"corruptions x severities. Accuracy in %, NLL in nats, ECE top-label L1 with 15 bins; "
        f"_ts = after temperature scaling.", "",
        "## Per cell: mean ± std over seeds", "", _cell_table(cells, axes, metrics), "",
        f"## Paired differences vs `{settings['reference']}`", "",
        f"Method - reference on the same seed and the same other axis values, mean over the "
        f"pairs, and the 95% percentile-bootstrap interval over seeds ({settings['bootstrap']} "
        f"resamples, NumPy Generator seeded {BOOTSTRAP_SEED}). Accuracy differences in "
        f"percentage points; for NLL and ECE lower is better.", "",
        _diff_table(diffs, axes, metrics) if len(diffs) else "(only the reference method)", "",
        "## Figure", "", "![study](study.png)", ""])
    summary = out / "summary.md"
    atomic_write(summary, text)
    return summary
