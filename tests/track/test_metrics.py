"""cglab.track.metrics: names, input checks, and the dashboard's queries against what the module exports. The live
scrape of a training run's series is tests/clusters/test_submit.py's (a job on the local recipe's head)."""

from __future__ import annotations

import re

import pytest

from cglab.track import metrics as M
from tests.track.dashboard import dashboard_metric_names


# ---------------------------------------------------------------------------------------------- no Ray needed
def test_metric_names_are_prefixed_and_unique():
    names = [s.name for s in M.ALL_SPECS]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"cglab_[a-z_]+", n) for n in names)


def test_dashboard_queries_only_exported_names_and_covers_every_metric():
    queried = dashboard_metric_names()
    assert queried, "dashboard has no ray_cglab_ queries"
    unknown = queried - M.all_exported_names()
    assert not unknown, f"dashboard queries series the metrics module never exports: {sorted(unknown)}"
    unused = [s.name for s in M.ALL_SPECS if not queried & set(M.exported_names(s))]
    assert not unused, f"metrics with no dashboard panel: {unused}"


def test_report_rejects_non_numbers_with_the_key_name():
    with pytest.raises(ValueError, match="'loss'"):
        M.TrainMetrics().report({"loss": "high"})


def test_skipped_needs_a_reason():
    with pytest.raises(ValueError, match="reason"):
        M.DataMetrics().skipped("", 1)
