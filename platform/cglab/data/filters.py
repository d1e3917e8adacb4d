"""The CodeGen (v1) quality filters, vectorised over a batch of documents with Arrow compute kernels.

A document is dropped when it is empty, shorter than `min_chars` or longer than `max_chars` characters, when its
average line length exceeds `max_avg_line_length`, its longest line exceeds `max_line_length`, or more than
`max_digit_fraction` of its characters are decimal/hex digits (minified data, hashes, embedded blobs).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EMPTY = "empty"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
AVG_LINE_LENGTH = "avg_line_length"
MAX_LINE_LENGTH = "max_line_length"
DIGIT_FRACTION = "digit_fraction"

REASONS = (EMPTY, TOO_SHORT, TOO_LONG, AVG_LINE_LENGTH, MAX_LINE_LENGTH, DIGIT_FRACTION)


def document_stats(texts: pa.Array) -> dict[str, np.ndarray]:
    """Per document: chars, non-blank chars, line count, mean and max line length, digit/hex fraction."""
    texts = pa.array(texts, type=pa.large_string()) if not isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    texts = texts.cast(pa.large_string())
    n = len(texts)
    chars = pc.utf8_length(texts).to_numpy(zero_copy_only=False).astype(np.int64)
    nonblank = chars - pc.count_substring_regex(texts, r"\s").to_numpy(zero_copy_only=False)
    hexdig = pc.count_substring_regex(texts, r"[0-9a-fA-F]").to_numpy(zero_copy_only=False)
    lines = pc.split_pattern(texts, "\n")
    n_lines = pc.list_value_length(lines).to_numpy(zero_copy_only=False).astype(np.int64)
    line_len = pc.utf8_length(pc.list_flatten(lines)).to_numpy(zero_copy_only=False).astype(np.int64)
    # A trailing newline is not an empty last line of the document.
    ends_nl = pc.ends_with(texts, "\n").to_numpy(zero_copy_only=False)
    eff_lines = np.maximum(n_lines - ends_nl, 1)
    offsets = np.concatenate([[0], np.cumsum(n_lines)])
    max_line = np.zeros(n, np.int64)
    has = n_lines > 0
    if line_len.size:
        max_line[has] = np.maximum.reduceat(line_len, offsets[:-1][has])
    avg_line = (chars - (n_lines - 1)) / eff_lines  # characters on lines (newlines excluded) per line
    with np.errstate(divide="ignore", invalid="ignore"):
        digit_frac = np.where(chars > 0, hexdig / np.maximum(chars, 1), 0.0)
    return dict(
        chars=chars, nonblank=nonblank, lines=eff_lines, avg_line=avg_line, max_line=max_line, digit_frac=digit_frac
    )


def filter_reasons(texts, cfg) -> np.ndarray:
    """Object array of reasons, "" for documents that pass `cfg` (a cglab.config.FilterConfig)."""
    n = len(texts)
    out = np.full(n, "", dtype=object)
    if n == 0:
        return out
    s = document_stats(texts)
    # Later rules overwrite earlier ones, so the first rule in reading order wins: list them in reverse.
    rules = [
        (s["digit_frac"] > cfg.max_digit_fraction, DIGIT_FRACTION),
        (s["max_line"] > cfg.max_line_length, MAX_LINE_LENGTH),
        (s["avg_line"] > cfg.max_avg_line_length, AVG_LINE_LENGTH),
        (s["chars"] > cfg.max_chars, TOO_LONG),
        (s["chars"] < cfg.min_chars, TOO_SHORT),
        (s["nonblank"] == 0, EMPTY),
    ]
    for mask, reason in rules:
        out[mask] = reason
    return out
