from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.eval import nl

pytestmark = pytest.mark.no_ray  # its slow tests start no Ray: they run beside the Ray tests (Makefile: RAY_TESTS)


def uniform_scorer(vocab: int):
    """Every byte is a token with probability 1/vocab."""
    return lambda texts: [np.full(len(t.encode()), -math.log(vocab)) for t in texts]


def test_uniform_model_metrics_are_exact():
    texts = ["hello world", "def f():\n    return 1\n", ""]
    m = nl.lm_metrics(uniform_scorer(256), texts)
    assert m["perplexity"] == pytest.approx(256)
    assert m["bits_per_byte"] == pytest.approx(8.0)
    assert m["docs"] == 2 and m["bytes"] == m["tokens"] == 11 + 22
    with pytest.raises(ValueError, match="no non-empty"):
        nl.lm_metrics(uniform_scorer(2), [""])


words = st.text(alphabet="abcdefghij", min_size=1, max_size=6)
paragraph = st.lists(words, min_size=1, max_size=30).map(lambda ws: " ".join(ws) + ".")


@given(st.lists(paragraph, min_size=1, max_size=5).map("\n\n".join))
@settings(max_examples=100, deadline=None)
def test_lambada_examples_are_paragraph_last_words(doc):
    examples = nl.lambada_examples([doc], min_context_words=3)
    paras = doc.split("\n\n")
    expected = []
    before = ""
    for p in paras:
        ws = p[:-1].split(" ")
        ctx = (before + " ".join(ws[:-1])) if len(ws) > 1 else None
        if ctx is not None and len(ctx.split()) >= 3:
            expected.append((ctx, ws[-1]))
        before += p + "\n\n"
    assert examples == expected


def test_lambada_requires_sentence_end_and_word_target():
    doc = (
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
        "upsilon phi chi\n\nno sentence end here\n\nthe number is 42."
    )
    ex = nl.lambada_examples([doc], min_context_words=3)
    assert ex == []


@pytest.mark.slow
def test_tiny_model_scores_are_consistent_with_hf_loss(tiny_hf_dir):
    import torch

    from cglab.eval.generate import load_generator

    gen = load_generator(tiny_hf_dir)
    text = "def add(a, b):\n    return a + b\n"
    (lp,) = gen.score([text])
    ids = [gen.tok.eos_token_id] + gen.tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = gen.model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert len(lp) == len(ids) - 1
    assert -lp.sum() == pytest.approx(loss * (len(ids) - 1), rel=1e-4)
    # Longer than the context (256): windows cover every token exactly once.
    long_text = text * 60
    (lp_long,) = gen.score([long_text])
    assert len(lp_long) == len(gen.tok(long_text, add_special_tokens=False)["input_ids"]) > 256
    # Random init is near uniform over the vocabulary.
    m = nl.lm_metrics(gen.score, [text])
    assert abs(m["nll_per_token"] - math.log(len(gen.tok))) < 0.5


@pytest.mark.slow
def test_lambada_accuracy_with_tiny_model_matches_its_greedy_words(tiny_hf_dir):
    from cglab.eval.generate import load_generator

    gen = load_generator(tiny_hf_dir)
    docs = nl.builtin_texts(8)["nl"]
    examples = nl.lambada_examples(docs)[:6]
    assert examples
    # Make half the targets exactly what the model predicts greedily: accuracy must see them.
    preds = [nl.first_word(o[0]) for o in gen.generate([c for c, _ in examples], max_new_tokens=8, stop=("\n",))]
    rigged = [(c, p if i % 2 == 0 and p else t) for i, ((c, t), p) in enumerate(zip(examples, preds))]
    want = np.mean([p == t for p, (_, t) in zip(preds, rigged)])
    assert nl.lambada_accuracy(gen, rigged)["accuracy"] == pytest.approx(want)
    assert want > 0
