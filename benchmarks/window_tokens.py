"""Raw and loss tokens per window of each objective, read off the training stream itself.

    PYTHONPATH=platform python benchmarks/window_tokens.py [--seq 128] [--samples 2000] [--architecture causal]

Builds the embedded micro corpus (micro Pile + micro Stack) and a byte-level BPE on it, then runs
`cglab.data.stream.stream_samples` (the training stream of DP rank 0 over the prepared corpus, on a local Ray)
for each objective and prints, per window, the mean raw tokens (document tokens that entered the sample) and loss
tokens (the loss mask's sum). Issue 26 measured the packer's reserve with it before and after each window's part
of the mix (a UL2 denoiser, codegen2's causal half) was drawn before packing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

OBJECTIVES = ("clm", "infill", "span_corruption", "codegen2", "ul2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--sentinels", type=int, default=64)
    ap.add_argument("--architecture", default="causal", choices=["causal", "prefix_lm"])
    args = ap.parse_args()

    from cglab.config import DataConfig, from_dict
    from cglab.data.corpus import build_corpus, corpus_sources
    from cglab.data.pipeline import prepare_data, sample_texts
    from cglab.data.stream import stream_samples
    from cglab.data.tokenizer import train_tokenizer
    from cglab.raylocal import local_ray

    with tempfile.TemporaryDirectory() as tmp:
        built = build_corpus(Path(tmp, "corpus"), nl_chars=250_000, code_bytes=400_000, shards=2)
        sources = corpus_sources(built["out"])
        tok = train_tokenizer(sample_texts(DataConfig(sources=sources), 600), 1024, args.sentinels, 32)
        tok_dir = tok.save(Path(tmp, "tokenizer"))
        print(f"seq {args.seq}, {args.samples} samples each, model.architecture={args.architecture}")
        print(f"{'objective':<16} {'raw/window':>10} {'loss/window':>11}")
        with local_ray(2):
            for kind in OBJECTIVES:
                cfg = from_dict(
                    {
                        "data": {
                            "sources": sources,
                            "seq_length": args.seq,
                            "num_sentinels": args.sentinels,
                            "tokenizer": {"path": str(tok_dir)},
                            "cache_path": str(Path(tmp, "cache")),
                        }
                    },
                    [
                        "model.preset=tiny",
                        f"model.max_position_embeddings={args.seq}",
                        f"model.architecture={args.architecture}",
                        f"objective.kind={kind}",
                        "data.filters.dedup=false",
                    ],
                )
                plan = prepare_data(cfg, Path(tmp, kind))
                out = stream_samples(cfg, plan, args.samples)["samples"]
                raw = np.mean([x["tokens"] for x in out])
                loss = np.mean([x["loss_tokens"] for x in out])
                print(f"{kind:<16} {raw:>10.1f} {loss:>11.1f}   ({len(out)} windows)", flush=True)


if __name__ == "__main__":
    main()
