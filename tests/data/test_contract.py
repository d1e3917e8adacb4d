"""The data contract (cglab.data.contract) is what the objectives write, what the tokenizer guarantees and what the
infill prompts are built from, in text and in ids alike."""

import numpy as np
import pytest

from cglab.config import ObjectiveConfig
from cglab.data import contract as C
from cglab.data import objectives as O
from cglab.data.packing import pack_documents
from cglab.data.specials import Specials

SP = Specials.contiguous(1000, 64)
S = 128


def _samples(cfg: ObjectiveConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    docs = [np.append(rng.integers(0, 1000, n), SP.eot).astype(np.int32) for n in (30, 90, 200, 12, 60)]
    tokens, segs = pack_documents(docs, S, SP, O.packing_reserve(cfg))
    return O.apply_objective_batch(tokens, segs, cfg, SP, [O.sample_rng(seed, 0, i) for i in range(len(tokens))], S)


@pytest.mark.parametrize("kind", ["clm", "span_corruption", "codegen2", "infill", "ul2"])
def test_every_objective_writes_exactly_the_contract_fields(kind):
    out = _samples(ObjectiveConfig(kind=kind))
    assert list(out) == list(C.SAMPLE_KEYS)
    W = len(out["objective"])
    for k in C.SAMPLE_KEYS:
        assert out[k].shape == ((W, S) if k in C.PER_TOKEN else (W,)), k
        assert (out[k].dtype.kind == "f") == (k in C.FLOAT_FIELDS), (k, out[k].dtype)


@pytest.mark.parametrize(
    "cfg,name",
    [
        (dict(kind="clm"), "clm"),
        (dict(kind="span_corruption"), "span"),
        (dict(kind="infill", infill_rate=1.0), "infill"),
        (dict(kind="ul2", ul2_denoisers=[dict(name="R", prob=1.0)]), "ul2"),
        (dict(kind="ul2", ul2_denoisers=[dict(name="S", prob=1.0, kind="prefix")]), "ul2_s"),
    ],
)
def test_a_samples_objective_code_names_the_objective_that_made_it(cfg, name):
    """The names are the loss and mask-fraction metric names (`loss/<name>`): a code must name its objective."""
    codes = set(_samples(ObjectiveConfig(**cfg))["objective"].tolist())
    assert [C.OBJECTIVES[c] for c in codes] == [name]


def test_the_tokenizers_special_ids_are_the_contracts_tokens(micro_tokenizer):
    sp, name = micro_tokenizer.specials, micro_tokenizer.tok.id_to_token
    assert [name(sp.eot), name(sp.pad), name(sp.sep), name(sp.eom)] == [C.EOT, C.PAD, C.SEP, C.EOM]
    assert [name(m) for m in sp.masks] == [C.mask_token(i) for i in range(1, len(sp.masks) + 1)]
    assert C.special_tokens(len(sp.masks)) == [name(int(i)) for i in sp.ids()]


def test_the_infill_prompt_reads_the_same_in_text_and_in_ids(micro_tokenizer):
    tok, sp = micro_tokenizer, micro_tokenizer.specials
    prefix, suffix = "def f(x):\n    y = x + 1\n", "    return y\n"
    text = C.infill_prompt(prefix, suffix)
    assert text == f"{prefix}<mask_1>{suffix}<|endoftext|><sep><mask_1>"
    ids = C.infill_prompt(tok.encode(prefix), tok.encode(suffix), [sp.masks[0]], [sp.eot], [sp.sep])
    assert tok.encode(text, allow_special=True) == ids
