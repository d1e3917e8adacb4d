"""Read the Pile (`*.jsonl`, `*.jsonl.zst`) and The Stack (`*.parquet`) record by record, never crashing on bad input.

Every record comes out as a `Record(key, text, reason, subset)`. `reason == ""` means a readable document; anything else
names why it was skipped (malformed JSON, invalid UTF-8, a missing field or column, a truncated or corrupt file, a line
too large to hold). Skips are counted, not raised: one bad line in a 30 GB shard must not end a run.

`key` orders every record of the dataset: source index, file index (paths sorted), record index inside the file, packed
into one int64. Dedup keeps the copy with the smallest key, so which copy survives never depends on Ray's block layout.

Files are opened through pyarrow's filesystems (local paths, `s3://`, `gs://`, `abfs://`, ...), the same layer
Ray Data's own readers use; `resolve_files` checks every configured path on the driver before any Ray task starts.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from cglab import storage
from cglab.config import ConfigError

# Skip reasons. One vocabulary for readers, filters and dedup so `cglab data inspect` prints one table.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_FIELD = "missing_field"
MISSING_COLUMN = "missing_column"
TRUNCATED_FILE = "truncated_file"
CORRUPT_FILE = "corrupt_file"
LINE_TOO_LONG = "line_too_long"
NOT_SELECTED = "not_selected"  # outside SourceConfig.subsets: not bad, but counted so totals add up

_SOURCE_BITS, _FILE_BITS, _RECORD_BITS = 7, 24, 32
_CHUNK = 1 << 20


def make_key(source: int, file: int, record: int) -> int:
    """One int64 that sorts records by (source, file, record)."""
    if source >= 1 << _SOURCE_BITS or file >= 1 << _FILE_BITS or record >= 1 << _RECORD_BITS:
        raise ValueError(f"record position out of range: source={source} file={file} record={record}")
    return (source << (_FILE_BITS + _RECORD_BITS)) | (file << _RECORD_BITS) | record


def split_key(key: int) -> tuple[int, int, int]:
    return (
        key >> (_FILE_BITS + _RECORD_BITS),
        (key >> _RECORD_BITS) & ((1 << _FILE_BITS) - 1),
        key & ((1 << _RECORD_BITS) - 1),
    )


class Record(NamedTuple):
    key: int
    text: str  # "" when skipped
    reason: str  # "" when readable
    subset: str  # pile_set_name or lang


@dataclass(frozen=True)
class SourceFiles:
    """A configured source with its paths expanded to a sorted list of files."""

    index: int
    name: str
    kind: str  # "pile" | "stack"
    files: tuple[str, ...]
    subsets: tuple[str, ...] | None


# ---------------------------------------------------------------------------------------------- paths
_filesystem = storage.filesystem  # the paths every reader takes: cglab.storage's


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _expand_one(pattern: str, exts: tuple[str, ...]) -> list[str]:
    """Files under a path: the file itself, a directory's matching files (recursive), or a glob's matches."""
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow.fs as pafs

    if not _is_url(pattern):
        local = pattern.removeprefix("file://")
        hits = sorted(glob.glob(local, recursive=True)) if glob.has_magic(local) else [local]
        out = []
        for h in hits:
            if os.path.isdir(h):
                out += [os.path.join(r, f) for r, _, fs in os.walk(h) for f in fs if f.endswith(exts)]
            elif os.path.isfile(h):
                out.append(h)
        return sorted(out)
    fs, path = pafs.FileSystem.from_uri(
        pattern.split("*")[0].rsplit("/", 1)[0] + "/" if glob.has_magic(pattern) else pattern
    )
    scheme = pattern.split("://", 1)[0] + "://"
    if glob.has_magic(pattern):
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True))
        want = pattern.split("://", 1)[1]
        return sorted(scheme + i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, want))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [pattern]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(scheme + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(exts))
    return []


PILE_EXTS = (".jsonl", ".jsonl.zst", ".json", ".json.zst")
STACK_EXTS = (".parquet",)


def resolve_files(sources, field: str = "data.sources") -> list[SourceFiles]:
    """Expand each SourceConfig's paths; raise ConfigError naming `data.sources[i].paths` for any that match nothing."""
    out = []
    for i, src in enumerate(sources):
        exts = PILE_EXTS if src.kind == "pile" else STACK_EXTS
        files: list[str] = []
        for j, p in enumerate(src.paths):
            try:
                hit = _expand_one(p, exts)
            except (OSError, ValueError) as err:
                raise ConfigError(f"{field}[{i}].paths[{j}]: cannot list {p!r} ({err})") from None
            if not hit:
                raise ConfigError(
                    f"{field}[{i}].paths[{j}]: {p!r} does not exist or holds no "
                    f"{'/'.join(exts)} files (source {src.name!r})"
                )
            files += hit
        files = sorted(dict.fromkeys(files))
        if len(files) >= 1 << _FILE_BITS:
            raise ConfigError(f"{field}[{i}].paths: {len(files)} files is more than one source can index")
        out.append(
            SourceFiles(i, src.name, src.kind, tuple(files), tuple(src.subsets) if src.subsets is not None else None)
        )
    if len(out) >= 1 << _SOURCE_BITS:
        raise ConfigError(f"{field}: at most {(1 << _SOURCE_BITS) - 1} sources")
    return out


# ---------------------------------------------------------------------------------------------- pile
def _raw_chunks(path: str) -> Iterator[bytes]:
    fs, p = _filesystem(path)
    with fs.open_input_stream(p, compression=None) as f:
        while chunk := f.read(_CHUNK):
            yield chunk


def _zstd_chunks(raw: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a (multi-frame) zstd stream; raise EOFError if it stops mid-frame."""
    # zstandard: kept off `cglab --help`'s path
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    dobj, pending = dctx.decompressobj(), False
    for chunk in raw:
        while chunk:
            out = dobj.decompress(chunk)
            pending = True
            if out:
                yield out
            if dobj.eof:
                chunk, dobj, pending = dobj.unused_data, dctx.decompressobj(), False
            else:
                chunk = b""
    if pending and not dobj.eof:
        raise EOFError("zstd stream ends mid-frame")


def _lines(chunks: Iterator[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    """Split a byte stream on b'\\n'. A line longer than max_line_bytes is dropped while streaming and yields None."""
    buf, overlong = b"", False
    for chunk in chunks:
        buf += chunk
        parts = buf.split(b"\n")
        buf = parts.pop()
        for line in parts:
            if overlong:
                overlong = False
                yield None
            elif len(line) > max_line_bytes:
                yield None
            else:
                yield line
        if len(buf) > max_line_bytes:  # never hold a runaway line in memory
            buf, overlong = b"", True
    if overlong:
        yield None
    elif buf.strip():
        yield buf if len(buf) <= max_line_bytes else None


def parse_pile_line(line: bytes) -> tuple[str, str, str]:
    """(text, reason, pile_set_name) for one JSONL line."""
    try:
        s = line.decode("utf-8")
    except UnicodeDecodeError:
        return "", INVALID_UTF8, ""
    try:
        obj = json.loads(s)
    except ValueError:
        return "", MALFORMED_JSON, ""
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        return "", MISSING_FIELD, ""
    text = obj["text"]
    if "\\ud" in s or "\\uD" in s:  # JSON escapes can smuggle in lone surrogates, which no encoder accepts
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "", INVALID_UTF8, ""
    meta = obj.get("meta")
    subset = meta.get("pile_set_name", "") if isinstance(meta, dict) else ""
    return text, "", subset if isinstance(subset, str) else ""


def read_pile_file(
    path: str, source: int, file: int, subsets: tuple[str, ...] | None, max_line_bytes: int
) -> Iterator[Record]:
    chunks = _raw_chunks(path)
    if path.endswith(".zst"):
        chunks = _zstd_chunks(chunks)
    rec = 0
    try:
        for line in _lines(chunks, max_line_bytes):
            key = make_key(source, file, rec)
            rec += 1
            if line is None:
                yield Record(key, "", LINE_TOO_LONG, "")
                continue
            if not line.strip():
                rec -= 1  # blank lines are not records
                continue
            text, reason, subset = parse_pile_line(line)
            if not reason and subsets is not None and subset not in subsets:
                text, reason = "", NOT_SELECTED
            yield Record(key, text, reason, subset)
    except EOFError:
        yield Record(make_key(source, file, rec), "", TRUNCATED_FILE, "")
    except Exception as err:  # zstd/IO errors: the rest of this file is unreadable, the run goes on
        # zstandard: kept off `cglab --help`'s path
        import zstandard

        if isinstance(err, (zstandard.ZstdError, OSError)):
            yield Record(make_key(source, file, rec), "", CORRUPT_FILE, "")
        else:
            raise


# ---------------------------------------------------------------------------------------------- stack
def read_stack_file(
    path: str, source: int, file: int, subsets: tuple[str, ...] | None, max_line_bytes: int
) -> Iterator[Record]:
    # pyarrow: kept off `cglab --help`'s path
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, p = _filesystem(path)
    rec = 0
    try:
        f = fs.open_input_file(p)
        pf = pq.ParquetFile(f)
    except (OSError, pa.ArrowException) as err:
        del err
        yield Record(make_key(source, file, 0), "", CORRUPT_FILE, "")
        return
    names = set(pf.schema_arrow.names)
    need_lang = subsets is not None
    if "content" not in names or (need_lang and "lang" not in names):
        # The whole file is unusable; count each of its rows so totals stay honest.
        for rec in range(pf.metadata.num_rows or 1):
            yield Record(make_key(source, file, rec), "", MISSING_COLUMN, "")
        return
    cols = ["content"] + (["lang"] if "lang" in names else [])
    try:
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=cols)
            # Through binary so invalid UTF-8 surfaces here, per row, instead of inside Arrow or the tokenizer.
            contents = t.column("content").cast(pa.large_binary()).to_pylist()
            langs = t.column("lang").to_pylist() if "lang" in cols else [""] * len(contents)
            for raw, lang in zip(contents, langs):
                key = make_key(source, file, rec)
                rec += 1
                lang = lang if isinstance(lang, str) else ""
                if raw is None:
                    yield Record(key, "", MISSING_FIELD, lang)
                elif len(raw) > max_line_bytes:
                    yield Record(key, "", LINE_TOO_LONG, lang)
                elif subsets is not None and lang not in subsets:
                    yield Record(key, "", NOT_SELECTED, lang)
                else:
                    try:
                        yield Record(key, raw.decode("utf-8"), "", lang)
                    except UnicodeDecodeError:
                        yield Record(key, "", INVALID_UTF8, lang)
    except (OSError, pa.ArrowException):
        yield Record(make_key(source, file, rec), "", CORRUPT_FILE, "")
    finally:
        f.close()


def read_file(src: SourceFiles, file: int, max_line_bytes: int) -> Iterator[Record]:
    reader = read_pile_file if src.kind == "pile" else read_stack_file
    return reader(src.files[file], src.index, file, src.subsets, max_line_bytes)


def max_record_bytes(max_chars: int) -> int:
    """A document of max_chars characters is at most 4 bytes per char, plus JSON escaping and metadata."""
    return 6 * max_chars + (64 << 10)
