"""cglab.track.metrics: names, input checks, and a live scrape of Ray's Prometheus endpoint.

The live test runs a real local Ray with metrics export on 127.0.0.1, emits every metric from a Ray actor (training
side) and a Ray task (data side), scrapes /metrics and checks that every series the Grafana dashboard queries is there.
"""
from __future__ import annotations

import json
import re
import shutil
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cglab.track import metrics as M

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "grafana" / "cglab.json"

# What the workload reports; the scrape must show these exact values.
STEP = {"step": 7, "loss": 2.5, "tokens_per_s": 12345.0, "mfu": 0.42, "step_time_s": 0.3, "data_wait_s": 0.02,
        "checkpoint_s": 1.5, "lr": 3e-4, "grad_norm": 0.9, "tokens": 4096}
SKIPS = {"max_line_length": 3, "duplicate": 2}


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def dashboard_metric_names() -> set[str]:
    # Series names are the identifiers that start with ray_cglab_ (PromQL functions and labels never do).
    return {n for e in dashboard_exprs() for n in re.findall(r"\bray_cglab_[a-z_]+", e)}


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


# ---------------------------------------------------------------------------------------------- live Ray
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list]:
    """name -> [(labels, value)] for every cglab sample on the endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_cglab_"):
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def emit_workload(experiment: str) -> None:
    """Emit every metric from inside Ray workers, the way the platform does.

    The lead swaps this for the training entry point (a short `cglab train` run) once it reports through
    cglab.track.metrics; the scrape checks below stay the same.
    """
    import ray

    @ray.remote(num_cpus=0)
    class Trainer:  # stands in for a Ray Train worker
        def step(self) -> bool:
            m = M.TrainMetrics(experiment=experiment, trial="t0", rank=0)
            m.report(STEP)
            return True

    @ray.remote(num_cpus=0)
    def filter_stage() -> bool:  # stands in for the Ray Data filter task
        d = M.DataMetrics(experiment=experiment, source="stack")
        d.skipped_counts(SKIPS)
        d.kept(10)
        return True

    trainer = Trainer.remote()
    assert ray.get([trainer.step.remote(), filter_stage.remote()]) == [True, True]
    return trainer  # keep the actor (and its metrics) alive until the scrape is done


@pytest.mark.slow
def test_every_dashboard_metric_is_scraped_from_a_live_ray(monkeypatch):
    import ray

    # No token auth for this private throwaway cluster (Ray 2.60 would otherwise write ~/.ray/auth_token).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    port = _free_port()
    # Ray's unix sockets live under the temp dir and must stay under 107 bytes: pytest's tmp_path is too deep.
    temp_dir = tempfile.mkdtemp(prefix="cgm", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _metrics_export_port=port,
             _node_ip_address="127.0.0.1", _temp_dir=temp_dir)
    try:
        keep = emit_workload(experiment="test/metrics")
        wanted = dashboard_metric_names()
        # Ray exports on an interval (~10 s); poll until everything shows up or give up with a clear message.
        deadline, seen = time.monotonic() + 90, {}
        while time.monotonic() < deadline:
            seen = _scrape(port)
            if wanted <= seen.keys():
                break
            time.sleep(2)
        missing = wanted - seen.keys()
        assert not missing, f"series the dashboard queries but Ray did not export: {sorted(missing)}"

        def value(name, **labels):
            vals = [v for lab, v in seen[name] if all(lab.get(k) == x for k, x in labels.items())]
            assert len(vals) == 1, (name, labels, seen[name])
            return vals[0]

        tags = dict(experiment="test/metrics", trial="t0", rank="0")
        for key, spec in M.TRAIN_GAUGES.items():
            assert value(M.EXPORT_PREFIX + spec.name, **tags) == pytest.approx(STEP[key])
        assert value("ray_cglab_tokens_total", **tags) == STEP["tokens"]
        assert value("ray_cglab_step_duration_seconds_count", **tags) == 1
        for reason, n in SKIPS.items():
            assert value("ray_cglab_samples_skipped_total", source="stack", reason=reason) == n
        assert value("ray_cglab_samples_kept_total", source="stack") == 10
        del keep
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
