"""The data contract: what a training sample holds, which objective made it, and the special tokens.

The objectives (data/objectives.py) write samples, the pipeline (data/pipeline.py) streams them, the feed
(train/feed.py) moves them to the model-parallel peers and the step (train/step.py) splits the loss by objective;
the tokenizer (data/tokenizer.py) guarantees the special tokens and the evaluations build the infill prompt from
them. Each of those imports the names below, so a new field, objective or special token is added here once. This
module imports nothing of cglab, so every package from `data` up can import it.

A sample, one row of `seq_len` tokens:

    tokens        int32[S]   the input ids
    labels        int32[S]   the next-token targets (`<pad>` where there is no target)
    loss_mask     float32[S] 1 where the label is trained on
    segment_ids   int32[S]   0, 1, 2, … per document piece, -1 on padding
    prefix_end    int32[S]   a query may also see keys before it (prefix LM); 0 where there is no prefix
    objective     int8       the objective code that made the sample (OBJECTIVES[code] names it)
    n_masked      int32      tokens hidden in spans, and the maskable tokens of the sample's units:
    n_maskable    int32      the realised mask fraction (0/0 when nothing is corrupted)
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- sample fields
PER_TOKEN = ("tokens", "labels", "loss_mask", "segment_ids", "prefix_end")  # one value per token
PER_SAMPLE = ("objective",)  # one value per sample
FIELDS = PER_TOKEN + PER_SAMPLE  # what the model trains on
COUNTS = ("n_masked", "n_maskable")  # per sample, what training measures the mask fraction with
SAMPLE_KEYS = FIELDS + COUNTS
FLOAT_FIELDS = ("loss_mask",)  # every other field is an integer

# ---------------------------------------------------------------------------------------------- objectives
# The `objective` code of a sample; OBJECTIVES[code] is its name in metrics (`loss/<name>`, `mask_fraction/<name>`).
CLM, SPAN, INFILL, UL2, UL2_S = 0, 1, 2, 3, 4
OBJECTIVES = ("clm", "span", "infill", "ul2", "ul2_s")

# ---------------------------------------------------------------------------------------------- special tokens
# CodeGen2's: every cglab tokenizer carries them (data/tokenizer.py); data/specials.py holds their ids.
EOT, PAD, SEP, EOM = "<|endoftext|>", "<pad>", "<sep>", "<eom>"


def mask_token(i: int) -> str:
    """<mask_1> is the first sentinel (1-based, as in CodeGen2's released tokenizer)."""
    return f"<mask_{i}>"


MASK = mask_token(1)  # the infill prompt's sentinel


def special_tokens(num_sentinels: int) -> list[str]:
    """Every special token, in the order the tokenizer adds them: eot, pad, sep, eom, <mask_1>…<mask_N>."""
    return [EOT, PAD, SEP, EOM] + [mask_token(i) for i in range(1, num_sentinels + 1)]


def infill_prompt(prefix, suffix, mask=MASK, eot=EOT, sep=SEP):
    """The CodeGen2 infill prompt `prefix <mask_1> suffix <|endoftext|> <sep> <mask_1>`; the model answers with
    the middle and `<eom>`. Text by default; given id lists and the specials as one-id lists, the prompt's ids."""
    return prefix + mask + suffix + eot + sep + mask
