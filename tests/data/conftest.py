from __future__ import annotations

import pytest

from cglab.raylocal import local_ray


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """A private local Ray cluster for one test module (2 logical CPUs), shut down afterwards."""
    import ray

    with local_ray(2, tmp_path_factory.mktemp("ray")):
        yield ray


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
