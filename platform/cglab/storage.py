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


def read_bytes(path: str | os.PathLike) -> bytes:
    """A file's bytes from a local path or a URI (pyarrow's file systems)."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.fs as pafs

    if is_uri(path):
        fs, p = pafs.FileSystem.from_uri(str(path))
    else:
        fs, p = pafs.LocalFileSystem(), location(path)
    with fs.open_input_stream(p) as f:
        return f.read()
