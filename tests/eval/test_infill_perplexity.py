"""Evaluation pieces on a tiny random HF CodeGen model with a real byte-level BPE (no downloads)."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cglab.eval.infill import EOM, EOS, MASK, SEP, InfillExample, infill_examples, infill_ids, infill_perplexity

SPECIALS = [EOS, SEP, EOM] + [f"<mask_{i}>" for i in range(1, 5)]
CODE = [
    "def f(x):\n    y = x + 1\n\n    return y * 2\n",
    "import os\n\n\nclass A:\n    a = 1\n    b = 2\n",
    "x = 1\n",
    "for i in range(3):\n    print(i)\n    print(i * i)\n    continue\n",
]


@pytest.fixture(scope="module")
def generator():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CodeGenConfig, CodeGenForCausalLM, PreTrainedTokenizerFast

    from cglab.eval.generate import HFGenerator

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CODE * 10,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, additional_special_tokens=SPECIALS[1:]
    )
    torch.manual_seed(0)
    cfg = CodeGenConfig(
        vocab_size=fast.vocab_size,
        n_positions=64,
        n_ctx=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        rotary_dim=4,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    return HFGenerator(CodeGenForCausalLM(cfg), fast, device="cpu")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=80), max_size=6), st.integers(0, 10))
def test_infill_examples_are_contiguous_slices_with_a_nonblank_middle(texts, seed):
    exs = infill_examples(texts, seed=seed)
    assert exs == infill_examples(texts, seed=seed)
    assert len(exs) <= len(texts)
    for ex in exs:
        assert ex.middle.strip() and ex.prefix.strip() and ex.suffix.strip()
        assert any(ex.prefix + ex.middle + ex.suffix in t for t in texts)


def test_infill_ids_follow_the_codegen2_prompt_and_fit(generator):
    tok = generator.tok
    ex = InfillExample("def f(x):\n" * 20, "    y = x + 1\n", "    return y\n" * 20)
    prompt, target = infill_ids(tok, ex, max_len=48)
    ids = {s: tok.convert_tokens_to_ids(s) for s in (MASK, SEP, EOM, EOS)}
    assert len(prompt) + len(target) <= 48
    assert prompt[-3:] == [ids[EOS], ids[SEP], ids[MASK]] and prompt.count(ids[MASK]) == 2
    assert target[-1] == ids[EOM] and tok.decode(target[:-1]) == ex.middle
    # prefix kept from its end, suffix from its start
    before = prompt[: prompt.index(ids[MASK])]
    assert tok.decode(before).endswith("def f(x):\n") and len(before) > 0


def test_infill_perplexity_matches_one_example_at_a_time(generator):
    import torch

    exs = infill_examples(CODE * 3, seed=1)
    got = infill_perplexity(generator, exs, max_len=64, batch=5)
    nll, n = 0.0, 0
    for ex in exs:  # the definition, unbatched and unpadded
        p, t = infill_ids(generator.tok, ex, 64)
        with torch.no_grad():
            logits = generator.model(input_ids=torch.tensor([p + t])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)[len(p) - 1 : -1]
        nll -= float(lp[torch.arange(len(t)), torch.tensor(t)].sum())
        n += len(t)
    assert got["tokens"] == n and got["examples"] == len(exs)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # bits per byte: over the middles' own bytes (these are short enough to be scored whole), <eom> has none
    nbytes = sum(len(ex.middle.encode("utf-8")) for ex in exs)
    assert got["bytes"] == nbytes
    assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / nbytes, rel=1e-4)
    with pytest.raises(ValueError, match="no examples"):
        infill_perplexity(generator, [], max_len=64)


def test_prefix_lm_infill_perplexity_reads_like_the_training_model(generator):
    """prefix_lm=True scores each example as the Megatron prefix-LM reads it in training (the prompt through
    <sep> bidirectional), batched and padded; and that is not the causal score."""
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    from cglab.config import from_dict
    from cglab.distributed import destroy_parallel, init_parallel
    from cglab.eval.generate import HFGenerator
    from cglab.model.codegen import build_model, forward_logits
    from cglab.model.hf_convert import hf_to_cglab, load_into

    # Two layers (with one, a target's keys and values never depend on how the prefix attended) and large
    # weights, so that how the prompt is read shows in the score.
    torch.manual_seed(0)
    tok = generator.tok
    generator = HFGenerator(
        CodeGenForCausalLM(
            CodeGenConfig(
                vocab_size=tok.vocab_size,
                n_positions=64,
                n_ctx=64,
                n_embd=16,
                n_layer=2,
                n_head=4,
                rotary_dim=4,
                initializer_range=0.5,
                bos_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ),
        tok,
        device="cpu",
    )
    c = generator.model.config
    cfg = from_dict(
        {},
        [
            "model.preset=tiny",
            f"model.num_layers={c.n_layer}",
            f"model.hidden_size={c.n_embd}",
            f"model.num_attention_heads={c.n_head}",
            f"model.rotary_dim={c.rotary_dim}",
            f"model.vocab_size={c.vocab_size}",
            f"model.max_position_embeddings={c.n_positions}",
            "data.seq_length=64",
            "model.architecture=prefix_lm",
            "model.document_masking=false",
        ],
    )
    init_parallel(1, 1)
    try:
        ours = build_model(cfg.model, cfg.parallel).eval()
        load_into(ours, hf_to_cglab(generator.model.state_dict(), cfg.model))
        exs = infill_examples(CODE * 3, seed=1)
        got = infill_perplexity(generator, exs, max_len=64, batch=5, prefix_lm=True)
        nll, n = 0.0, 0
        for ex in exs:
            p, t = infill_ids(generator.tok, ex, 64)
            with torch.no_grad():
                # the training form: every token of the one document carries its prefix end (through <sep>)
                logits = forward_logits(
                    ours, cfg.model, torch.tensor([p + t]), prefix_end=torch.full((1, len(p) + len(t)), len(p) - 1)
                )[0]
            lp = torch.log_softmax(logits.float(), -1)[len(p) - 1 : -1]
            nll -= float(lp[torch.arange(len(t)), torch.tensor(t)].sum())
            n += len(t)
    finally:
        destroy_parallel()
    causal = infill_perplexity(generator, exs, max_len=64, batch=5)["perplexity"]
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert causal != pytest.approx(got["perplexity"], rel=2e-3), (causal, got["perplexity"])
