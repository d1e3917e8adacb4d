"""Where a run keeps what it writes: a local directory or an object-store URI (`s3://bucket/x`, `gs://...`, anything
with a scheme that pyarrow's file systems and Ray Train take).

A URI must reach Ray untouched: `Path("s3://b/x").resolve()` is `<cwd>/s3:/b/x`, a local directory. `location`
makes a local path absolute (Ray Train and Tune want one, and workers must not depend on the driver's working
directory) and leaves a URI as it is; `join` appends names to either. `local_dir` is the directory on this machine
for files cglab still writes with the local file system (the driver's config.yaml, plan.json, tokenizer, held-out
split): the path itself, or, for a URI, a directory named after it under `.cglab/uri`, so two storages never share
one.
"""

from __future__ import annotations

import os
import re
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


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes from a local path or a URI (pyarrow's file systems)."""
    fs, p = filesystem(path)
    with fs.open_input_stream(p, compression=None) as f:  # the bytes as stored, whatever the name's extension
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file at a local path or a URI (its directory created)."""
    fs, p = filesystem(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def upload_dir(local: str | os.PathLike, dest: str | os.PathLike, skip: frozenset[str] = frozenset()) -> None:
    """Copy the files under the local directory `local` to `dest` (a local path or a URI), keeping their relative
    paths; names in `skip` (top-level files) are left for the caller to write last."""
    base = Path(local)
    for f in sorted(base.rglob("*")):
        rel = f.relative_to(base).as_posix()
        if f.is_file() and rel not in skip:
            write_bytes(join(dest, rel), f.read_bytes())


def download_dir(src: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy every file under `src` (a local path or a URI) into the local directory `local`."""
    import pyarrow.fs as pafs

    fs, root = filesystem(src)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type == pafs.FileType.File:
            out = Path(local, info.path[len(root.rstrip("/")) + 1 :])
            out.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path, compression=None) as f:
                out.write_bytes(f.read())


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
