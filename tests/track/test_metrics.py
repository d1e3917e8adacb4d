"""cglab.track.metrics: names, input checks, and a live scrape of Ray's Prometheus endpoint.

The live test starts a Ray head (`ray start`, metrics export on a free port), runs a real 3-step `cglab train` against
it (RAY_ADDRESS), scrapes /metrics while it runs and checks that every series the Grafana dashboard queries is there,
with the values the run must have produced.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from cglab.track import metrics as M
from tests.clusters.ray_head import BIN, head_env, ray_head

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "grafana" / "cglab.json"

CONFIG = REPO / "jobs" / "configs" / "tiny_cpu.yaml"
EXPERIMENT, TRIAL = "test/metrics", "metrics-live"
STEPS, SEQ, GLOBAL_BATCH = 3, 128, 8


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
def _scrape(port: int) -> dict[tuple, float]:
    """{(name, sorted labels): value} for every cglab sample on the endpoint ({} while it is not up yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    except OSError:  # the agent opens the endpoint a few seconds after the head answers
        return {}
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("ray_cglab_"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _corpus_with_a_bad_record(out: Path) -> Path:
    """The micro corpus, with one malformed JSON line as the very first Pile record: the stream's first read task
    reads it first, so exactly one `malformed_json` skip must be counted."""
    import zstandard

    from cglab.data.corpus import build_corpus

    build_corpus(out, nl_chars=250_000, code_bytes=400_000, shards=2)
    first = sorted((out / "pile").glob("*.jsonl.zst"))[0]
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(first.read_bytes())).read()
    first.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": not json\n' + text))
    return out


def _expected_series() -> set[str]:
    # MFU needs the device's peak FLOP/s, which only GPUs have (cglab.train.flops): a CPU run exports no MFU.
    return dashboard_metric_names() - {"ray_cglab_mfu"}


@pytest.mark.slow
def test_every_dashboard_metric_is_scraped_from_a_live_training_run():
    tmp = Path(tempfile.mkdtemp(prefix="cgm", dir="/tmp"))  # short: Ray's unix socket paths must fit in 107 bytes
    try:
        corpus = _corpus_with_a_bad_record(tmp / "corpus")
        env = head_env(tmp)
        with ray_head(tmp, env) as head:
            cmd = [
                str(BIN / "cglab"),
                "train",
                "--name",
                TRIAL,
                "--storage",
                str(tmp / "runs"),
                str(CONFIG),
                f"train.train_steps={STEPS}",
                f"data.seq_length={SEQ}",
                f"train.global_batch_size={GLOBAL_BATCH}",
                f"track.experiment={EXPERIMENT}",
                f"data.sources.0.paths=[{corpus / 'stack'}]",
                f"data.sources.1.paths=[{corpus / 'pile'}]",
            ]
            log = open(tmp / "train.log", "w+")
            proc = subprocess.Popen(
                cmd, env={**env, "RAY_ADDRESS": head.gcs}, cwd=tmp, stdout=log, stderr=subprocess.STDOUT
            )
            # Workers push metrics to the node's agent every few seconds and the run is short: scrape while it
            # runs and keep the latest value of every series, until the final step's values are in.
            seen: dict[tuple, float] = {}

            def values(name, **labels):  # Ray adds labels of its own (WorkerId, SessionName, ...)
                want = set(labels.items())
                return [v for (n, lab), v in seen.items() if n == name and want <= set(lab)]

            tags = dict(experiment=EXPERIMENT, trial=TRIAL, rank="0")
            wanted = _expected_series()
            deadline = None
            while True:
                seen.update(_scrape(head.metrics_port))
                done = proc.poll() is not None
                # The counter moves last in TrainMetrics.report: its final value means the last step's gauges are in.
                if done and (
                    proc.returncode != 0
                    or (
                        wanted <= {n for n, _ in seen}
                        and values("ray_cglab_tokens_total", **tags) == [STEPS * GLOBAL_BATCH * SEQ]
                    )
                ):
                    break
                if done and deadline is None:
                    deadline = time.monotonic() + 60  # Ray's export interval is ~10 s
                if deadline is not None and time.monotonic() > deadline:
                    break
                time.sleep(2)
            log.seek(0)
            out = log.read()
            log.close()
        assert proc.returncode == 0, f"cglab train failed:\n{out[-5000:]}"
        missing = wanted - {n for n, _ in seen}
        assert not missing, f"series the dashboard queries but the run did not export: {sorted(missing)}"

        def value(name, **labels):
            vals = values(name, **labels)
            assert len(vals) == 1, (name, labels, vals)
            return vals[0]

        assert value("ray_cglab_step", **tags) == STEPS
        assert value("ray_cglab_tokens_total", **tags) == STEPS * GLOBAL_BATCH * SEQ
        assert value("ray_cglab_step_duration_seconds_count", **tags) == STEPS
        assert 0 < value("ray_cglab_loss", **tags) < 20
        assert value("ray_cglab_learning_rate", **tags) > 0
        assert value("ray_cglab_grad_norm", **tags) > 0
        assert value("ray_cglab_checkpoint_seconds", **tags) > 0  # saved at the last step
        step_time = value("ray_cglab_step_time_seconds", **tags)
        assert 0 <= value("ray_cglab_data_wait_seconds", **tags) <= step_time
        assert value("ray_cglab_tokens_per_second", **tags) == pytest.approx(GLOBAL_BATCH * SEQ / step_time)

        # Data side, per source (the config's source names): skips counted once, as the run's start prepares the
        # corpus (cglab.data.prepared); kept documents as the stream's read tasks read them. Each task's process
        # exports its own series (Ray adds a WorkerId label); the dashboard sums them, and so do we.
        assert (
            sum(
                values("ray_cglab_samples_skipped_total", experiment=EXPERIMENT, source="pile", reason="malformed_json")
            )
            == 1
        )
        for source in ("stack", "pile"):
            assert sum(values("ray_cglab_samples_kept_total", experiment=EXPERIMENT, source=source)) > 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
