"""Evaluation: HumanEval pass@k, HumanEval-Infill, held-out perplexity / bits-per-byte and LAMBADA-style accuracy,
with generated code executed only in `cglab.eval.sandbox`. See README.md in this folder."""
