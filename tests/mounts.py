"""Real file-system conditions for failure tests: a read-only folder and a small (full) disk.

As root, permission bits do not stop writes, so a read-only folder is a tmpfs mounted read-only;
otherwise it is a folder with mode 0o555. A small disk is a size-limited tmpfs (root only).
A test that cannot get the condition here is skipped, never faked.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def _mount(folder: Path, options: str) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[Path]:
    """`folder` (created) made read-only for this process for the duration of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    _mount(folder, "size=1m,ro")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "2m") -> Iterator[Path]:
    """`folder` (created) as a file system of `size` bytes for the duration of the block."""
    if os.geteuid() != 0:
        pytest.skip("a small disk needs root (a size-limited tmpfs)")
    folder.mkdir(parents=True, exist_ok=True)
    _mount(folder, f"size={size}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
