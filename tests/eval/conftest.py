"""Fixtures: a tiny random-init CodeGenForCausalLM with a real byte-level BPE tokenizer (no downloads)."""

from __future__ import annotations

import pytest

SPECIALS = ["<|endoftext|>", "<sep>", "<eom>"] + [f"<mask_{i}>" for i in range(1, 5)]


def build_tiny_hf_dir(path, seed: int = 0):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CodeGenConfig, CodeGenForCausalLM, PreTrainedTokenizerFast

    from cglab.eval.humaneval import load_problems

    corpus = [p["prompt"] + p["canonical_solution"] for p in load_problems().values()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
    )
    torch.manual_seed(seed)
    cfg = CodeGenConfig(
        vocab_size=fast.vocab_size,
        n_positions=256,
        n_ctx=256,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
    )
    model = CodeGenForCausalLM(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    return build_tiny_hf_dir(tmp_path_factory.mktemp("tiny_codegen"))
