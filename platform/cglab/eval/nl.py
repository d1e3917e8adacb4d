"""Held-out language-model metrics: perplexity and bits-per-byte (NL and code), LAMBADA-style last-word accuracy.

Scoring goes through a function `score(texts) -> [per-token natural-log probs]` (`Generator.score`): every
token of a text is predicted, the first one from EOS. Bits-per-byte divides the total NLL, in bits, by the
UTF-8 byte count, so models with different tokenizers compare fairly; perplexity is per token.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sysconfig
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from cglab import storage
from cglab.eval.humaneval import load_problems

ScoreFn = Callable[[Sequence[str]], Sequence[np.ndarray]]
_WORD = re.compile(r"[A-Za-z]+")
_TRAILING_PUNCT = ".!?,;:\"')]}"


def lm_metrics(score: ScoreFn, texts: Sequence[str]) -> dict:
    """{"perplexity", "bits_per_byte", "nll_per_token", "tokens", "bytes", "docs"} over non-empty texts."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("lm_metrics: no non-empty texts to score")
    logps = score(texts)
    nll = -float(sum(float(np.sum(lp, dtype=np.float64)) for lp in logps))
    tokens = sum(len(lp) for lp in logps)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / nbytes,
        "nll_per_token": nll / tokens,
        "tokens": tokens,
        "bytes": nbytes,
        "docs": len(texts),
    }


def lambada_examples(
    docs: Iterable[str], *, min_context_words: int = 20, max_context_chars: int = 2000
) -> list[tuple[str, str]]:
    """(context, target) pairs: the last word of each paragraph, with the text before it as context.

    A paragraph ends at a blank line or the end of the document, and must end a sentence (. ! ?); its last
    word, stripped of trailing punctuation, must be alphabetic and follow a space (so the model must produce
    " word"). The context ends right before that space; it keeps at most `max_context_chars` of the preceding
    document.
    """
    examples = []
    for doc in docs:
        for para in re.finditer(r"\S(?:.*?\S)?(?=\n\s*\n|\s*\Z)", doc, flags=re.S):
            end = para.end()
            while end > para.start() and doc[end - 1] in _TRAILING_PUNCT:
                end -= 1
            start = end
            while start > para.start() and not doc[start - 1].isspace():
                start -= 1
            target = doc[start:end]
            if not any(ch in ".!?" for ch in doc[end : para.end()]):
                continue  # LAMBADA targets end a sentence
            if not _WORD.fullmatch(target) or start == 0 or doc[start - 1] != " ":
                continue
            context = doc[: start - 1]
            if len(context.split()) < min_context_words:
                continue
            examples.append((context[-max_context_chars:], target))
    return examples


def first_word(continuation: str) -> str:
    m = _WORD.match(continuation.lstrip())
    return m.group(0) if m else ""


def lambada_accuracy(generator, examples: Sequence[tuple[str, str]], *, max_new_tokens: int = 8) -> dict:
    """Greedy-decode each context; correct when the first word produced equals the target exactly."""
    if not examples:
        raise ValueError("lambada_accuracy: no examples (documents too short or no paragraph ends in a word)")
    outs = generator.generate(
        [c for c, _ in examples], n=1, temperature=0.0, max_new_tokens=max_new_tokens, stop=("\n",)
    )
    hits = [first_word(o[0]) == t for o, (_, t) in zip(outs, examples)]
    return {"accuracy": float(np.mean(hits)), "examples": len(examples)}


def read_texts(path: str | Path, limit: int | None = None) -> list[str]:
    """Documents from .txt (one file = one doc), or .jsonl with a "text" or "content" field per line; a local path or
    a storage URI (a sweep's held-out split lives in its storage, where every node reads it)."""
    content = storage.read_bytes(path).decode()
    if not str(path).endswith(".jsonl"):
        return [content]
    texts = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(row["text"] if "text" in row else row["content"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'text' or 'content'") from err
        if limit and len(texts) >= limit:
            break
    return texts


def builtin_texts(limit: int = 64) -> dict[str, list[str]]:
    """Fallback eval texts when no held-out files are given: HumanEval solutions (code) and stdlib module
    docstrings (NL). NOT held out from a corpus built from this Python installation: use for smoke runs."""
    code = [p["prompt"] + p["canonical_solution"] for p in load_problems().values()][:limit]
    nl = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(errors="replace")))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc.split()) >= 40:
            nl.append(doc)
        if len(nl) >= limit:
            break
    return {"nl": nl, "code": code}


def evaluate(generator, nl_texts: Sequence[str], code_texts: Sequence[str], *, lambada: bool = True) -> dict:
    """Perplexity / bits-per-byte on NL and code, plus LAMBADA-style accuracy built from the NL texts."""
    out = {"nl": lm_metrics(generator.score, nl_texts), "code": lm_metrics(generator.score, code_texts)}
    if lambada:
        examples = lambada_examples(nl_texts)
        out["lambada"] = lambada_accuracy(generator, examples) if examples else {"accuracy": None, "examples": 0}
    return out
