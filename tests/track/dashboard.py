"""What the Grafana dashboard (dashboards/grafana/cglab.json) queries, and a scrape of a Ray node's Prometheus
endpoint: shared by tests/track/test_metrics.py (names, without Ray) and tests/clusters/test_submit.py (a live job on
the local recipe's head)."""

from __future__ import annotations

import io
import json
import re
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "dashboards" / "grafana" / "cglab.json"


def dashboard_exprs() -> list[str]:
    d = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in d["templating"]["list"] if isinstance(v.get("query"), dict)]
    return exprs


def dashboard_metric_names() -> set[str]:
    # Series names are the identifiers that start with ray_cglab_ (PromQL functions and labels never do).
    return {n for e in dashboard_exprs() for n in re.findall(r"\bray_cglab_[a-z_]+", e)}


def scrape(port: int) -> dict[tuple, float]:
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


def corpus_with_a_bad_record(out: Path) -> Path:
    """The micro corpus, with one malformed JSON line as the very first Pile record: the stream's first read task
    reads it first, so exactly one `malformed_json` skip must be counted."""
    import zstandard

    from cglab.data.corpus import build_corpus

    build_corpus(out, nl_chars=250_000, code_bytes=400_000, shards=2)
    first = sorted((out / "pile").glob("*.jsonl.zst"))[0]
    text = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(first.read_bytes())).read()
    first.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": not json\n' + text))
    return out


def series(seen: dict[tuple, float], name: str, **labels) -> list[float]:
    """The values in `seen` (a scrape) of series `name` whose labels include `labels` (Ray adds its own: WorkerId,
    SessionName, ...)."""
    want = set(labels.items())
    return [v for (n, lab), v in seen.items() if n == name and want <= set(lab)]


def expected_series() -> set[str]:
    # MFU needs the device's peak FLOP/s, which only GPUs have (cglab.train.flops): a CPU run exports no MFU.
    return dashboard_metric_names() - {"ray_cglab_mfu"}
