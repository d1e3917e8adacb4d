"""Shared fixtures. Session-scoped ones are built once per test session in a private temp dir."""

from __future__ import annotations

import pytest

# tier_guard fails a test outside the slow tier that starts Ray, an MLflow server or worker processes; pytester
# lets tests/test_tier_guard.py run pytest on a test file of its own.
pytest_plugins = ["tests.tier_guard", "pytester"]


@pytest.fixture(scope="session")
def micro_corpus(tmp_path_factory):
    """A small embedded corpus (micro Pile + micro Stack, 2 shards each); returns the build summary dict."""
    from cglab.data.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("micro_corpus"), nl_chars=250_000, code_bytes=400_000, shards=2)


@pytest.fixture(scope="session")
def micro_sources(micro_corpus):
    """data.sources entries (dicts) for the micro corpus."""
    from cglab.data.corpus import corpus_sources

    return corpus_sources(micro_corpus["out"])


@pytest.fixture(scope="session")
def micro_tokenizer(micro_sources, tmp_path_factory):
    """A byte-level BPE (vocab 1024, 16 sentinels) trained on the micro corpus; saved under `.path`."""
    from cglab.config import DataConfig
    from cglab.data.pipeline import sample_texts
    from cglab.data.tokenizer import train_tokenizer

    dcfg = DataConfig(sources=micro_sources)
    tok = train_tokenizer(sample_texts(dcfg, 600), 1024, 16, 32)
    tok.path = tok.save(tmp_path_factory.mktemp("tokenizer"))
    return tok


@pytest.fixture(scope="module")
def single_rank():
    """Megatron parallel state for one process (TP=PP=1), torn down after the module."""
    from cglab.distributed import destroy_parallel, init_parallel

    init_parallel(1, 1)
    yield
    destroy_parallel()


@pytest.fixture(scope="session")
def s3_store():
    """A real S3 API on 127.0.0.1 (moto's server, a process of its own) with the bucket `cglab`; this process
    is its client for the rest of the run (AWS_* in os.environ, which pyarrow's S3 file system reads). Yields the
    AWS_* env, for processes that must reach it too."""
    from tests.clusters.multinode import BUCKET, s3_server

    with s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(BUCKET)
        yield env


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow server (SQL store) on 127.0.0.1 for every test that logs to one (every node of a test cluster
    reaches it): tests keep to experiments or sweeps of their own. A test may stop and start it (the outage test):
    it comes back on the same port and store."""
    from cglab.track.server import local_server

    with local_server(tmp_path_factory.mktemp("mlflow"), start_timeout_s=None) as server:  # up when it answers
        yield server
