"""The one way raymoll writes a file: atomically, to a local path or a pyarrow.fs URI.

A writer gets a temporary name beside the target (`.NAME.tmp-HOST-PID`) and the temporary is
renamed over the target only once it is whole, so a reader sees the old file or the new one,
never half of one, and an error (or a kill) mid-write leaves the old file as it was.

- Local paths: the temporary is written, flushed to disk (fsync) and `os.replace`d: one atomic
  rename on the same file system.
- URIs (`s3://`, `gs://`, ... through `pyarrow.fs`): object stores have no rename, and a pyarrow
  output stream *commits whatever was written when it is closed*, also when an exception closes
  it, so writing straight to the final key could publish a partial object. The data is written
  to a temporary key beside it, which is then moved over the final key (`FileSystem.move`: on S3
  a server-side CopyObject followed by a delete of the temporary). A copy appears under its key
  whole or not at all, so the final key only ever holds a complete object; an interrupted write
  can leave only a temporary key behind (never under the final key), which the writer deletes
  when it can.

`check_writable` answers "could this be written?" before any expensive work, and
`remove_stale_temporaries` deletes the temporaries of processes that died mid-write.

It is also the one place that turns a path into a file system: `filesystem`, `exists`,
`is_file`, `read_bytes`/`read_text`, `read_parquet`/`write_parquet` take local paths and URIs
alike (for S3, the endpoint and credentials come from the usual AWS_* environment variables,
see the README). Local paths never import pyarrow.fs, so the up-front checks stay fast.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from raymoll.errors import RaymollError

_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname()) or "host"
# .NAME.tmp-PID (older raymoll) or .NAME.tmp-HOST-PID; HOST holds no dash or dot.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?:(?P<host>[A-Za-z0-9]+)-)?(?P<pid>\d+)$")


class StorageError(RaymollError):
    """A path or URI that cannot be reached or read (no such file, bucket or endpoint, ...)."""


class WriteError(StorageError):
    """A target that cannot be written (read-only, its parent is a file, no such bucket, ...)."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` paths (S3, GCS, file://); plain paths are local."""
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path, or the URI unchanged (s3://bucket/prefix): Ray's storage wants
    one, and Ray workers do not share the driver's working directory."""
    return str(path) if is_uri(path) else os.path.abspath(path)


def join(path: str | os.PathLike, name: str) -> str:
    """`path`/`name` for a local path or a URI, keeping a URI's query (?endpoint_override=...)."""
    base, query = str(path).partition("?")[::2]
    return base.rstrip("/") + "/" + name + (f"?{query}" if query else "")


def with_scheme(inner: str, like: str | os.PathLike) -> str:
    """Ray and pyarrow name files by their path inside a file system ("bucket/prefix/x"): that
    path as a URI of `like`'s scheme ("s3://bucket/prefix/x"); unchanged for local storage."""
    like = str(like)
    return f"{like.split('://')[0]}://{inner}" if is_uri(like) and not is_uri(inner) else inner


def filesystem(path: str | os.PathLike):
    """(pyarrow FileSystem, the path inside it) for a local path or a URI; raises StorageError
    for a URI pyarrow cannot open (unknown scheme, bad endpoint, ...)."""
    import pyarrow.fs
    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    try:
        return pyarrow.fs.FileSystem.from_uri(str(path))
    except (pyarrow.ArrowInvalid, OSError) as err:
        raise StorageError(f"cannot open {str(path)!r}: {err}") from None


def _file_type(path: str | os.PathLike):
    fs, inner = filesystem(path)
    try:
        return fs.get_file_info(inner).type
    except OSError as err:  # e.g. the endpoint does not answer, access denied
        raise StorageError(f"cannot reach {str(path)!r}: {err}") from None


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or folder (a URI: an object or a prefix) is at `path`."""
    if not is_uri(path):
        return os.path.exists(path)
    import pyarrow.fs
    return _file_type(path) != pyarrow.fs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    """Whether a file (a URI: an object) is at `path`."""
    if not is_uri(path):
        return os.path.isfile(path)
    import pyarrow.fs
    return _file_type(path) == pyarrow.fs.FileType.File


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file at `path` (local or URI); StorageError when it cannot be read."""
    try:
        if not is_uri(path):
            return Path(path).read_bytes()
        fs, inner = filesystem(path)
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except OSError as err:  # FileNotFoundError, IsADirectoryError, permissions, the network
        reason = err.strerror or str(err)
        raise StorageError(f"cannot read {str(path)!r}: {reason}") from None


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text file at `path` (local or URI); StorageError when it cannot be read."""
    data = read_bytes(path)
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise StorageError(f"{str(path)!r} is not UTF-8 text ({err}).") from None


def read_parquet(path: str | os.PathLike):
    """The Parquet file at `path` (local or URI) as a pyarrow Table; raises StorageError when
    it cannot be read and pyarrow.ArrowInvalid when it is not Parquet."""
    import pyarrow.parquet as pq
    fs, inner = filesystem(path)
    try:
        return pq.read_table(inner, filesystem=fs)
    except FileNotFoundError:
        raise StorageError(f"cannot read {str(path)!r}: no such file.") from None


def write_parquet(target: str | os.PathLike, table) -> str:
    """Write `table` (a pyarrow Table or a pandas DataFrame, whose index is dropped) as
    Parquet to `target` (local or URI) atomically; returns `target`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(target) as temporary:
        pq.write_table(table, temporary)
    return str(target)


def temporary_name(name: str) -> str:
    """The hidden temporary file name of this process for a target called `name`."""
    return f".{name}.tmp-{_HOST}-{os.getpid()}"


def _check_local(target: Path) -> None:
    if target.is_dir():
        raise WriteError(f"cannot write the file {str(target)!r}: it is a folder.")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise WriteError(f"cannot write {str(target)!r}: {str(ancestor)!r} is a file, not a "
                         f"folder.")
    # A real probe, not os.access: it also sees read-only mounts, ACLs and root's view.
    try:
        fd, probe = tempfile.mkstemp(prefix=temporary_name("probe"), dir=ancestor)
    except OSError as err:
        raise WriteError(f"cannot write {str(target)!r}: the folder {str(ancestor)!r} is not "
                         f"writable ({err.strerror}). Choose another path or fix its "
                         f"permissions.") from None
    os.close(fd)
    os.unlink(probe)


def _check_uri(target: str) -> None:
    import pyarrow.fs
    try:
        fs, where = filesystem(target)
        kind = fs.get_file_info(where).type
    except (StorageError, OSError) as err:
        raise WriteError(f"cannot write {target!r}: {err}") from None
    if kind == pyarrow.fs.FileType.Directory:
        raise WriteError(f"cannot write the file {target!r}: it is a folder (prefix).")
    probe = f"{where.rsplit('/', 1)[0]}/{temporary_name('probe')}" if "/" in where else None
    if probe is None:
        raise WriteError(f"cannot write {target!r}: a URI target needs a bucket and a key.")
    try:  # writing and deleting a tiny object checks the bucket, the credentials and the policy
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except OSError as err:
        raise WriteError(f"cannot write {target!r}: {err}") from None


def check_writable(target: str | os.PathLike) -> None:
    """Raise WriteError unless the file `target` (a local path or a URI) could be written now.

    Meant to be called before expensive work. Missing parent folders are fine (the writers
    create them); a parent that is a file, a read-only folder, a target that is a folder, or an
    unusable bucket are not.
    """
    if is_uri(target):
        _check_uri(str(target))
    else:
        _check_local(Path(target))


def check_writable_folder(folder: str | os.PathLike) -> None:
    """Raise WriteError unless files could be written inside `folder` (existing or not)."""
    if not is_uri(folder) and Path(folder).exists() and not Path(folder).is_dir():
        raise WriteError(f"{str(folder)!r} is a file; a folder is needed here.")
    check_writable(f"{str(folder).rstrip('/')}/{temporary_name('probe-target')}")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a local temporary path to write the whole file to; on a clean exit it becomes
    `target` (a local path or a URI), on an exception it is removed and `target` is untouched.

    For a local target the temporary lies beside it (same file system, so the rename is atomic)
    and missing parent folders are created. For a URI it is a local scratch file, uploaded to a
    temporary key and moved over the final key.
    """
    if is_uri(target):
        with tempfile.TemporaryDirectory(prefix="raymoll-upload-") as scratch:
            local = Path(scratch) / Path(str(target)).name
            yield local
            _upload(local, str(target))
        return
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. a parent that is a file, a read-only folder
        raise WriteError(f"cannot write {str(target)!r}: {err.strerror} "
                         f"({err.filename!r}).") from None
    temporary = target.with_name(temporary_name(target.name))
    try:
        yield temporary
        if temporary.exists():  # fsync what the writer wrote before it becomes the target
            with open(temporary, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(temporary, target)
        _fsync_folder(target.parent)
    finally:
        # Never let clean-up raise over the real error (or over success).
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _upload(local: Path, target: str) -> None:
    fs, where = filesystem(target)
    parent, _, name = where.rpartition("/")
    temporary = f"{parent}/{temporary_name(name)}" if parent else temporary_name(name)
    try:
        with open(local, "rb") as source, fs.open_output_stream(temporary) as sink:
            shutil.copyfileobj(source, sink, 8 << 20)
        fs.move(temporary, where)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(temporary)
        raise


def atomic_write(target: str | os.PathLike, data: bytes | str) -> str:
    """Write `data` (str as UTF-8) to `target` (local path or URI) atomically; returns it."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(target)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries in the local `folder` left by dead processes of this host (a kill
    mid-write); returns what was removed. Temporaries of live processes and of other hosts (a
    shared folder) are kept."""
    folder = Path(folder)
    if is_uri(folder) or not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if not match or match["host"] not in (None, _HOST) or _process_alive(int(match["pid"])):
            continue
        with contextlib.suppress(FileNotFoundError):  # another process may remove it first
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed
