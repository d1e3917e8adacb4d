"""Batched sampling and scoring behind a small protocol, so any model can be evaluated.

`Generator` is what every suite uses: `generate` (n samples per prompt, temperature / top-p, stop strings,
max new tokens) and `score` (per-token log-probs of texts). `HFGenerator` implements it on a HF causal LM
(`CodeGenForCausalLM`), using HF `generate` with its KV cache; stop sequences are matched on decoded text.
`load_generator(path)` opens an HF model directory, or a cglab checkpoint through the model package's exporter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from cglab.data.contract import EOT as EOS  # HF tokenizers without an eos_token fall back to the contract's


class Generator(Protocol):
    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        stop: Sequence[str] = (),
    ) -> list[list[str]]:
        """For each prompt, n continuations (text only, cut before the earliest stop string)."""
        ...

    def score(self, texts: Sequence[str]) -> list[np.ndarray]:
        """For each text, natural-log probs of each of its tokens, the first conditioned on EOS."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text before the earliest stop string, and whether one was found."""
    cut = min((i for s in stop if s and (i := text.find(s)) != -1), default=-1)
    return (text, False) if cut == -1 else (text[:cut], True)


class HFGenerator:
    """Generator over a HF causal LM and tokenizer (left padding, KV-cached `generate`)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16, device: str | None = None):
        import torch  # torch and transformers: kept off the sandbox-only `cglab eval` commands

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.tok = tokenizer
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token or EOS
        self.batch_size = batch_size
        self.max_len = getattr(model.config, "n_positions", None) or getattr(
            model.config, "max_position_embeddings", 2048
        )

    # ---------------------------------------------------------------------------------------------- sampling
    def generate(self, prompts, *, n=1, temperature=0.0, top_p=1.0, max_new_tokens=128, stop=()):
        rows = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]  # n copies, batched together
        outs: list[list[str]] = [[] for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            texts = self._generate_batch([p for _, p in chunk], temperature, top_p, max_new_tokens, stop)
            for (i, _), t in zip(chunk, texts):
                outs[i].append(t)
        return outs

    def _generate_batch(self, prompts, temperature, top_p, max_new_tokens, stop):
        torch = self.torch
        enc = self.tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        keep = max(1, self.max_len - max_new_tokens)
        ids, mask = ids[:, -keep:].to(self.device), mask[:, -keep:].to(self.device)  # room for the answer
        prompt_len = ids.shape[1]
        sampling = temperature > 0
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sampling else dict(do_sample=False)
        criteria = _stop_criteria(self.tok, prompt_len, stop) if stop else None
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.tok.pad_token_id,
                eos_token_id=self.tok.eos_token_id,
                stopping_criteria=criteria,
                use_cache=True,
                **kwargs,
            )
        texts = self.tok.batch_decode(out[:, prompt_len:], skip_special_tokens=False)
        # Padding after an early EOS decodes as EOS text: cut there too, and at the stop strings.
        return [cut_at_stop(t, tuple(stop) + (EOS, self.tok.eos_token or EOS))[0] for t in texts]

    # ---------------------------------------------------------------------------------------------- scoring
    def score(self, texts):
        torch = self.torch
        bos = self.tok.convert_tokens_to_ids(self.tok.eos_token or EOS)
        out = []
        with torch.no_grad():
            for text in texts:
                ids = [bos] + self.tok(text, add_special_tokens=False)["input_ids"]
                logps = []
                # Non-overlapping windows keep each window within the context; each window after the first
                # restarts from its own first token (a standard, slightly pessimistic choice).
                for s in range(0, len(ids) - 1, self.max_len - 1):
                    window = torch.tensor([ids[s : s + self.max_len]], device=self.device)
                    logits = self.model(input_ids=window).logits.float()
                    lp = torch.log_softmax(logits[0, :-1], dim=-1)
                    logps.append(lp.gather(1, window[0, 1:, None])[:, 0].cpu().numpy())
                out.append(np.concatenate(logps) if logps else np.zeros(0, dtype=np.float32))
        return out


def _stop_criteria(tok, prompt_len: int, stop: Sequence[str]):
    """Per-row stopping: a row is done once its decoded continuation contains a stop string."""
    import torch  # torch and transformers: kept off the sandbox-only `cglab eval` commands
    from transformers import StoppingCriteria, StoppingCriteriaList

    longest = max(len(s) for s in stop)

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            # Decoding only the last few tokens is enough to see a newly completed stop string.
            tail = input_ids[:, max(prompt_len, input_ids.shape[1] - longest - 2) :]
            texts = tok.batch_decode(tail, skip_special_tokens=False)
            return torch.tensor([any(s in t for s in stop) for t in texts], device=input_ids.device)

    return StoppingCriteriaList([StopOnText()])


# -------------------------------------------------------------------------------------------------- loading
def _is_hf_dir(path: Path) -> bool:
    cfg = path / "config.json"
    return cfg.is_file() and "model_type" in json.loads(cfg.read_text())


def load_generator(
    checkpoint_or_hf_dir: str | Path, *, batch_size: int = 16, device: str | None = None, dtype: str | None = None
) -> HFGenerator:
    """An HFGenerator for an HF model dir (config.json + weights + tokenizer) or a cglab checkpoint."""
    path = Path(checkpoint_or_hf_dir)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    scratch = None
    if not _is_hf_dir(path):
        path = scratch = _export(path)
    import torch  # torch and transformers: kept off the sandbox-only `cglab eval` commands
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tok = AutoTokenizer.from_pretrained(path)
    finally:
        if scratch is not None:  # both are in memory now; the exported copy is no longer needed
            shutil.rmtree(scratch, ignore_errors=True)
    return HFGenerator(model, tok, batch_size=batch_size, device=device)


def _export(ckpt: Path) -> Path:
    """A cglab training checkpoint (any TP/PP layout) exported to a scratch HF directory."""
    from cglab.train.checkpoint import MARKER, checkpoint_to_hf  # torch: kept off `cglab eval`'s import

    if not (ckpt / MARKER).is_file():
        raise ValueError(
            f"{ckpt}: neither an HF model directory (config.json with model_type) nor a complete "
            f"cglab checkpoint ({MARKER} marker)"
        )
    return checkpoint_to_hf(ckpt, Path(tempfile.mkdtemp(prefix="cglab-hf-")))
