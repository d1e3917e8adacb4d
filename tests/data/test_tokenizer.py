"""Tokenizer: specials present and distinct, whitespace runs, lossless round trip, save/load, HF dir loading."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cglab.data.contract import special_tokens
from cglab.data.tokenizer import CGTokenizer, train_tokenizer, whitespace_tokens

CODE = "class A:\n    def f(self, x):\n\t\treturn x  # done\n\n        pass\n"


def test_specials_and_vocab(micro_tokenizer):
    tok = micro_tokenizer
    sp = tok.specials
    assert tok.vocab_size == 1024
    assert len(sp.masks) == 16
    assert tok.tok.id_to_token(sp.eot) == "<|endoftext|>" and tok.tok.id_to_token(sp.masks[0]) == "<mask_1>"
    assert tok.tok.id_to_token(sp.sep) == "<sep>" and tok.tok.id_to_token(sp.eom) == "<eom>"
    assert tok.tok.id_to_token(sp.pad) == "<pad>"
    for ws in whitespace_tokens(32):
        assert tok.tok.token_to_id(ws) is not None


def test_whitespace_runs_are_single_tokens(micro_tokenizer):
    tok = micro_tokenizer
    four, tabs = tok.tok.token_to_id(" " * 4), tok.tok.token_to_id("\t\t")
    ids = tok.encode("x\n    y\n\t\tz")
    assert four in ids and tabs in ids


@pytest.mark.parametrize(
    "text", [CODE, "", "naïve ünïcödé → ✓ 中文", " " * 70 + "x", "a\r\nb", "<|endoftext|> <mask_3>"]
)
def test_round_trip(micro_tokenizer, text):
    assert micro_tokenizer.decode(micro_tokenizer.encode(text)) == text


def test_literal_special_strings_in_documents_stay_text(micro_tokenizer):
    tok = micro_tokenizer
    ids = tok.encode("see <|endoftext|> and <sep>")
    assert tok.specials.eot not in ids and tok.specials.sep not in ids
    assert tok.encode("<sep>", allow_special=True) == [tok.specials.sep]


def test_batch_encode_appends_eot_and_matches_single(micro_tokenizer):
    tok = micro_tokenizer
    texts = [CODE, "hello world", "x"]
    flat, off = tok.encode_batch(texts)
    assert flat.dtype == np.int32 and off[0] == 0 and off[-1] == flat.size
    for i, t in enumerate(texts):
        doc = flat[off[i] : off[i + 1]]
        assert doc[-1] == tok.specials.eot and doc[:-1].tolist() == tok.encode(t)


def test_save_load_and_pickle_round_trip(micro_tokenizer, tmp_path):
    tok = micro_tokenizer
    d = tok.save(tmp_path / "tok")
    back = CGTokenizer.load(d)
    assert back.specials == tok.specials and back.vocab_size == tok.vocab_size
    assert back.encode(CODE) == tok.encode(CODE)
    assert pickle.loads(pickle.dumps(tok)).encode(CODE) == tok.encode(CODE)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CGTokenizer.load(tmp_path / "missing")


def test_loading_a_plain_hf_tokenizer_adds_missing_specials(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    base.decoder = decoders.ByteLevel()
    base.train_from_iterator(
        [CODE] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    (tmp_path / "hf").mkdir()
    base.save(str(tmp_path / "hf" / "tokenizer.json"))
    tok = CGTokenizer.load(tmp_path / "hf", num_sentinels=4, max_whitespace_run=8)
    assert tok.specials.eot == base.token_to_id("<|endoftext|>")  # existing ids are kept
    assert len(tok.specials.masks) == 4
    assert tok.vocab_size == base.get_vocab_size() + len(special_tokens(4)) - 1 + len(whitespace_tokens(8))
    assert tok.decode(tok.encode(CODE)) == CODE


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], 300, 16, 32)
