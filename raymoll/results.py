"""The results table: one Parquet file per evaluation, one row per (run, corruption, severity).

Columns: docs/protocol.md §6 (clean data is corruption "clean", severity 0) plus the reliability
diagram of each set, so `raymoll report` draws it without the model: per confidence bin the
sample count, mean confidence and accuracy (NaN in empty bins). The settings that define a run
(mollification config, seed, the whole training config) are JSON in the schema metadata under
b"raymoll", as {run name: settings}; files stay plain Parquet for pandas, DuckDB or Polars.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa

from raymoll.errors import RaymollError
from raymoll.io import StorageError, is_file, is_uri, read_parquet, write_parquet

METADATA_KEY = b"raymoll"

SCHEMA = pa.schema([
    ("run", pa.string()),
    ("checkpoint", pa.string()),
    ("dataset", pa.string()),
    ("model", pa.string()),
    ("mollified", pa.bool_()),
    ("corruption", pa.string()),
    ("family", pa.string()),  # clean, noise, blur, weather, digital, validation
    ("severity", pa.int8()),
    ("n", pa.int64()),
    ("accuracy", pa.float64()),
    ("nll", pa.float64()),  # nats per sample
    ("ece", pa.float64()),  # top-label L1, 15 equal-width bins, whole set
    ("brier", pa.float64()),
    ("bin_count", pa.list_(pa.int64())),
    ("bin_confidence", pa.list_(pa.float64())),
    ("bin_accuracy", pa.list_(pa.float64())),
    # After post-hoc temperature scaling (logits / temperature, T fitted on the clean
    # validation split; NaN when the data folder has none). Accuracy does not change; the
    # reliability bins do (confidences move between bins).
    ("temperature", pa.float64()),
    ("nll_ts", pa.float64()),
    ("ece_ts", pa.float64()),
    ("brier_ts", pa.float64()),
    ("bin_count_ts", pa.list_(pa.int64())),
    ("bin_confidence_ts", pa.list_(pa.float64())),
    ("bin_accuracy_ts", pa.list_(pa.float64())),
])


class ResultsError(RaymollError):
    """A file that is not a raymoll results table, or rows that do not fit the schema."""


def write_results(rows: Sequence[dict[str, Any]], metadata: dict[str, Any],
                  path: str | Path) -> Path | str:
    """Write one run's rows (dicts with the SCHEMA columns) to `path` (local or a URI)
    atomically; returns it (a Path, or the URI as given).

    `metadata` holds the run's settings (JSON-serialisable); it is stored as {run: metadata}.
    """
    runs = {row["run"] for row in rows}
    if len(runs) != 1:
        raise ResultsError(f"a results file holds one run, got rows of {sorted(runs)}")
    try:
        table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as err:
        raise ResultsError(f"rows do not fit the results schema: {err}") from None
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps({runs.pop(): metadata})})
    write_parquet(path, table)
    return str(path) if is_uri(path) else Path(path)


def _read_one(path: str | Path) -> pa.Table:
    hint = "pass files written by `raymoll evaluate`"
    if not is_file(path):
        raise ResultsError(f"results file {str(path)!r} does not exist; {hint}.")
    try:
        table = read_parquet(path)
    except (pa.ArrowInvalid, OSError, StorageError) as err:
        raise ResultsError(f"{str(path)!r} is not a Parquet file ({err}); {hint}.") from None
    metadata = table.schema.metadata or {}
    wrong = [f"{f.name} ({f.type})" for f in SCHEMA
             if f.name not in table.column_names or table.schema.field(f.name).type != f.type]
    if wrong or METADATA_KEY not in metadata:
        what = f"lacks or mistypes the columns {', '.join(wrong)}" if wrong else \
            "has no raymoll settings in its metadata"
        raise ResultsError(f"{str(path)!r} is Parquet but not a raymoll results table: it "
                           f"{what}; {hint}.")
    return table.select(SCHEMA.names)


def read_results(paths: str | Path | Sequence[str | Path]) -> pa.Table:
    """Read and concatenate results files; the table's metadata merges their {run: settings}.

    Raises ResultsError for a missing file, a file that is not a results table, or a run name
    that appears in two files (name them apart with `raymoll evaluate --run`).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ResultsError("no results files given; pass files written by `raymoll evaluate`.")
    tables, merged, source = [], {}, {}
    for path in (p if is_uri(p) else Path(p) for p in paths):
        table = _read_one(path)
        for run, settings in json.loads(table.schema.metadata[METADATA_KEY]).items():
            if run in merged:
                raise ResultsError(f"run {run!r} is in both {str(source[run])!r} and "
                                   f"{str(path)!r}; evaluate with --run NAME to tell them apart.")
            merged[run], source[run] = settings, path
        tables.append(table.replace_schema_metadata(None))
    return pa.concat_tables(tables).replace_schema_metadata(
        {METADATA_KEY: json.dumps(merged)})


def run_settings(table: pa.Table) -> dict[str, dict[str, Any]]:
    """{run name: settings} from a table made by `read_results`."""
    return json.loads(table.schema.metadata[METADATA_KEY])
