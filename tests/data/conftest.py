from __future__ import annotations

import pytest

from cglab.raylocal import local_ray


@pytest.fixture(scope="package")
def ray_local(tmp_path_factory):
    """One private local Ray for every module of tests/data that asks for it, started by the first and shut down
    after the package's last test: a start and stop cost ~6 s, and its worker processes keep their imports
    (pyarrow, tokenizers, cglab) from one module to the next. 4 logical CPUs on the 2 cores: test_train_workers'
    two Train workers take one each and leave two for the Ray Data tasks they start; no test here counts tasks
    or blocks by CPUs. While it is up no module here may start a Ray of its own (`ray.init` would fail), so a test
    that needs Ray not running in this process runs its command in a subprocess."""
    import ray

    with local_ray(4, tmp_path_factory.mktemp("ray")):
        yield ray


@pytest.fixture(scope="package")
def micro_cache(tmp_path_factory):
    """data.cache_path of this package's configs over the session's micro corpus (test_pipeline, test_stream,
    test_train_workers): its drop list and prepared tokens depend on the sources, filters, tokenizer and
    data.chunk_tokens only, so the first module to prepare builds them and the others find them."""
    return str(tmp_path_factory.mktemp("micro_cache"))


def cached_corpus_config(corpus, cache, train_docs: int, **data) -> dict:
    """A raw config over `corpus` (SourceConfigs) with its artifacts under `cache` and a 400-token BPE trained on
    `train_docs` documents, plus any other data.* fields."""
    return {
        "data": {
            "sources": [c.model_dump() for c in corpus],
            "cache_path": str(cache),
            "tokenizer": {"vocab_size": 400, "train_docs": train_docs},
            **data,
        }
    }
