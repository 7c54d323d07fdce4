"""A run folder (`<run.storage_path>/<run.name>`) records the settings that define its result, so
re-running `raymoll train` with the same name either continues that run or is refused.

The rule: the same defining settings continue (resume from the newest complete checkpoint); other
settings need a new run.name or `--restart`, which moves the old folder aside to
`<name>.replaced-<UTC time>` (nothing is deleted). Settings that only change how fast or how
safely the run goes (loader threads, checkpoints kept, restarts allowed, resources) are not
defining and may change between a run and its continuation.

Pure Python (pyarrow.fs only for URIs, through raymoll.io), so the check runs before Ray starts.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from raymoll.config import Config, to_dict
from raymoll.errors import RaymollError
from raymoll.io import (absolute, atomic_write, exists, filesystem, is_file, is_uri, join,
                        read_text)

SETTINGS_FILE = "raymoll_run.json"

# Keys that do not change what a run computes (see the module docstring). The tune section is
# the search's business, not one training run's.
NOT_DEFINING = ("run.name", "run.storage_path", "run.num_to_keep", "run.max_failures",
                "run.use_gpu", "run.cpus_per_worker", "run.fault_epoch", "run.fault_step",
                "run.fault_kind", "data.num_workers", "data.os_cache", "data.eval_batch_size",
                "tune")


class RunFolderError(RaymollError):
    """A run name that is taken by a run with other settings (or by something not a run)."""


def defining_settings(cfg: Config) -> dict[str, Any]:
    """The flattened `section.key -> value` settings that define a run's result."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if section not in NOT_DEFINING and name not in NOT_DEFINING:
                flat[name] = value
    flat["data.path"] = absolute(flat["data.path"])  # the same data, wherever it is run from
    return flat


def run_folder(cfg: Config) -> str:
    """<run.storage_path>/<run.name>: an absolute local path, or a URI."""
    return join(absolute(cfg.run.storage_path), cfg.run.name)


def _move_aside(folder: str) -> str:
    """Rename `folder` to `<folder>.replaced-<UTC time>`; returns the new name."""
    base, query = folder.partition("?")[::2]
    target = f"{base.rstrip('/')}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}" \
        + (f"?{query}" if query else "")
    if not is_uri(folder):
        os.rename(folder, target)
        return target
    import pyarrow.fs  # object stores cannot rename a prefix: copy, then delete
    fs, inner = filesystem(folder)
    _, inner_target = filesystem(target)
    pyarrow.fs.copy_files(inner, inner_target, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(inner)
    return target


def claim_run_folder(cfg: Config, restart: bool = False) -> str:
    """Check that `cfg` may use its run folder and record its settings there; returns the folder.

    A new folder gets the record; an existing one continues only with the same defining
    settings. With `restart`, an existing folder is moved aside first. Raises RunFolderError
    naming every changed key otherwise. Call before Ray starts.
    """
    folder = run_folder(cfg)
    settings = defining_settings(cfg)
    if restart and exists(folder):
        moved = _move_aside(folder)
        print(f"[raymoll] --restart: moved the old run folder to {moved}", flush=True)
    record = join(folder, SETTINGS_FILE)
    recorded_text = read_text(record) if is_file(record) else None
    if recorded_text is None and exists(folder):
        raise RunFolderError(
            f"run folder {folder!r} exists but has no {SETTINGS_FILE}: it was not started by "
            f"`raymoll train` (a tune search, or an older raymoll), so continuing it could mix "
            f"runs. Choose another run.name, or pass --restart to move it aside.")
    if recorded_text is not None:
        recorded = json.loads(recorded_text)["settings"]
        changed = sorted(k for k in settings.keys() | recorded.keys()
                         if settings.get(k) != recorded.get(k))
        if changed:
            diff = "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise RunFolderError(
                f"run {cfg.run.name!r} in {folder!r} was started with other settings ({diff}). "
                f"A run name continues the run with its own settings; for new settings choose "
                f"another run.name, or pass --restart to move the old run aside and start over.")
        return folder  # the same settings: continue
    atomic_write(join(folder, SETTINGS_FILE),
                 json.dumps({"settings": settings}, indent=1) + "\n")
    return folder
