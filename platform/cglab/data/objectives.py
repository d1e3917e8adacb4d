"""Training objectives: packed windows in, contract samples out (fields and codes: cglab.data.contract).

Every objective maps windows from `cglab.data.packing` (`tokens`, `segment_ids`, int32[W, S_in]) to samples of
exactly `seq_len` tokens with `tokens, labels, loss_mask, segment_ids, prefix_end, objective`. All randomness comes
from one `np.random.Generator` per window (`sample_rng(seed, epoch, index)`), so a sample depends only on its
window and its seed, never on batch composition; a new epoch re-draws the corruption (lesson 5).

Layouts (one *unit* = one document piece in file-level mode, the whole window in sequence-level mode):

- clm:      `doc` unchanged; loss on every next-token target inside the same segment. Under
            model.architecture=prefix_lm (the paper's Prefix-LM), every document piece draws its own split: its
            prefix is bidirectional and carries no loss, the rest is causal with loss (`causal_lm`).
- span corruption (CodeGen2, objective 1):
            `x_0 <mask_1> x_1 <mask_2> … x_k <sep> <mask_1> s_1 <eom> … <mask_k> s_k <eom>`
            where the unit is x_0 s_1 x_1 … s_k x_k. The unit's final eot is never masked and stays in x_k, so
            a file-level unit reads like the released models' infill prompt
            `prefix <mask_1> suffix <|endoftext|> <sep> <mask_1> middle <eom>`. Loss on the part after `<sep>`.
            A unit with no span still gets its `<sep>` (and then no target). Every unit's corrupted input and
            its `<sep>` are that unit's prefix-LM prefix (see prefix_end below).
- infill (lesson 2, objective 2), per document:
            PSM `prefix <mask_1> suffix [eot] <sep> <mask_1> middle <eom>` (the CodeGen2 inference format);
            SPM `<mask_1> suffix [eot] <sep> prefix <mask_1> middle <eom>` (suffix first, so prefix and middle
            are contiguous). Loss on every token (FIM-style: left-to-right signal is kept on prefix and suffix,
            which is what "free lunch" is measured against); no prefix.
- ul2 (lesson 1 baseline): R and X denoisers are span corruption with their own ratio / span lengths
            (objective 3); S is a prefix LM (objective 4): split point uniform in the window, the window's first
            `split` tokens are the prefix, loss on the continuation only. No paradigm tokens (CodeGen2 uses no
            task tokens).

prefix_end (int32 per token, what a prefix-LM model attends with): query q may also see keys k < prefix_end[q]
besides the causal k <= q. A token of a unit with a prefix gets (its unit's start in the sample) + (that unit's
prefix length), so every document of a packed window has its own bidirectional prefix and never sees into a later
document; tokens without a prefix (clm under a causal
architecture, infill, padding) get 0. The S denoiser gives every valid token `split`.

Span placement, per unit of n maskable tokens (T5's random_spans_noise_mask rule, so every unit is masked at its
drawn ratio whatever its length):
- ratio r ~ U[min, max]; m = round(r n) tokens are masked;
- k = span_count(m, mean) = 0 if m == 0 else min(m, max(1, round(m / mean))), mean = (span_len_min + span_len_max) / 2;
- span lengths: k draws w_i uniform in [lo, hi] = [span_len_min, span_len_max], made to sum to exactly m: every span
  gets base = min(lo, m // k), the extra E = m - k base is shared in proportion to (w_i - lo + 1) (floored), and
  the leftover (< k) adds 1 to the first spans. Every span has >= 1 token (lengths may leave [lo, hi] when m / k
  does; the mean span is m / k ~ mean);
- the n - m unmasked tokens are split into k+1 gaps at sorted uniform cut points, with at least one token between
  spans when that fits.
So k grows with n: the sentinels needed at a sequence length are `cglab.config.spans_needed` (checked against
data.num_sentinels by the config and again here against the tokenizer), and the packer's reserve is linear in the
tokens (`packing_reserve`). Draws per window: one uniform per unit (its ratio), then 2 per span (the k length draws
and the k cut points of each unit in turn).

Every sample also carries `n_masked` (tokens hidden in spans) and `n_maskable` (the n of its units summed), int32;
0/0 when it corrupts nothing (clm, infill, ul2 S), so the realised mask fraction can be measured in training.

Implementation: every output row is a list of *pieces* (copy a range of the window, or one special token); all
pieces of all windows are turned into one gather index with a cumsum, so the per-token work is a handful of
vectorised passes and only the random draws loop over windows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cglab.config import Corruption, span_count, spans_needed
from cglab.data.contract import CLM, INFILL, SAMPLE_KEYS, SPAN, UL2, UL2_S
from cglab.data.packing import Reserve
from cglab.data.specials import EOM, MASK0, SEP, Specials

KINDS = ("clm", "span_corruption", "codegen2", "infill", "ul2")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for global sample `index` of `epoch` (contract: same triple, same sample)."""
    return np.random.default_rng([seed, epoch, index])


def packing_reserve(cfg) -> Reserve:
    """Room the packer must leave so every sample of this objective fits in seq_len without truncation, whichever
    part of its mix a window becomes: the bound `cglab plan` measures with and that sizes the sentinels.

    Span corruption adds 1 + 3k tokens to a unit of n raw tokens (`<sep>`, then `<mask_j>` in the input and
    `<mask_j>`, `<eom>` in the targets per span). With k = span_count(m, mean) <= m / mean + 1 and
    m = round(r n) <= rmax n + 1/2 that is at most c + f n with c = 4 + 1.5 / mean, f = 3 rmax / mean: a constant
    per unit (per document piece in file-level mode, per window in sequence-level mode) and a per-token fraction,
    the largest over the settings the objective runs. The stream packs each window with `window_reserve` instead.
    """
    if cfg.kind == "infill":
        return Reserve(per_doc=4)
    return _span_reserve(cfg.corrupting(), cfg.corruption == "file_level")


def _span_reserve(settings, file_level: bool) -> Reserve:
    if not settings:
        return Reserve()
    c = max(int(np.ceil(4 + 1.5 / s.mean_len)) for s in settings)
    f = max(3 * s.ratio[1] / s.mean_len for s in settings)
    return Reserve(per_doc=c, per_token=f) if file_level else Reserve(per_window=c, per_token=f)


def pick(cfg, u: np.ndarray) -> np.ndarray:
    """Which part of the objective's mix each window is, from its generator's first draw u: an index into
    `part_reserves(cfg)` (codegen2: 0 causal LM, 1 span corruption; infill: 0 infill, 1 causal LM; ul2: the
    denoiser's place in objective.ul2_denoisers; clm, span_corruption: 0)."""
    u = np.asarray(u, np.float64)
    if cfg.kind == "codegen2":
        return (u >= cfg.causal_prob).astype(np.int64)
    if cfg.kind == "infill":
        return (u >= cfg.infill_rate).astype(np.int64)
    if cfg.kind == "ul2":
        dens = tuple(cfg.ul2_denoisers)  # the config holds at least one with a positive prob
        edges = np.cumsum([d.prob for d in dens]) / sum(d.prob for d in dens)
        return np.minimum(np.searchsorted(edges, u, side="right"), len(dens) - 1)
    if cfg.kind in ("clm", "span_corruption"):
        return np.zeros(u.shape, np.int64)
    raise ValueError(f"objective.kind: unknown {cfg.kind!r}; choose one of {KINDS}")


def part_reserves(cfg) -> list[Reserve]:
    """The reserve of each part of the mix (`pick`'s index): what that part adds and nothing more.

    The first draw of a window's generator decides its part before packing (data/pipeline.py `pack_block`), so a
    window packs only the room its own part needs: UL2's R, X_long and S windows no longer carry X_dense's
    reserve, nor codegen2's causal half the span reserve.
    """
    file_level = cfg.corruption == "file_level"
    span = _span_reserve(cfg.corrupting(), file_level) if cfg.kind in ("codegen2", "span_corruption") else None
    if cfg.kind == "clm":
        return [Reserve()]
    if cfg.kind == "span_corruption":
        return [span]
    if cfg.kind == "codegen2":
        return [Reserve(), span]
    if cfg.kind == "infill":
        return [Reserve(per_doc=4), Reserve()]
    if cfg.kind == "ul2":
        return [
            Reserve()
            if d.kind == "prefix"
            else _span_reserve([Corruption(d.name, d.name, tuple(d.ratio), tuple(d.span_len))], file_level)
            for d in cfg.ul2_denoisers
        ]
    raise ValueError(f"objective.kind: unknown {cfg.kind!r}; choose one of {KINDS}")


# ---------------------------------------------------------------------------------------------- dispatch
def apply_objective(
    window_tokens: np.ndarray,
    window_segments: np.ndarray,
    cfg,
    specials: Specials,
    rng: np.random.Generator,
    seq_len: int,
    architecture: str = "causal",
) -> dict:
    """One window -> one sample dict (arrays of length seq_len, scalar objective)."""
    out = apply_objective_batch(
        np.asarray(window_tokens)[None], np.asarray(window_segments)[None], cfg, specials, [rng], seq_len, architecture
    )
    return {k: v[0] for k, v in out.items()}


def apply_objective_batch(
    tokens: np.ndarray,
    segments: np.ndarray,
    cfg,
    specials: Specials,
    rngs: Sequence[np.random.Generator],
    seq_len: int,
    architecture: str = "causal",
) -> dict[str, np.ndarray]:
    """Windows int32[W, S_in] -> batch dict; window w uses only rngs[w] (one draw picks the objective first).

    architecture: model.architecture. The objective config alone does not say what a causal-LM sample is: under
    prefix_lm it is the paper's Prefix-LM (`causal_lm(prefix=True)`), so the caller passes the model's choice."""
    if architecture not in ("causal", "prefix_lm"):
        raise ValueError(f"model.architecture: unknown {architecture!r}; choose causal or prefix_lm")
    tokens, segments = _check(tokens, segments, cfg, specials, rngs, seq_len)
    clm = lambda t, s, r: causal_lm(t, s, specials, seq_len, r, prefix=architecture == "prefix_lm")  # noqa: E731
    W = tokens.shape[0]
    u = np.array([rng.random() for rng in rngs]) if W else np.zeros(0)
    part = pick(cfg, u)
    kind, file_level = cfg.kind, cfg.corruption == "file_level"
    span = dict(
        ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max),
        span_len=(cfg.span_len_min, cfg.span_len_max),
        file_level=file_level,
    )
    if kind == "clm":
        groups = [(np.ones(W, bool), clm)]
    elif kind == "span_corruption":
        groups = [(np.ones(W, bool), lambda t, s, r: span_corruption(t, s, specials, r, seq_len, **span))]
    elif kind == "codegen2":
        groups = [
            (part == 0, clm),
            (part == 1, lambda t, s, r: span_corruption(t, s, specials, r, seq_len, **span)),
        ]
    elif kind == "infill":
        groups = [
            (part == 0, lambda t, s, r: infill(t, s, specials, r, seq_len, cfg.spm_prob)),
            (part == 1, clm),
        ]
    elif kind == "ul2":
        groups = []
        for i, d in enumerate(cfg.ul2_denoisers):
            if d.kind == "prefix":
                fn = lambda t, s, r: prefix_lm(t, s, specials, r, seq_len)  # noqa: E731
            else:
                fn = (
                    lambda d: (
                        lambda t, s, r: span_corruption(
                            t,
                            s,
                            specials,
                            r,
                            seq_len,
                            ratio=tuple(d.ratio),
                            span_len=tuple(d.span_len),
                            file_level=file_level,
                            objective=UL2,
                        )
                    )
                )(d)
            groups.append((part == i, fn))
    else:
        raise ValueError(f"objective.kind: unknown {kind!r}; choose one of {KINDS}")

    out = _empty(W, seq_len)
    for sel, fn in groups:
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            continue
        part = fn(tokens[idx], segments[idx], [rngs[i] for i in idx])
        for k in SAMPLE_KEYS:
            out[k][idx] = part[k]
    return out


# ---------------------------------------------------------------------------------------------- objectives
def causal_lm(
    tokens: np.ndarray, segments: np.ndarray, specials: Specials, seq_len: int, rngs=None, prefix: bool = False
) -> dict:
    """Next-token prediction over the packed documents (objective 0).

    prefix=False (model.architecture=causal): plain causal LM, no draws. prefix=True (model.architecture=prefix_lm,
    the CodeGen2 paper's Prefix-LM: "trained with next token prediction, where the loss for the non-causal part is
    masked"): every document piece of n tokens gets its own split p = 1 + floor(u (n - 1)), u ~ U[0, 1) from the
    window's generator (one draw per piece, in order), so p is uniform on [1, n - 1] as UL2's S-denoiser draws its
    split: every prefix length equally likely, and at least one target left with loss. The piece's first p tokens
    are its prefix: bidirectional among themselves (prefix_end = piece start + p) and never a target with loss,
    because a position that sees a later token would be trained on what it can read; the positions from the
    prefix's last token on see no future and carry the loss. A one-token piece gets p = 0 (nothing to split).
    """
    tok, seg = _fit(tokens, segments, specials, seq_len)
    if not prefix:
        return _finish(tok, seg, seg >= 0, np.zeros(tok.shape, np.int32), CLM, specials)
    base, n, win, _ = _units(tok, seg, file_level=True)
    u = _draws(rngs, np.bincount(win, minlength=len(rngs)), 1)[:, 0]
    p = np.where(n >= 2, 1 + (u * np.maximum(n - 1, 1)).astype(np.int64), 0)
    start = base - win * seq_len  # the piece's first position in its sample (clm inserts nothing)
    pos_in_piece = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    flat_p = np.repeat(p, n)
    at = np.repeat(base, n) + pos_in_piece  # every valid token's flat position
    flag = seg >= 0
    prefix_end = np.zeros(tok.shape, np.int64)
    flag.ravel()[at] = pos_in_piece >= flat_p
    prefix_end.ravel()[at] = np.where(flat_p > 0, np.repeat(start, n) + flat_p, 0)
    return _finish(tok, seg, flag, prefix_end, CLM, specials)


def prefix_lm(tokens: np.ndarray, segments: np.ndarray, specials: Specials, rngs, seq_len: int) -> dict:
    """UL2 S-denoiser (objective 4): split uniform in [1, valid-1]; bidirectional prefix, loss on the rest."""
    tok, seg = _fit(tokens, segments, specials, seq_len)
    valid = (seg >= 0).sum(1)
    u = np.array([r.random() for r in rngs])
    split = np.where(valid >= 2, 1 + (u * np.maximum(valid - 1, 1)).astype(np.int64), 0)
    flag = (np.arange(seq_len) >= split[:, None]) & (seg >= 0)
    # The prefix is bidirectional only inside each document: a token's prefix ends at the split or at the end of
    # its own document, whichever comes first, so no query sees a later document (document masking on or off).
    prefix_end = np.where(seg >= 0, np.minimum(split[:, None], _segment_ends(seg)), 0)
    return _finish(tok, seg, flag, prefix_end, UL2_S, specials)


def _segment_ends(seg: np.ndarray) -> np.ndarray:
    """int64[W, S]: one past the last position of each token's segment (segments are 0, 1, … then -1 padding)."""
    W, S = seg.shape
    key = np.where(seg >= 0, seg, S) + (np.arange(W) * (S + 1))[:, None]  # non-decreasing over the flattened rows
    flat = key.ravel()
    return np.searchsorted(flat, flat, side="right").reshape(W, S) - np.arange(W)[:, None] * S


def span_corruption(
    tokens: np.ndarray,
    segments: np.ndarray,
    specials: Specials,
    rngs,
    seq_len: int,
    *,
    ratio: tuple[float, float],
    span_len: tuple[int, int],
    file_level: bool = True,
    objective: int = SPAN,
) -> dict:
    """CodeGen2 span corruption of each window (layout and placement rule in the module docstring)."""
    need = spans_needed(ratio[1], span_len, seq_len)
    if need > len(specials.masks):  # the tokenizer may hold fewer sentinels than the config asked for
        raise ValueError(
            f"data.num_sentinels: the tokenizer has {len(specials.masks)} <mask_k> sentinels but a "
            f"unit can need {need} spans at data.seq_length={seq_len} (ratio up to {ratio[1]:g}, "
            f"spans {span_len[0]}-{span_len[1]})"
        )
    W = len(rngs)
    base, n_total, win, useg = _units(tokens, segments, file_level)
    n = n_total - (tokens.ravel()[base + n_total - 1] == specials.eot)  # the final eot is never masked
    m, k = _mask_counts(n, _draws(rngs, np.bincount(win, minlength=W), 1)[:, 0], ratio, span_len)
    d = _draws(rngs, np.bincount(win, weights=k, minlength=W).astype(np.int64), 2).ravel()
    unit, j, start, length = _place_spans(n, m, k, d, span_len)

    # Pieces, 5k + 2 per unit: [text, <mask_j>] per span, tail, <sep>, [<mask_j>, span_j, <eom>] per span.
    U = len(base)
    first = 5 * (np.cumsum(k) - k) + 2 * np.arange(U)  # each unit's first piece
    pieces = 5 * k + 2
    src = np.zeros(int(pieces.sum()), np.int64)
    ln = np.zeros_like(src)
    flag = np.zeros(src.size, bool)
    end = start + length
    prev_end = np.where(j > 0, np.roll(end, 1), 0)  # spans are flat in unit order: the previous one is its unit's
    last_end = np.zeros(U, np.int64)
    last_end[k > 0] = end[(np.cumsum(k) - 1)[k > 0]]  # each unit's last span (spans are in position order)
    sp0 = _specials_at(tokens, seq_len)
    mask = sp0 + MASK0 + j  # where <mask_j> sits in the source array
    q = first[unit] + 2 * j
    src[q], ln[q] = base[unit] + prev_end, start - prev_end
    src[q + 1], ln[q + 1] = mask, 1
    t = first + 2 * k
    src[t], ln[t] = base + last_end, n_total - last_end
    src[t + 1], ln[t + 1] = sp0 + SEP, 1
    q = t[unit] + 2 + 3 * j
    src[q], ln[q] = mask, 1
    src[q + 1], ln[q + 1] = base[unit] + start, length
    src[q + 2], ln[q + 2] = sp0 + EOM, 1
    flag[q] = flag[q + 1] = flag[q + 2] = True
    out_len = n_total + 1 + 3 * k
    first_input = n_total - m + k + 1  # corrupted input + <sep>: the prefix-LM prefix
    out = _assemble(
        tokens, specials, seq_len, src, ln, flag, useg, win, out_len, first_input, objective, unit_pieces=pieces
    )
    out["n_masked"] = np.bincount(win, weights=m, minlength=W).astype(np.int32)
    out["n_maskable"] = np.bincount(win, weights=n, minlength=W).astype(np.int32)
    return out


def infill(tokens: np.ndarray, segments: np.ndarray, specials: Specials, rngs, seq_len: int, spm_prob: float) -> dict:
    """FIM every document piece of the window, PSM or SPM (prob spm_prob) each; objective 2."""
    base, n_total, win, useg = _units(tokens, segments, file_level=True)
    n = n_total - (tokens.ravel()[base + n_total - 1] == specials.eot)
    d = _draws(rngs, np.bincount(win, minlength=len(rngs)), 3)
    spm = d[:, 0] < spm_prob
    cut = np.minimum((d[:, 1:] * (n + 1)[:, None]).astype(np.int64), n[:, None])
    a, b = cut.min(1), cut.max(1)  # middle = [a, b), may be empty
    U = len(base)
    sp0 = _specials_at(tokens, seq_len)
    mask1, sep, eom = sp0 + MASK0, sp0 + SEP, sp0 + EOM
    # [prefix if PSM][<mask_1>][suffix+eot][<sep>][prefix if SPM][<mask_1>][middle][<eom>]
    src = np.stack(
        [base, np.full(U, mask1), base + b, np.full(U, sep), base, np.full(U, mask1), base + a, np.full(U, eom)], 1
    )
    ln = np.stack(
        [
            a * ~spm,
            np.ones(U, np.int64),
            n_total - b,
            np.ones(U, np.int64),
            a * spm,
            np.ones(U, np.int64),
            b - a,
            np.ones(U, np.int64),
        ],
        1,
    )
    flag = np.ones_like(ln, bool)
    return _assemble(tokens, specials, seq_len, src, ln, flag, useg, win, n_total + 4, np.zeros(U, np.int64), INFILL)


# ---------------------------------------------------------------------------------------------- helpers
def _mask_counts(n: np.ndarray, u: np.ndarray, ratio, span_len) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: masked tokens m = round(r n), r = rmin + u (rmax - rmin), and the span count k = span_count(m)."""
    (rmin, rmax), (lo, hi) = ratio, span_len
    r = np.minimum(rmin + u * (rmax - rmin), rmax)  # float rounding must not lift r past what sized the sentinels
    m = np.rint(r * n).astype(np.int64)
    return m, span_count(m, (lo + hi) / 2)


def _place_spans(n: np.ndarray, m: np.ndarray, k: np.ndarray, d: np.ndarray, span_len):
    """All spans, flat in unit then position order: (unit, rank j in its unit, start, length), int64[sum k].

    d: 2 sum(k) uniforms, per unit its k length draws then its k cut points. Lengths sum to exactly m per unit.
    """
    lo, hi = span_len
    U = n.size
    first = np.cumsum(k) - k
    unit = np.repeat(np.arange(U), k)
    j = np.arange(unit.size) - first[unit]
    at = 2 * first[unit] + j
    w = lo + np.minimum((d[at] * (hi - lo + 1)).astype(np.int64), hi - lo)
    # base each, the extra shared by weight w - lo + 1 (floored), the leftover (< k) one each to the first spans
    base_len = np.minimum(lo, m // np.maximum(k, 1))
    extra = m - k * base_len
    wt = w - lo + 1
    wsum = np.rint(np.bincount(unit, weights=wt, minlength=U)).astype(np.int64)
    share = extra[unit] * wt // np.maximum(wsum, 1)[unit]
    left = extra - np.rint(np.bincount(unit, weights=share, minlength=U)).astype(np.int64)
    length = base_len[unit] + share + (j < left[unit])
    gap = (n - m - (k - 1) >= 0).astype(np.int64)  # one unmasked token between spans when it fits
    room = n - m - gap * np.maximum(k - 1, 0)
    cut = np.minimum((d[at + k[unit]] * (room + 1)[unit]).astype(np.int64), room[unit])
    stride = int(room.max(initial=0)) + 1
    cut = np.sort(unit * stride + cut) - unit * stride  # sorted within each unit (units stay in order)
    before = np.cumsum(length) - length
    start = cut + before - before[first[unit]] + gap[unit] * j
    return unit, j, start, length


def _units(tokens: np.ndarray, segments: np.ndarray, file_level: bool):
    """(flat start, length, window, output segment id) of every unit, in window then segment order."""
    W, S_in = segments.shape
    valid = segments >= 0
    if file_level:
        first = valid.copy()
        first[:, 1:] &= segments[:, 1:] != segments[:, :-1]
        last = valid.copy()
        last[:, :-1] &= segments[:, :-1] != segments[:, 1:]
        base = np.flatnonzero(first)
        n_total = np.flatnonzero(last) + 1 - base
        win = base // S_in
        useg = segments.ravel()[base].astype(np.int64)
    else:
        vlen = valid.sum(1)
        win = np.flatnonzero(vlen > 0)
        base, n_total, useg = win * S_in, vlen[win].astype(np.int64), np.zeros(win.size, np.int64)
    return base.astype(np.int64), n_total.astype(np.int64), win, useg


def _draws(rngs, units_per_window: np.ndarray, per_unit: int) -> np.ndarray:
    """Uniforms [U, per_unit]: window w draws its units' rows from rngs[w] alone, in one call."""
    parts = [r.random(int(c) * per_unit) for r, c in zip(rngs, units_per_window)]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    return flat.reshape(-1, per_unit)


def _assemble(
    tokens, specials, seq_len, src, ln, flag, useg, win, unit_len, unit_prefix, objective, unit_pieces=None
) -> dict:
    """Pieces [U, C] (source offset, length, loss flag) of units in order -> padded [W, S] sample batch.

    With unit_pieces[U] the pieces are flat instead, unit u holding the next unit_pieces[u] of them (span
    corruption: 5k + 2 for k spans).

    The source is [window tokens | S-1 pads | specials table]; one pad piece (S pads at most) closes each window.
    unit_prefix[U]: each unit's prefix-LM prefix length (0: none); every token of a unit with a prefix gets
    prefix_end = its unit's start in the sample + that length, so each document is a prefix LM of its own.
    """
    W = tokens.shape[0]
    S = seq_len
    out_len = np.bincount(win, weights=unit_len, minlength=W).astype(np.int64)
    if (out_len > S).any():
        w = int(np.argmax(out_len > S))
        raise ValueError(
            f"window {w} needs {out_len[w]} tokens > data.seq_length={S}: it was packed without "
            f"the objective's reserve (use objectives.packing_reserve(cfg) for the Packer)"
        )
    C = np.full(len(useg), ln.shape[1]) if unit_pieces is None else np.asarray(unit_pieces, np.int64)
    # insert each window's pad piece after its last unit
    at = np.rint(np.cumsum(np.bincount(win, weights=C, minlength=W))).astype(np.int64)
    src = np.insert(src.ravel(), at, tokens.size)
    ln = np.insert(ln.ravel(), at, S - out_len)
    seg = np.insert(np.repeat(useg, C), at, -1)
    flag = np.insert(np.ascontiguousarray(flag).ravel(), at, False)
    unit_len = np.asarray(unit_len, np.int64)
    unit_start = np.cumsum(unit_len) - unit_len - (np.cumsum(out_len) - out_len)[win]  # units are in window order
    unit_end = np.where(np.asarray(unit_prefix) > 0, unit_start + unit_prefix, 0)
    pre = np.insert(np.repeat(unit_end, C), at, 0)  # the pad piece has no prefix
    keep = ln > 0
    src, ln, seg, flag, pre = src[keep], ln[keep], seg[keep], flag[keep], pre[keep]
    # gather index: +1 inside a piece, a jump to the next piece's source at each piece start.
    pos = np.cumsum(ln) - ln
    step = np.ones(W * S, np.int64)
    step[pos[1:]] = src[1:] - (src[:-1] + ln[:-1] - 1)
    step[0] = src[0]
    source = np.concatenate(
        [tokens.ravel().astype(np.int32, copy=False), np.full(S - 1, specials.pad, np.int32), specials.table()]
    )
    tok = source[np.cumsum(step)].reshape(W, S)
    seg_t = np.repeat(seg.astype(np.int32), ln).reshape(W, S)
    flag_t = np.repeat(flag, ln).reshape(W, S)
    pre_t = np.repeat(pre.astype(np.int32), ln).reshape(W, S)
    return _finish(tok, seg_t, flag_t, pre_t, objective, specials)


def _specials_at(tokens: np.ndarray, seq_len: int) -> int:
    """Source offset of Specials.table() in _assemble's source array."""
    return tokens.size + seq_len - 1


def _fit(tokens: np.ndarray, segments: np.ndarray, specials: Specials, seq_len: int):
    """Windows of any width -> [W, seq_len] (pad / -1 beyond the content)."""
    W, S_in = tokens.shape
    if S_in >= seq_len:
        if (segments[:, seq_len:] >= 0).any():
            raise ValueError(f"window content is longer than data.seq_length={seq_len}")
        return tokens[:, :seq_len].astype(np.int32), segments[:, :seq_len].astype(np.int32)
    tok = np.full((W, seq_len), specials.pad, np.int32)
    seg = np.full((W, seq_len), -1, np.int32)
    tok[:, :S_in], seg[:, :S_in] = tokens, segments
    return tok, seg


def _finish(tok, seg, flag, prefix_end, objective, specials) -> dict:
    """labels[i] = tok[i+1] and loss where i+1 is a flagged token of the same segment (never padding)."""
    W, S = tok.shape
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    labels = np.full((W, S), specials.pad, np.int32)
    labels[:, :-1] = np.where(same, tok[:, 1:], np.int32(specials.pad))
    loss = np.zeros((W, S), np.float32)
    loss[:, :-1] = same & flag[:, 1:]
    return dict(
        tokens=tok.astype(np.int32, copy=False),
        labels=labels,
        loss_mask=loss,
        segment_ids=seg.astype(np.int32, copy=False),
        prefix_end=prefix_end.astype(np.int32),
        objective=np.full(W, objective, np.int8),
        n_masked=np.zeros(W, np.int32),
        n_maskable=np.zeros(W, np.int32),
    )


def _empty(W: int, S: int) -> dict:
    return dict(
        tokens=np.zeros((W, S), np.int32),
        labels=np.zeros((W, S), np.int32),
        loss_mask=np.zeros((W, S), np.float32),
        segment_ids=np.full((W, S), -1, np.int32),
        prefix_end=np.zeros((W, S), np.int32),
        objective=np.zeros(W, np.int8),
        n_masked=np.zeros(W, np.int32),
        n_maskable=np.zeros(W, np.int32),
    )


def _check(tokens, segments, cfg, specials, rngs, seq_len):
    tokens, segments = np.asarray(tokens), np.asarray(segments)
    if tokens.ndim != 2 or tokens.shape != segments.shape:
        raise ValueError(f"windows: tokens {tokens.shape} and segment_ids {segments.shape} must be equal [W, S]")
    if len(rngs) != tokens.shape[0]:
        raise ValueError(f"windows: {tokens.shape[0]} windows but {len(rngs)} generators")
    valid = segments >= 0
    if tokens.shape[1] and tokens.shape[0]:
        step = np.diff(segments, axis=1)
        ok = (
            (valid[:, 1:] <= valid[:, :-1]).all()
            and (segments[:, 0] <= 0).all()
            and ((step >= 0) & (step <= 1) | ~valid[:, 1:]).all()
        )
        if not ok:
            raise ValueError("windows: segment_ids must be 0,1,2,… non-decreasing from position 0, then -1")
    return tokens.astype(np.int32, copy=False), segments.astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------- decoding
def reconstruct(tokens: np.ndarray, segment_ids: np.ndarray, specials: Specials) -> list[np.ndarray]:
    """Undo span corruption / infill: the original token run of every segment, in order.

    File-level samples give one array per document piece; sequence-level span corruption gives one array for the
    whole window. Assumes documents hold no `<sep>`/`<mask_k>`/`<eom>` (the tokenizer never emits them from text).
    """
    tokens, segment_ids = np.asarray(tokens), np.asarray(segment_ids)
    out = []
    for s in range(int(segment_ids.max(initial=-1)) + 1):
        out.append(_decode_unit(tokens[segment_ids == s], specials))
    return out


def _decode_unit(unit: np.ndarray, sp: Specials) -> np.ndarray:
    seps = np.flatnonzero(unit == sp.sep)
    if seps.size == 0:
        return unit.copy()
    inp, tgt = unit[: seps[0]], unit[seps[0] + 1 :]
    lead, fills = [], {}
    for chunk in np.split(tgt, np.flatnonzero(tgt == sp.eom) + 1):
        if chunk.size == 0:
            continue
        if chunk[-1] != sp.eom:
            raise ValueError("reconstruct: target chunk does not end with <eom>")
        q = int(np.flatnonzero(np.isin(chunk, sp.masks))[0])
        lead.append(chunk[:q])  # SPM puts the prefix before its <mask_1>
        fills[int(chunk[q])] = chunk[q + 1 : -1]
    parts = list(lead)
    holes = np.flatnonzero(np.isin(inp, sp.masks))
    prev = 0
    for h in holes:
        parts += [inp[prev:h], fills[int(inp[h])]]
        prev = h + 1
    parts.append(inp[prev:])
    return np.concatenate(parts) if parts else inp[:0]


# ---------------------------------------------------------------------------------------------- reference
def span_corruption_reference(
    tokens: list[list[int]],
    segments: list[list[int]],
    specials: Specials,
    rngs,
    seq_len: int,
    *,
    ratio: tuple[float, float],
    span_len: tuple[int, int],
) -> list[list[int]]:
    """File-level span corruption in plain Python loops, same draws as `span_corruption`.

    The oracle for tests (identical tokens) and the baseline in benchmarks/bench_objectives.py; it spells the
    span-count rule out again instead of calling span_count, so the two are checked against each other.
    """
    (rmin, rmax), (lo, hi) = ratio, span_len
    mean = (lo + hi) / 2
    out = []
    for row, segrow, rng in zip(tokens, segments, rngs):
        docs: list[list[int]] = []
        last = -1
        for t, s in zip(row, segrow):
            if s < 0:
                break
            if s != last:
                docs.append([])
                last = s
            docs[-1].append(t)
        ratios = rng.random(len(docs)).tolist()
        ns, ms, ks = [], [], []
        for doc, u in zip(docs, ratios):
            n = len(doc) - (doc[-1] == specials.eot)
            m = round(min(rmin + u * (rmax - rmin), rmax) * n)
            ns.append(n)
            ms.append(m)
            ks.append(0 if m == 0 else min(m, max(1, round(m / mean))))
        flat = rng.random(2 * sum(ks)).tolist()
        sample: list[int] = []
        for di, doc in enumerate(docs):
            n, total, k = ns[di], ms[di], ks[di]
            d = flat[2 * sum(ks[:di]) : 2 * sum(ks[: di + 1])]
            weights = [lo + min(int(x * (hi - lo + 1)), hi - lo) - lo + 1 for x in d[:k]]
            base = min(lo, total // k) if k else 0
            extra = total - k * base
            shares = [extra * w // sum(weights) for w in weights]
            left = extra - sum(shares)
            lengths = [base + sh + (1 if j < left else 0) for j, sh in enumerate(shares)]
            gap = 1 if n - total - (k - 1) >= 0 else 0
            room = n - total - gap * max(k - 1, 0)
            cuts = sorted(min(int(d[k + j] * (room + 1)), room) for j in range(k))
            starts, before = [], 0
            for j in range(k):
                starts.append(cuts[j] + before + gap * j)
                before += lengths[j]
            pos = 0
            for j in range(k):
                sample += doc[pos : starts[j]]
                sample.append(specials.masks[j])
                pos = starts[j] + lengths[j]
            sample += doc[pos:]
            sample.append(specials.sep)
            for j in range(k):
                sample.append(specials.masks[j])
                sample += doc[starts[j] : starts[j] + lengths[j]]
                sample.append(specials.eom)
        if len(sample) > seq_len:
            raise ValueError("reference: window overflows seq_len")
        out.append(sample + [specials.pad] * (seq_len - len(sample)))
    return out
