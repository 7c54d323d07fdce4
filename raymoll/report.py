"""`raymoll report`: plots and a Markdown summary from one or more results tables.

"Corrupted" means the mean over the 15 test corruptions at every severity in the table (75 sets
for severities 1-5); the 4 validation corruptions are reported apart, as their own family,
because searches select on them. Reliability diagrams at a severity pool the 15 test corruptions'
bins (their ECE is that of the pooled set, not a mean of per-set ECEs).

Figures are drawn on `matplotlib.figure.Figure` directly, without pyplot, so no GUI backend or
global state is touched.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from raymoll.io import atomic_path, atomic_write, check_writable_folder, is_uri, join
from raymoll.results import ResultsError, read_results, run_settings

TEST_FAMILIES = ("noise", "blur", "weather", "digital")
FAMILIES = TEST_FAMILIES + ("validation",)
RELIABILITY_SEVERITIES = (3, 5)

# Column headers of the Markdown tables, by key of the `headline` dicts.
HEADERS = {"run": "run", "model": "model", "mollified": "mollified",
           "clean_accuracy": "clean acc", "corrupted_accuracy": "corrupted acc",
           "corrupted_nll": "corrupted NLL", "corrupted_ece": "corrupted ECE",
           "clean_nll": "clean NLL", "clean_ece": "clean ECE",
           **{f"{f}_accuracy": f"{f} acc" for f in FAMILIES},
           **{f"{f}_ece": f"{f} ECE" for f in FAMILIES},
           "temperature": "T",
           "corrupted_nll_ts": "corrupted NLL (TS)", "corrupted_ece_ts": "corrupted ECE (TS)",
           "clean_nll_ts": "clean NLL (TS)", "clean_ece_ts": "clean ECE (TS)",
           **{f"{f}_ece_ts": f"{f} ECE (TS)" for f in FAMILIES},
           **{f"{f}_nll": f"{f} NLL" for f in FAMILIES},
           **{f"{f}_nll_ts": f"{f} NLL (TS)" for f in FAMILIES}}
# Raw and temperature-scaled (TS) side by side; accuracy does not change under TS.
HEADLINE_COLUMNS = ("run", "model", "mollified", "temperature", "clean_accuracy",
                    "corrupted_accuracy", "corrupted_nll", "corrupted_nll_ts", "corrupted_ece",
                    "corrupted_ece_ts", "clean_ece", "clean_ece_ts")


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([row[key] for row in rows])) if rows else float("nan")


def _by_run(table: pa.Table) -> dict[str, list[dict]]:
    """Rows grouped by run, runs in table order."""
    runs: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        runs.setdefault(row["run"], []).append(row)
    return runs


def headline(table: pa.Table) -> list[dict[str, Any]]:
    """One dict per run: clean and mean corrupted accuracy / NLL / ECE (fractions, nats), raw
    and temperature-scaled (keys ending in _ts), the temperature, and accuracy and ECE (raw
    and _ts) per family (noise, blur, weather, digital, validation)."""
    out = []
    for run, rows in _by_run(table).items():
        clean = [r for r in rows if r["family"] == "clean"]
        test = [r for r in rows if r["family"] in TEST_FAMILIES]
        entry = {"run": run, "model": rows[0]["model"], "mollified": rows[0]["mollified"],
                 "temperature": rows[0]["temperature"]}
        for key in ("accuracy", "nll", "ece", "nll_ts", "ece_ts"):
            entry[f"clean_{key}"] = _mean(clean, key)
            entry[f"corrupted_{key}"] = _mean(test, key)
        for family in FAMILIES:
            members = [r for r in rows if r["family"] == family]
            entry[f"{family}_accuracy"] = _mean(members, "accuracy")
            entry[f"{family}_ece"] = _mean(members, "ece")
            for key in ("nll", "nll_ts", "ece_ts"):
                entry[f"{family}_{key}"] = _mean(members, key)
        out.append(entry)
    return out


def _cell(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if np.isnan(value):
            return "-"
        return f"{value:.2%}" if key.endswith("accuracy") else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of `rows` (e.g. from `headline`): accuracies as percentages, other
    numbers to 4 decimals; `columns` picks and orders keys (default: the headline columns)."""
    columns = list(columns or HEADLINE_COLUMNS)
    align = ["---" if c in ("run", "model", "mollified") else "---:" for c in columns]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |",
             "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def _save(fig: Figure, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _legend(fig: Figure, axes, ncol: int) -> None:
    handles, labels = axes.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(ncol, 4), frameon=False,
               bbox_to_anchor=(0.5, -0.02))


def _vs_severity(runs: dict[str, list[dict]], key: str, label: str, path: str | Path) -> None:
    """One panel per family plus "all 15 test corruptions"; x = severity (0 = clean)."""
    panels = [("all 15 test corruptions", TEST_FAMILIES)] + [(f, (f,)) for f in FAMILIES]
    fig = Figure(figsize=(13, 7.5))
    axes = fig.subplots(2, 3, sharex=True, sharey=True).flat
    for ax, (title, families) in zip(axes, panels):
        for run, rows in runs.items():
            clean = [r for r in rows if r["family"] == "clean"]
            severities = sorted({r["severity"] for r in rows if r["family"] in families})
            ys = [_mean(clean, key)] + [_mean([r for r in rows if r["family"] in families
                                               and r["severity"] == s], key) for s in severities]
            ax.plot([0] + severities, ys, marker="o", label=run)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_xticks(range(6), ["clean", "1", "2", "3", "4", "5"])
    for ax in fig.axes:
        if key == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(label)
        if ax.get_subplotspec().is_last_row():
            ax.set_xlabel("severity")
    fig.suptitle(f"{label} vs corruption severity (mean over the family's corruptions)")
    _legend(fig, fig.axes[0], len(runs))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path)


def _pooled_bins(rows: list[dict], suffix: str = "") -> tuple[np.ndarray, np.ndarray,
                                                              np.ndarray]:
    """Reliability bins of the union of the sets in `rows`: count, mean confidence, accuracy;
    suffix "_ts" pools the temperature-scaled bins instead of the raw ones."""
    counts = [np.asarray(r[f"bin_count{suffix}"], float) for r in rows]
    weighted = lambda key: np.sum([np.nan_to_num(np.asarray(r[key + suffix], float)) * c
                                   for r, c in zip(rows, counts)], axis=0)
    count = np.sum(counts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, weighted("bin_confidence") / count, weighted("bin_accuracy") / count


def _reliability(runs: dict[str, list[dict]], path: str | Path, suffix: str = "") -> None:
    """Rows = runs, columns = clean and the pooled test corruptions at severities 3 and 5;
    suffix "_ts": of the temperature-scaled predictions."""
    present = {r["severity"] for rows in runs.values() for r in rows}
    columns = [("clean", lambda r: r["family"] == "clean")] + [
        (f"15 test corruptions, severity {s}",
         lambda r, s=s: r["family"] in TEST_FAMILIES and r["severity"] == s)
        for s in RELIABILITY_SEVERITIES if s in present]
    fig = Figure(figsize=(4.2 * len(columns), 4.0 * len(runs)))
    axes = np.asarray(fig.subplots(len(runs), len(columns), squeeze=False))
    for i, (run, rows) in enumerate(runs.items()):
        for j, (title, chosen) in enumerate(columns):
            ax = axes[i, j]
            count, confidence, acc = _pooled_bins([r for r in rows if chosen(r)], suffix)
            n_bins = len(count)
            centres = (np.arange(n_bins) + 0.5) / n_bins
            filled = count > 0
            ax.bar(centres[filled], acc[filled], width=1 / n_bins, edgecolor="black",
                   linewidth=0.5, color="tab:blue", label="accuracy")
            ax.bar(centres[filled], (confidence - acc)[filled], bottom=acc[filled],
                   width=1 / n_bins, facecolor=(1, 0, 0, 0.12), edgecolor="tab:red",
                   hatch="//", linewidth=0.5, label="gap to mean confidence")
            ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
            ece = np.abs(np.nan_to_num(acc - confidence) * count).sum() / count.sum()
            ax.text(0.04, 0.93, f"ECE {ece:.4f}\nn = {int(count.sum()):,}",
                    transform=ax.transAxes, va="top", fontsize=9,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{run}\n{title}")
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
            if i == len(runs) - 1:
                ax.set_xlabel("confidence (top class)")
            if j == 0:
                ax.set_ylabel("accuracy")
    scaled = ", after temperature scaling" if suffix else ""
    fig.suptitle(f"Reliability diagrams (15 equal-width confidence bins{scaled})")
    _legend(fig, axes[0, 0], 3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save(fig, path)


def _corruption_bars(runs: dict[str, list[dict]], path: str | Path) -> None:
    """Accuracy per corruption (mean over severities), runs side by side."""
    names = list(dict.fromkeys(r["corruption"] for rows in runs.values() for r in rows))
    fig = Figure(figsize=(max(10.0, 0.75 * len(names) * max(1, len(runs) / 2)), 5.0))
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for k, (run, rows) in enumerate(runs.items()):
        heights = [_mean([r for r in rows if r["corruption"] == name], "accuracy")
                   for name in names]
        ax.bar(np.arange(len(names)) + (k - (len(runs) - 1) / 2) * width, heights, width,
               label=run)
    family = {r["corruption"]: r["family"] for rows in runs.values() for r in rows}
    starts = [x for x in range(len(names)) if x == 0 or family[names[x]] != family[names[x - 1]]]
    for x in starts:  # a separator and a label where the family changes
        if x:
            ax.axvline(x - 0.5, color="grey", linewidth=0.8)
        ax.text(x - 0.4, 1.02, family[names[x]], fontsize=9, style="italic")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=9)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set(ylabel="accuracy (mean over severities)", ylim=(0, 1), xlim=(-0.6, len(names) - 0.4))
    ax.set_title("Accuracy per corruption", pad=18)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    _save(fig, path)


PLOTS = {
    "accuracy_vs_severity.png": "accuracy vs severity per family (severity 0 = clean), one line "
                                "per run",
    "ece_vs_severity.png": "ECE (15 bins) vs severity per family, one line per run",
    "reliability.png": "reliability diagrams: clean, and the 15 test corruptions pooled at "
                       "severities 3 and 5, one row per run",
    "corruption_accuracy.png": "accuracy per corruption, averaged over severities, runs side "
                               "by side",
}


def _summary(table: pa.Table, files: Sequence[str]) -> str:
    rows, settings = headline(table), run_settings(table)
    severities = sorted({s for s in table.column("severity").to_pylist() if s})
    family_acc = ["run"] + [f"{f}_accuracy" for f in FAMILIES]
    family_ece = ["run"] + [c for f in FAMILIES for c in (f"{f}_ece", f"{f}_ece_ts")]
    family_nll = ["run"] + [c for f in FAMILIES for c in (f"{f}_nll", f"{f}_nll_ts")]
    lines = [
        "# raymoll robustness report", "",
        f"{len(rows)} run(s) from {', '.join(f'`{f}`' for f in files)}. \"Corrupted\" is the "
        f"mean over the 15 test corruptions at severities {severities}; the 4 validation "
        f"corruptions (searches select on them) are the family \"validation\". NLL in nats; "
        f"ECE is top-label L1 with 15 equal-width bins over each whole set. (TS): after "
        f"post-hoc temperature scaling, T fitted per run on the clean validation split.", "",
        "## Headline", "", format_table(rows), "",
        "## Accuracy per family", "", format_table(rows, family_acc), "",
        "## ECE per family (raw, temperature-scaled)", "", format_table(rows, family_ece), "",
        "## NLL per family (raw, temperature-scaled)", "", format_table(rows, family_nll), "",
        "## Plots", "",
        *[f"- [{name}]({name}): {caption}" for name, caption in PLOTS.items()], "",
        "## Runs", "",
    ]
    for row in rows:
        s = settings.get(row["run"], {})
        lines.append(f"- **{row['run']}**: {row['model']}, mollified {_cell('', row['mollified'])}"
                     f", checkpoint `{s.get('checkpoint')}` (epoch {s.get('epoch')}), "
                     f"corruptions {s.get('corruptions')}, seed {s.get('seed')}")
    return "\n".join(lines) + "\n"


RELIABILITY = ("raw", "ts")


def report(results: Sequence[str | Path], out: str | Path,
           reliability: str = "raw") -> Path | str:
    """Write the PNGs of PLOTS and summary.md for the results files (local or URIs) into the
    folder `out` (local or a URI prefix); returns the path of summary.md. reliability: draw
    reliability.png of the raw ("raw") or the temperature-scaled ("ts") predictions. Raises
    ResultsError, before writing anything, on a bad file or option."""
    if reliability not in RELIABILITY:
        raise ResultsError(f"reliability must be one of {', '.join(RELIABILITY)}, got "
                           f"{reliability!r}.")
    files = [str(p) for p in ([results] if isinstance(results, (str, Path)) else results)]
    check_writable_folder(out)
    from raymoll.study.report import is_study, study_report
    if len(files) == 1 and is_study(files[0]):  # written by `raymoll study`: its own report
        return study_report(files[0], out)
    table = read_results(files)
    runs = _by_run(table)
    _vs_severity(runs, "accuracy", "accuracy", join(out, "accuracy_vs_severity.png"))
    _vs_severity(runs, "ece", "ECE", join(out, "ece_vs_severity.png"))
    _reliability(runs, join(out, "reliability.png"), "_ts" if reliability == "ts" else "")
    _corruption_bars(runs, join(out, "corruption_accuracy.png"))
    summary = atomic_write(join(out, "summary.md"), _summary(table, files))
    return summary if is_uri(summary) else Path(summary)
