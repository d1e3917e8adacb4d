"""CodeGen filters: each rule on hand-made documents, and the vectorised stats against a plain-Python reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.config import FilterConfig
from cglab.data.filters import (
    AVG_LINE_LENGTH,
    DIGIT_FRACTION,
    EMPTY,
    MAX_LINE_LENGTH,
    TOO_LONG,
    TOO_SHORT,
    document_stats,
    filter_reasons,
)


def test_each_rule():
    cfg = FilterConfig(min_chars=3, max_chars=5000)
    docs = {
        "def f():\n    return 1\n": "",
        "": EMPTY,
        " \n\t \n": EMPTY,
        "ab": TOO_SHORT,
        "x = 1\n" * 1000: TOO_LONG,
        ("y" * 150 + "\n") * 3: AVG_LINE_LENGTH,
        "a = 1\n" * 50 + "z" * 1200 + "\n": MAX_LINE_LENGTH,  # average stays low, one line is huge
        "deadbeef0123456789abcdef\n" * 4: DIGIT_FRACTION,  # hashes/blobs: 96 % hex
        "The quick brown fox\n": "",
    }
    assert filter_reasons(list(docs), cfg).tolist() == list(docs.values())


def test_thresholds_are_strict_and_configurable():
    line = "q" * 100 + "\n"
    assert filter_reasons([line * 3], FilterConfig()).tolist() == [""]  # exactly 100 passes
    assert filter_reasons([line * 3], FilterConfig(max_avg_line_length=99)).tolist() == [AVG_LINE_LENGTH]
    assert filter_reasons(["0" * 9 + "g"], FilterConfig()).tolist() == [""]  # exactly 90 % passes
    assert filter_reasons(["0" * 10 + "g"], FilterConfig()).tolist() == [DIGIT_FRACTION]


def _reference(text):
    lines = text.split("\n")
    if text.endswith("\n"):
        lines = lines[:-1]
    lines = lines or [""]
    hexd = sum(c in "0123456789abcdefABCDEF" for c in text)
    return dict(
        chars=len(text),
        max_line=max(len(x) for x in lines),
        avg_line=sum(len(x) for x in lines) / len(lines),
        digit_frac=hexd / len(text) if text else 0.0,
    )


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(list("ab09 \n\tzé€✓")), max_size=60), min_size=1, max_size=8))
def test_stats_match_reference(texts):
    s = document_stats(texts)
    for i, t in enumerate(texts):
        ref = _reference(t)
        assert s["chars"][i] == ref["chars"]
        assert s["max_line"][i] == ref["max_line"]
        assert np.isclose(s["avg_line"][i], ref["avg_line"])
        assert np.isclose(s["digit_frac"][i], ref["digit_frac"])
