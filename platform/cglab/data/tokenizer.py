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

from cglab import storage
from cglab.config import CGLabConfig, ConfigError
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
        # tokenizers: kept off `cglab --help`'s path
        from tokenizers import AddedToken

        self.num_sentinels, self.max_whitespace_run = num_sentinels, max_whitespace_run
        vocab = tok.get_vocab(with_added_tokens=True)
        missing_sp = [t for t in special_tokens(num_sentinels) if t not in vocab]
        if missing_sp:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing_sp])
        missing_ws = [t for t in whitespace_tokens(max_whitespace_run) if t not in vocab]
        if missing_ws:
            tok.add_tokens(
                [AddedToken(t, normalized=False, single_word=False, lstrip=False, rstrip=False) for t in missing_ws]
            )
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
                flat[a : b - 1] = e.ids
                flat[b - 1] = eot
            else:
                flat[a:b] = e.ids
        return flat, offsets

    # ------------------------------------------------------------------ persistence
    def to_str(self) -> str:
        return self.tok.to_str()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> str | Path:
        """Write tokenizer.json, its meta and a HF tokenizer_config.json to `directory`: a local path (returned as a
        Path) or a storage URI (returned as given), which workers on any node can load."""
        meta = dict(
            num_sentinels=self.num_sentinels,
            max_whitespace_run=self.max_whitespace_run,
            specials=dict(
                eot=self.specials.eot,
                pad=self.specials.pad,
                sep=self.specials.sep,
                eom=self.specials.eom,
                masks=list(self.specials.masks),
            ),
        )
        # So `transformers.AutoTokenizer.from_pretrained(d)` finds the roles too.
        hf = dict(
            tokenizer_class="PreTrainedTokenizerFast",
            eos_token=EOT,
            bos_token=EOT,
            unk_token=EOT,
            pad_token=PAD,
            sep_token=SEP,
        )
        files = {
            FILE_NAME: self.tok.to_str(pretty=True),
            META_NAME: json.dumps(meta, indent=1),
            "tokenizer_config.json": json.dumps(hf),
        }
        for name, text in files.items():
            storage.write_bytes(storage.join(directory, name), text.encode())
        return directory if storage.is_uri(directory) else Path(directory)

    @classmethod
    def load(
        cls, directory: str | Path, num_sentinels: int | None = None, max_whitespace_run: int | None = None
    ) -> CGTokenizer:
        # tokenizers: kept off `cglab --help`'s path
        from tokenizers import Tokenizer

        f = storage.join(directory, FILE_NAME)
        if not storage.exists(f):  # the directory, or the file itself
            f = str(directory)
        if not storage.exists(f):
            raise FileNotFoundError(f"data.tokenizer.path: no {FILE_NAME} at {directory}")
        meta_f = storage.join(f.rsplit("/", 1)[0] if "/" in f else ".", META_NAME)
        meta = json.loads(storage.read_bytes(meta_f)) if storage.exists(meta_f) else {}
        return cls(
            Tokenizer.from_str(storage.read_bytes(f).decode()),
            num_sentinels or meta.get("num_sentinels", 16),
            max_whitespace_run or meta.get("max_whitespace_run", 32),
        )

    @classmethod
    def from_str(cls, s: str, num_sentinels: int, max_whitespace_run: int) -> CGTokenizer:
        # tokenizers: kept off `cglab --help`'s path
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(s), num_sentinels, max_whitespace_run)

    def __reduce__(self):
        return (CGTokenizer.from_str, (self.to_str(), self.num_sentinels, self.max_whitespace_run))


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, num_sentinels: int = 16, max_whitespace_run: int = 32
) -> CGTokenizer:
    """Byte-level BPE of exactly `vocab_size` tokens (specials and whitespace runs included)."""
    # tokenizers: kept off `cglab --help`'s path
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    sp = special_tokens(num_sentinels)
    n_ws = len(whitespace_tokens(max_whitespace_run))
    base = vocab_size - n_ws
    if base < 256 + len(sp):
        raise ValueError(
            f"data.tokenizer.vocab_size: {vocab_size} cannot hold 256 bytes + {len(sp)} specials "
            f"+ {n_ws} whitespace tokens"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base, special_tokens=sp, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return CGTokenizer(tok, num_sentinels, max_whitespace_run)


# ------------------------------------------------------------------------- the tokenizer that comes with weights
INIT_FROM = "model.init_from"
HF_CONFIG, CKPT_STATE = "config.json", "trainer_state.json"  # what tells a HF directory from a cglab checkpoint


def weights_tokenizer(d: Path) -> Path:
    """Where the tokenizer of a `model.init_from` directory lives: a cglab checkpoint's tokenizer/tokenizer.json
    (train.checkpoint writes it), else a HF directory's tokenizer.json (it may not exist)."""
    return d / "tokenizer" / FILE_NAME if (d / CKPT_STATE).is_file() else d / FILE_NAME


def tokenizer_file(cfg: CGLabConfig) -> tuple[str, str | Path] | None:
    """(the config field it comes from, its tokenizer.json or directory): data.tokenizer.path when set (a storage
    URI kept as given), else the tokenizer that came with model.init_from's weights; None when neither (the
    corpus's is trained)."""
    if cfg.data.tokenizer.path:
        path = cfg.data.tokenizer.path
        return "data.tokenizer.path", path if storage.is_uri(path) else Path(path)
    if not cfg.model.init_from:
        return None
    d = Path(cfg.model.init_from).expanduser().resolve()
    tok = weights_tokenizer(d)
    if not tok.is_file():
        raise ConfigError(
            f"{INIT_FROM}: {d} has no {tok.relative_to(d)}; the weights' token ids mean nothing without the "
            f"tokenizer they were trained with: set data.tokenizer.path to it (for a HF tokenizer "
            f"without tokenizer.json, `AutoTokenizer.from_pretrained(dir).save_pretrained(dir)` "
            f"writes one)"
        )
    return INIT_FROM, tok


def load_tokenizer(cfg: CGLabConfig):
    """The run's given tokenizer (see tokenizer_file) as a CGTokenizer, or None. ConfigError naming the field when
    it cannot be loaded or, with model.init_from, has more tokens than model.vocab_size (the weights' vocabulary:
    shape_errors checks the two agree): tokens past it would have no embedding row."""
    found = tokenizer_file(cfg)
    if found is None:
        return None
    field, path = found
    d, tc = cfg.data, cfg.data.tokenizer
    try:
        tok = CGTokenizer.load(path, d.num_sentinels, tc.max_whitespace_run)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise ConfigError(f"{field}: cannot load {str(path)!r} ({err})") from None
    if cfg.model.init_from and tok.vocab_size > cfg.model.vocab_size:
        added = added_tokens(path, tok)
        raise ConfigError(
            f"{field}: the tokenizer {path} has {tok.vocab_size} tokens"
            + (f" ({len(added)} of them added for cglab's data contract: {some_tokens(added)})" if added else "")
            + f", more than model.vocab_size={cfg.model.vocab_size}, the vocabulary of the weights in {INIT_FROM}; "
            f"their ids past it have no embedding row"
        )
    return tok


def added_tokens(path: Path, tok) -> list[str]:
    """The tokens CGTokenizer added to the tokenizer file (specials, sentinels, whitespace runs it lacked)."""
    # tokenizers: kept off `cglab --help`'s path
    from tokenizers import Tokenizer

    f = path / "tokenizer.json" if path.is_dir() else path
    raw = set(Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True))
    return [t for t, _ in sorted(tok.tok.get_vocab(with_added_tokens=True).items(), key=lambda x: x[1]) if t not in raw]


def some_tokens(tokens: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(t) for t in tokens[:n])
    return shown + (f", ... ({len(tokens) - n} more)" if len(tokens) > n else "")
