"""raymoll.io: atomic writes, up-front writability checks, stale-temporary clean-up."""
import os
import subprocess
import sys

import pytest

from raymoll.io import (WriteError, atomic_path, atomic_write, check_writable,
                        check_writable_folder, remove_stale_temporaries, temporary_name)
from mounts import read_only_folder, small_disk


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a" / "b" / "out.txt"
    atomic_write(target, "first")
    atomic_write(target, b"second")
    assert target.read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary left


def test_exception_mid_write_keeps_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half of the new")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_full_disk_keeps_old_file(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        target = disk / "out.bin"
        target.write_bytes(b"old")
        with pytest.raises(OSError):
            atomic_write(target, b"x" * (4 << 20))
        assert target.read_bytes() == b"old"
        assert [p.name for p in disk.iterdir()] == ["out.bin"]


def test_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "sub" / "out.parquet"
    with pytest.raises(WriteError, match="is a file"):
        check_writable(target)
    with pytest.raises(WriteError):
        atomic_write(target, "data")  # the writer itself also refuses clearly
    with pytest.raises(WriteError, match="is a file"):
        check_writable_folder(tmp_path / "file")


def test_read_only_folder(tmp_path):
    with read_only_folder(tmp_path / "ro") as folder:
        for target in (folder / "out.parquet", folder / "new" / "deeper" / "out.parquet"):
            with pytest.raises(WriteError, match="not writable"):
                check_writable(target)
        with pytest.raises(WriteError):
            check_writable_folder(folder / "report")
        with pytest.raises(OSError):
            atomic_write(folder / "out.txt", "data")


def test_target_is_a_folder(tmp_path):
    with pytest.raises(WriteError, match="is a folder"):
        check_writable(tmp_path)


def test_writable_targets_pass_and_leave_nothing(tmp_path):
    check_writable(tmp_path / "new" / "out.parquet")
    check_writable_folder(tmp_path / "report")
    assert list(tmp_path.iterdir()) == []  # the probe is removed, no folder created


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale_old_style = tmp_path / f".train.beton.tmp-{pid}"
    stale = tmp_path / temporary_name("meta.json").replace(f"-{os.getpid()}", f"-{pid}")
    mine = tmp_path / temporary_name("test.beton")  # this process is alive
    other_host = tmp_path / f".x.tmp-otherhost-{pid}"
    for path in (stale_old_style, stale, mine, other_host, tmp_path / "train.beton"):
        path.write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale_old_style, stale])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, other_host.name, "train.beton"])


def test_killed_writer_leaves_old_file_and_only_a_temporary(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    code = ("import os, sys; from raymoll.io import atomic_path\n"
            f"with atomic_path({str(target)!r}) as t:\n"
            "    t.write_bytes(b'partial'); os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert target.read_bytes() == b"old"
    assert len(remove_stale_temporaries(tmp_path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
