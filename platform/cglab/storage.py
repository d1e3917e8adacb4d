"""Where a run keeps what it writes: a local directory or an object-store URI (`s3://bucket/x`, `gs://...`, anything
with a scheme that pyarrow's file systems and Ray Train take).

A URI must reach Ray untouched: `Path("s3://b/x").resolve()` is `<cwd>/s3:/b/x`, a local directory. `location`
makes a local path absolute (Ray Train and Tune want one, and workers must not depend on the driver's working
directory) and leaves a URI as it is; `join` appends names to either. `local_dir` is the directory on this machine
for files only the driver reads back (its config.yaml, plan.json, a copy of the tokenizer): the path itself, or,
for a URI, a directory named after it under `.cglab/uri`, so two storages never share one.

`read_bytes` / `write_bytes` / `writing` / `exists` read and write a file at either kind of location through pyarrow's
file systems, so what a worker on another node reads (a sweep's tokenizer and held-out split, the prepared corpus)
can live in the run's storage rather than on the driver's disk. A write goes to a temporary name and is moved into
place, so a reader never sees half a file. `local_copy` fetches a directory (a checkpoint) to node-local scratch
for code that reads local files only.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
URI_MIRROR = ".cglab/uri"  # local stand-ins for URI storages, relative to the working directory


def is_uri(path: str | os.PathLike) -> bool:
    return bool(_SCHEME.match(str(path)))


def location(path: str | os.PathLike) -> str:
    """A storage location as Ray and cglab take it: a URI unchanged, a local path absolute (`~` expanded)."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for a local path or a URI (a URI keeps its `scheme://`)."""
    if not is_uri(base):
        return str(Path(base, *names))
    return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])


def local_dir(path: str | os.PathLike) -> Path:
    """The local directory for `path`: itself, or for a URI `.cglab/uri/<scheme>/<bucket>/<key>` (absolute)."""
    if not is_uri(path):
        return Path(location(path))
    scheme, rest = str(path).split("://", 1)
    return Path(URI_MIRROR).resolve() / scheme / rest.strip("/")


def filesystem(path: str | os.PathLike):
    """(pyarrow file system, path inside it) for a URI or a local path (`file://` allowed)."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.fs as pafs

    if is_uri(path) and not str(path).startswith("file://"):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(str(path).removeprefix("file://"))


def exists(path: str | os.PathLike) -> bool:
    """A file (not a directory) is at `path`."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = filesystem(path)
    with fs.open_input_stream(p, compression=None) as f:  # the bytes as stored, whatever the name's extension
        return f.read()


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """An output stream to a temporary name beside `path`, moved into place when the block ends without an error
    (removed when it raises), so a reader never sees half a file and a writer never holds a whole one."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise
    fs.move(tmp, p)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with writing(path) as f:
        f.write(data)


def uri_of(path_in_fs: str, storage_path: str | os.PathLike) -> str:
    """A path that pyarrow's file system of `storage_path` gave (Ray Train's `Checkpoint.path`: `bucket/key`, no
    scheme) as a location every node can open: `scheme://bucket/key` for a URI storage, the path itself otherwise."""
    if not is_uri(storage_path):
        return path_in_fs
    return f"{str(storage_path).split('://', 1)[0]}://{path_in_fs.lstrip('/')}"


@contextlib.contextmanager
def local_copy(path: str | os.PathLike):
    """A local directory holding what is at `path`: the path itself when local; for a URI, a copy in this node's
    temp dir, removed when the block ends."""
    if not is_uri(path):
        yield Path(path)
        return
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    d = Path(tempfile.mkdtemp(prefix="cglab-fetch-"))
    try:
        pafs.copy_files(p, str(d), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def upload_dir(local: str | os.PathLike, dest: str | os.PathLike, skip: frozenset[str] = frozenset()) -> None:
    """Copy the files under the local directory `local` to `dest` (a local path or a URI), keeping their relative
    paths, streamed (a snapshot shard is gigabytes); names in `skip` (top-level files) are left for the caller to
    write last."""
    import pyarrow.fs as pafs

    fs, root = filesystem(dest)
    base = Path(local)
    for f in sorted(base.rglob("*")):
        rel = f.relative_to(base).as_posix()
        if f.is_file() and rel not in skip:
            out = f"{root.rstrip('/')}/{rel}"
            fs.create_dir(out.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(f), out, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def delete_dir(path: str | os.PathLike) -> None:
    """Remove a directory and what is under it, at a local path or a URI; nothing when it is not there."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def list_files(path: str | os.PathLike) -> list[str]:
    """The files directly under a directory (local path or URI), as locations; [] when it is not there."""
    import pyarrow.fs as pafs

    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p))
    return sorted(join(path, i.base_name) for i in infos if i.type == pafs.FileType.File)
