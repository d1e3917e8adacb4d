"""The run's tokenizer: a HF `tokenizers` byte-level BPE plus CodeGen's special and whitespace tokens.

Either loaded from a HF tokenizer directory (`tokenizer.json`) or trained on a sample of the corpus. Whatever the
origin, `CGTokenizer` guarantees every special token of the data contract (`cglab.data.contract`) exists:
`<|endoftext|>`, `<pad>`, `<sep>`, `<eom>`, `<mask_1>`..`<mask_N>`, and one token for each run of
2..max_whitespace_run spaces and of tabs (code indentation is mostly such runs; one token per run keeps indented
code short, as CodeGen's GPT-2 extension does).
`save(dir)` writes `tokenizer.json` (loadable by `transformers.PreTrainedTokenizerFast` too) next to the run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from cglab.data.contract import EOT, PAD, SEP, special_tokens
from cglab.data.specials import Specials

FILE_NAME = "tokenizer.json"
META_NAME = "cglab_tokenizer.json"


def whitespace_tokens(max_run: int) -> list[str]:
    # Longest first: the added-token matcher must prefer the longest run.
    return [c * n for c in (" ", "\t") for n in range(max_run, 1, -1)]


class CGTokenizer:
    """A `tokenizers.Tokenizer` with the contract's specials guaranteed; thin, picklable (as JSON)."""

    def __init__(self, tok, num_sentinels: int, max_whitespace_run: int):
        from tokenizers import AddedToken

        self.num_sentinels, self.max_whitespace_run = num_sentinels, max_whitespace_run
        vocab = tok.get_vocab(with_added_tokens=True)
        missing_sp = [t for t in special_tokens(num_sentinels) if t not in vocab]
        if missing_sp:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing_sp])
        missing_ws = [t for t in whitespace_tokens(max_whitespace_run) if t not in vocab]
        if missing_ws:
            tok.add_tokens([AddedToken(t, normalized=False, single_word=False, lstrip=False, rstrip=False)
                            for t in missing_ws])
        # Documents that quote `<|endoftext|>` or `<mask_1>` must not smuggle control tokens into training.
        tok.encode_special_tokens = True
        self.tok = tok
        ids = [tok.token_to_id(t) for t in special_tokens(num_sentinels)]
        self.specials = Specials(eot=ids[0], pad=ids[1], sep=ids[2], eom=ids[3], masks=tuple(ids[4:]))

    # ------------------------------------------------------------------ encode / decode
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of `text`. Literal `<sep>` etc. in data stay plain text unless allow_special (prompts)."""
        self.tok.encode_special_tokens = not allow_special
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        finally:
            self.tok.encode_special_tokens = True

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_batch(self, texts: list[str], append_eot: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Flat int32 ids of all documents (each followed by <|endoftext|>) and int64 offsets, len(texts)+1."""
        encs = self.tok.encode_batch_fast(texts, add_special_tokens=False)
        lens = np.fromiter((len(e) for e in encs), np.int64, len(encs)) + int(append_eot)
        offsets = np.zeros(len(encs) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), np.int32)
        eot = self.specials.eot
        for e, a, b in zip(encs, offsets[:-1], offsets[1:]):
            if append_eot:
                flat[a:b - 1] = e.ids
                flat[b - 1] = eot
            else:
                flat[a:b] = e.ids
        return flat, offsets

    # ------------------------------------------------------------------ persistence
    def to_str(self) -> str:
        return self.tok.to_str()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / FILE_NAME))
        meta = dict(num_sentinels=self.num_sentinels, max_whitespace_run=self.max_whitespace_run,
                    specials=dict(eot=self.specials.eot, pad=self.specials.pad, sep=self.specials.sep,
                                  eom=self.specials.eom, masks=list(self.specials.masks)))
        (d / META_NAME).write_text(json.dumps(meta, indent=1))
        # So `transformers.AutoTokenizer.from_pretrained(d)` finds the roles too.
        (d / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", eos_token=EOT, bos_token=EOT, unk_token=EOT,
            pad_token=PAD, sep_token=SEP)))
        return d

    @classmethod
    def load(cls, directory: str | Path, num_sentinels: int | None = None,
             max_whitespace_run: int | None = None) -> "CGTokenizer":
        from tokenizers import Tokenizer

        d = Path(directory)
        f = d / FILE_NAME if d.is_dir() else d
        if not f.is_file():
            raise FileNotFoundError(f"data.tokenizer.path: no {FILE_NAME} at {d}")
        meta_f = f.parent / META_NAME
        meta = json.loads(meta_f.read_text()) if meta_f.is_file() else {}
        return cls(Tokenizer.from_file(str(f)),
                   num_sentinels or meta.get("num_sentinels", 16),
                   max_whitespace_run or meta.get("max_whitespace_run", 32))

    @classmethod
    def from_str(cls, s: str, num_sentinels: int, max_whitespace_run: int) -> "CGTokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(s), num_sentinels, max_whitespace_run)

    def __reduce__(self):
        return (CGTokenizer.from_str, (self.to_str(), self.num_sentinels, self.max_whitespace_run))


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_sentinels: int = 16,
                    max_whitespace_run: int = 32) -> CGTokenizer:
    """Byte-level BPE of exactly `vocab_size` tokens (specials and whitespace runs included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sp = special_tokens(num_sentinels)
    n_ws = len(whitespace_tokens(max_whitespace_run))
    base = vocab_size - n_ws
    if base < 256 + len(sp):
        raise ValueError(f"data.tokenizer.vocab_size: {vocab_size} cannot hold 256 bytes + {len(sp)} specials "
                         f"+ {n_ws} whitespace tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=base, special_tokens=sp, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return CGTokenizer(tok, num_sentinels, max_whitespace_run)
