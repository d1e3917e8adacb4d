"""Training objectives: packed windows in, contract samples out (notes/data_contract.md).

Every objective maps windows from `cglab.data.packing` (`tokens`, `segment_ids`, int32[W, S_in]) to samples of
exactly `seq_len` tokens with `tokens, labels, loss_mask, segment_ids, prefix_len, objective`. All randomness comes
from one `np.random.Generator` per window (`sample_rng(seed, epoch, index)`), so a sample depends only on its
window and its seed, never on batch composition; a new epoch re-draws the corruption (lesson 5).

Layouts (one *unit* = one document piece in file-level mode, the whole window in sequence-level mode):

- clm:      `doc` unchanged; loss on every next-token target inside the same segment.
- span corruption (CodeGen2, objective 1):
            `x_0 <mask_1> x_1 <mask_2> … x_k <sep> <mask_1> s_1 <eom> … <mask_k> s_k <eom>`
            where the unit is x_0 s_1 x_1 … s_k x_k. The unit's final eot is never masked and stays in x_k, so
            a file-level unit reads like the released models' infill prompt
            `prefix <mask_1> suffix <|endoftext|> <sep> <mask_1> middle <eom>`. Loss on the part after `<sep>`.
            A unit with no span still gets its `<sep>` (and then no target).
- infill (lesson 2, objective 2), per document:
            PSM `prefix <mask_1> suffix [eot] <sep> <mask_1> middle <eom>` (the CodeGen2 inference format);
            SPM `<mask_1> suffix [eot] <sep> prefix <mask_1> middle <eom>` (suffix first, so prefix and middle
            are contiguous). Loss on every token (FIM-style: left-to-right signal is kept on prefix and suffix,
            which is what "free lunch" is measured against); prefix_len 0.
- ul2 (lesson 1 baseline): R and X denoisers are span corruption with their own ratio / span lengths
            (objective 3); S is a prefix LM (objective 4): split point uniform in the window, prefix_len = split,
            loss on the continuation only. No paradigm tokens (CodeGen2 uses no task tokens).

Span placement, per unit of n maskable tokens: ratio r ~ U[min, max]; target m = round(r n); span lengths are drawn
uniform in [span_len_min, span_len_max] and taken in order until they sum to m, the last one cut short so the total
is exactly m ("as closely as integer lengths allow"). At most `max_spans` spans: when max_spans * span_len_max < m
the unit is masked less than its ratio (raise objective.max_spans / data.num_sentinels for long sequences). The
unmasked tokens are split into k+1 gaps at sorted uniform cut points, with at least one token between spans.

Implementation: every output row is a list of *pieces* (copy a range of the window, or one special token); all
pieces of all windows are turned into one gather index with a cumsum, so the per-token work is a handful of
vectorised passes and only the random draws loop over windows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cglab.data.packing import Reserve
from cglab.data.specials import EOM, MASK0, SEP, Specials

CLM, SPAN, INFILL, UL2, UL2_S = 0, 1, 2, 3, 4
KINDS = ("clm", "span_corruption", "codegen2", "infill", "ul2")
FIELDS = ("tokens", "labels", "loss_mask", "segment_ids", "prefix_len", "objective")


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser. kind "span" is span corruption with these ranges; kind "prefix" is the S denoiser."""

    name: str
    prob: float
    kind: str = "span"
    ratio: tuple[float, float] = (0.15, 0.15)
    span_len: tuple[int, int] = (2, 4)


# UL2's R (mean span 3, 15%), X (dense: 50%; long: spans ~32) and S, without paradigm tokens.
# Override with a list of dicts in `objective.ul2_denoisers` (read with getattr; not a config field yet).
UL2_DENOISERS = (
    Denoiser("R", 0.3, "span", (0.15, 0.15), (2, 4)),
    Denoiser("X_dense", 0.2, "span", (0.5, 0.5), (2, 4)),
    Denoiser("X_long", 0.2, "span", (0.15, 0.15), (24, 40)),
    Denoiser("S", 0.3, "prefix"),
)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for global sample `index` of `epoch` (contract: same triple, same sample)."""
    return np.random.default_rng([seed, epoch, index])


def ul2_denoisers(cfg) -> tuple[Denoiser, ...]:
    raw = getattr(cfg, "ul2_denoisers", None)
    dens = UL2_DENOISERS if raw is None else tuple(
        d if isinstance(d, Denoiser) else Denoiser(**{k: tuple(v) if isinstance(v, list) else v
                                                      for k, v in d.items()}) for d in raw)
    total = sum(d.prob for d in dens)
    if not dens or total <= 0:
        raise ValueError("objective.ul2_denoisers: need at least one denoiser with positive prob")
    return dens


def packing_reserve(cfg) -> Reserve:
    """Room the packer must leave so every sample of this objective fits in seq_len without truncation."""
    span = 1 + 3 * cfg.max_spans  # <sep> + (<mask_k> in input, <mask_k> and <eom> in targets) per span
    if cfg.kind == "clm":
        return Reserve()
    if cfg.kind == "infill":
        return Reserve(per_doc=4)
    if cfg.corruption == "file_level":
        return Reserve(per_doc=span)
    return Reserve(per_window=span)


# ---------------------------------------------------------------------------------------------- dispatch
def apply_objective(window_tokens: np.ndarray, window_segments: np.ndarray, cfg, specials: Specials,
                    rng: np.random.Generator, seq_len: int) -> dict:
    """One window -> one sample dict (arrays of length seq_len, scalar prefix_len and objective)."""
    out = apply_objective_batch(np.asarray(window_tokens)[None], np.asarray(window_segments)[None], cfg,
                                specials, [rng], seq_len)
    return {k: v[0] for k, v in out.items()}


def apply_objective_batch(tokens: np.ndarray, segments: np.ndarray, cfg, specials: Specials,
                          rngs: Sequence[np.random.Generator], seq_len: int) -> dict[str, np.ndarray]:
    """Windows int32[W, S_in] -> batch dict; window w uses only rngs[w] (one draw picks the objective first)."""
    tokens, segments = _check(tokens, segments, cfg, specials, rngs, seq_len)
    W = tokens.shape[0]
    u = np.array([rng.random() for rng in rngs]) if W else np.zeros(0)
    kind, file_level = cfg.kind, cfg.corruption == "file_level"
    span = dict(ratio=(cfg.mask_ratio_min, cfg.mask_ratio_max), span_len=(cfg.span_len_min, cfg.span_len_max),
                max_spans=cfg.max_spans, file_level=file_level)
    if kind == "clm":
        groups = [(np.ones(W, bool), lambda t, s, r: causal_lm(t, s, specials, seq_len))]
    elif kind == "span_corruption":
        groups = [(np.ones(W, bool), lambda t, s, r: span_corruption(t, s, specials, r, seq_len, **span))]
    elif kind == "codegen2":
        groups = [(u < cfg.causal_prob, lambda t, s, r: causal_lm(t, s, specials, seq_len)),
                  (u >= cfg.causal_prob, lambda t, s, r: span_corruption(t, s, specials, r, seq_len, **span))]
    elif kind == "infill":
        groups = [(u < cfg.infill_rate, lambda t, s, r: infill(t, s, specials, r, seq_len, cfg.spm_prob)),
                  (u >= cfg.infill_rate, lambda t, s, r: causal_lm(t, s, specials, seq_len))]
    elif kind == "ul2":
        dens = ul2_denoisers(cfg)
        edges = np.cumsum([d.prob for d in dens]) / sum(d.prob for d in dens)
        pick = np.minimum(np.searchsorted(edges, u, side="right"), len(dens) - 1)
        groups = []
        for i, d in enumerate(dens):
            if d.kind == "prefix":
                fn = lambda t, s, r: prefix_lm(t, s, specials, r, seq_len)  # noqa: E731
            else:
                fn = (lambda d: lambda t, s, r: span_corruption(
                    t, s, specials, r, seq_len, ratio=d.ratio, span_len=d.span_len, max_spans=cfg.max_spans,
                    file_level=file_level, objective=UL2))(d)
            groups.append((pick == i, fn))
    else:
        raise ValueError(f"objective.kind: unknown {kind!r}; choose one of {KINDS}")

    out = _empty(W, seq_len)
    for sel, fn in groups:
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            continue
        part = fn(tokens[idx], segments[idx], [rngs[i] for i in idx])
        for k in FIELDS:
            out[k][idx] = part[k]
    return out


# ---------------------------------------------------------------------------------------------- objectives
def causal_lm(tokens: np.ndarray, segments: np.ndarray, specials: Specials, seq_len: int) -> dict:
    """Plain next-token prediction over the packed documents (objective 0)."""
    tok, seg = _fit(tokens, segments, specials, seq_len)
    return _finish(tok, seg, seg >= 0, np.zeros(len(tok), np.int32), CLM, specials)


def prefix_lm(tokens: np.ndarray, segments: np.ndarray, specials: Specials, rngs, seq_len: int) -> dict:
    """UL2 S-denoiser (objective 4): split uniform in [1, valid-1]; bidirectional prefix, loss on the rest."""
    tok, seg = _fit(tokens, segments, specials, seq_len)
    valid = (seg >= 0).sum(1)
    u = np.array([r.random() for r in rngs])
    split = np.where(valid >= 2, 1 + (u * np.maximum(valid - 1, 1)).astype(np.int64), 0)
    flag = (np.arange(seq_len) >= split[:, None]) & (seg >= 0)
    return _finish(tok, seg, flag, split.astype(np.int32), UL2_S, specials)


def span_corruption(tokens: np.ndarray, segments: np.ndarray, specials: Specials, rngs, seq_len: int, *,
                    ratio: tuple[float, float], span_len: tuple[int, int], max_spans: int,
                    file_level: bool = True, objective: int = SPAN) -> dict:
    """CodeGen2 span corruption of each window (layout and placement rule in the module docstring)."""
    K = max_spans
    if K > len(specials.masks):
        raise ValueError(f"objective.max_spans: {K} spans need {K} sentinels, the tokenizer has "
                         f"{len(specials.masks)} (data.num_sentinels)")
    base, n_total, win, useg = _units(tokens, segments, file_level)
    n = n_total - (tokens.ravel()[base + n_total - 1] == specials.eot)  # the final eot is never masked
    d = _draws(rngs, np.bincount(win, minlength=len(rngs)), 1 + 2 * K)
    start, length = _place_spans(n, d, ratio, span_len, K)
    k = (length > 0).sum(1)
    masked = length.sum(1)

    U, cols = len(base), 5 * K + 2
    src = np.empty((U, cols), np.int64)
    ln = np.empty((U, cols), np.int64)
    end = start + length
    prev_end = np.concatenate([np.zeros((U, 1), np.int64), end[:, :-1]], 1)
    active = length > 0
    sp0 = _specials_at(tokens, seq_len)
    off = sp0 + MASK0 + np.arange(K)  # where <mask_j> sits in the source array
    src[:, 0:2 * K:2], ln[:, 0:2 * K:2] = base[:, None] + prev_end, start - prev_end
    src[:, 1:2 * K:2], ln[:, 1:2 * K:2] = off, active
    src[:, 2 * K], ln[:, 2 * K] = base + end[:, -1], n_total - end[:, -1]
    src[:, 2 * K + 1], ln[:, 2 * K + 1] = sp0 + SEP, 1
    src[:, 2 * K + 2::3], ln[:, 2 * K + 2::3] = off, active
    src[:, 2 * K + 3::3], ln[:, 2 * K + 3::3] = base[:, None] + start, length
    src[:, 2 * K + 4::3], ln[:, 2 * K + 4::3] = sp0 + EOM, active
    flag = np.zeros(cols, bool)
    flag[2 * K + 2:] = True
    out_len = n_total + 1 + 3 * k
    first_input = n_total - masked + k + 1  # corrupted input + <sep>: the prefix-LM prefix
    return _assemble(tokens, specials, seq_len, src, ln, np.broadcast_to(flag, (U, cols)), useg, win, out_len,
                     _first_per_window(win, first_input, len(rngs)), objective)


def infill(tokens: np.ndarray, segments: np.ndarray, specials: Specials, rngs, seq_len: int,
           spm_prob: float) -> dict:
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
    src = np.stack([base, np.full(U, mask1), base + b, np.full(U, sep), base, np.full(U, mask1), base + a,
                    np.full(U, eom)], 1)
    ln = np.stack([a * ~spm, np.ones(U, np.int64), n_total - b, np.ones(U, np.int64), a * spm,
                   np.ones(U, np.int64), b - a, np.ones(U, np.int64)], 1)
    flag = np.ones_like(ln, bool)
    return _assemble(tokens, specials, seq_len, src, ln, flag, useg, win, n_total + 4,
                     np.zeros(len(rngs), np.int64), INFILL)


# ---------------------------------------------------------------------------------------------- helpers
def _place_spans(n: np.ndarray, d: np.ndarray, ratio, span_len, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Span starts and lengths int64[U, K] (inactive slots: start n, length 0) from uniforms d[U, 1+2K]."""
    (rmin, rmax), (lo, hi) = ratio, span_len
    m = np.rint((rmin + d[:, 0] * (rmax - rmin)) * n).astype(np.int64)
    draw = lo + np.minimum((d[:, 1:K + 1] * (hi - lo + 1)).astype(np.int64), hi - lo)
    before = np.cumsum(draw, 1) - draw
    length = np.clip(m[:, None] - before, 0, draw)
    k = (length > 0).sum(1)
    masked = length.sum(1)
    gap = (n - masked - (k - 1) >= 0).astype(np.int64)  # one unmasked token between spans when it fits
    room = n - masked - gap * np.maximum(k - 1, 0)
    cut = np.minimum((d[:, K + 1:] * (room + 1)[:, None]).astype(np.int64), room[:, None])
    active = np.arange(K) < k[:, None]
    cut = np.sort(np.where(active, cut, np.iinfo(np.int64).max), 1)
    start = np.where(active, cut + (np.cumsum(length, 1) - length) + gap[:, None] * np.arange(K), n[:, None])
    return start, length


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


def _first_per_window(win: np.ndarray, value: np.ndarray, W: int) -> np.ndarray:
    out = np.zeros(W, np.int64)
    first = np.ones(win.size, bool)
    first[1:] = win[1:] != win[:-1]
    out[win[first]] = value[first]
    return out


def _assemble(tokens, specials, seq_len, src, ln, flag, useg, win, unit_len, prefix_len, objective) -> dict:
    """Pieces [U, C] (source offset, length, loss flag) of units in order -> padded [W, S] sample batch.

    The source is [window tokens | S-1 pads | specials table]; one pad piece (S pads at most) closes each window.
    """
    W = tokens.shape[0]
    S = seq_len
    out_len = np.bincount(win, weights=unit_len, minlength=W).astype(np.int64)
    if (out_len > S).any():
        w = int(np.argmax(out_len > S))
        raise ValueError(f"window {w} needs {out_len[w]} tokens > data.seq_length={S}: it was packed without "
                         f"the objective's reserve (use objectives.packing_reserve(cfg) for the Packer)")
    U, C = ln.shape
    at = np.cumsum(np.bincount(win, minlength=W)) * C  # insert each window's pad piece after its last unit
    src = np.insert(src.ravel(), at, tokens.size)
    ln = np.insert(ln.ravel(), at, S - out_len)
    seg = np.insert(np.repeat(useg, C), at, -1)
    flag = np.insert(np.ascontiguousarray(flag).ravel(), at, False)
    keep = ln > 0
    src, ln, seg, flag = src[keep], ln[keep], seg[keep], flag[keep]
    # gather index: +1 inside a piece, a jump to the next piece's source at each piece start.
    pos = np.cumsum(ln) - ln
    step = np.ones(W * S, np.int64)
    step[pos[1:]] = src[1:] - (src[:-1] + ln[:-1] - 1)
    step[0] = src[0]
    source = np.concatenate([tokens.ravel().astype(np.int32, copy=False),
                             np.full(S - 1, specials.pad, np.int32), specials.table()])
    tok = source[np.cumsum(step)].reshape(W, S)
    seg_t = np.repeat(seg.astype(np.int32), ln).reshape(W, S)
    flag_t = np.repeat(flag, ln).reshape(W, S)
    return _finish(tok, seg_t, flag_t, prefix_len.astype(np.int32), objective, specials)


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


def _finish(tok, seg, flag, prefix_len, objective, specials) -> dict:
    """labels[i] = tok[i+1] and loss where i+1 is a flagged token of the same segment (never padding)."""
    W, S = tok.shape
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] >= 0)
    labels = np.full((W, S), specials.pad, np.int32)
    labels[:, :-1] = np.where(same, tok[:, 1:], np.int32(specials.pad))
    loss = np.zeros((W, S), np.float32)
    loss[:, :-1] = same & flag[:, 1:]
    return dict(tokens=tok.astype(np.int32, copy=False), labels=labels, loss_mask=loss,
                segment_ids=seg.astype(np.int32, copy=False), prefix_len=prefix_len.astype(np.int32),
                objective=np.full(W, objective, np.int8))


def _empty(W: int, S: int) -> dict:
    return dict(tokens=np.zeros((W, S), np.int32), labels=np.zeros((W, S), np.int32),
                loss_mask=np.zeros((W, S), np.float32), segment_ids=np.full((W, S), -1, np.int32),
                prefix_len=np.zeros(W, np.int32), objective=np.zeros(W, np.int8))


def _check(tokens, segments, cfg, specials, rngs, seq_len):
    tokens, segments = np.asarray(tokens), np.asarray(segments)
    if tokens.ndim != 2 or tokens.shape != segments.shape:
        raise ValueError(f"windows: tokens {tokens.shape} and segment_ids {segments.shape} must be equal [W, S]")
    if len(rngs) != tokens.shape[0]:
        raise ValueError(f"windows: {tokens.shape[0]} windows but {len(rngs)} generators")
    if cfg.max_spans > len(specials.masks):
        raise ValueError(f"objective.max_spans: {cfg.max_spans} exceeds the tokenizer's {len(specials.masks)} "
                         f"sentinels (data.num_sentinels)")
    valid = segments >= 0
    if tokens.shape[1] and tokens.shape[0]:
        step = np.diff(segments, axis=1)
        ok = ((valid[:, 1:] <= valid[:, :-1]).all() and (segments[:, 0] <= 0).all()
              and ((step >= 0) & (step <= 1) | ~valid[:, 1:]).all())
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
    inp, tgt = unit[:seps[0]], unit[seps[0] + 1:]
    lead, fills = [], {}
    for chunk in np.split(tgt, np.flatnonzero(tgt == sp.eom) + 1):
        if chunk.size == 0:
            continue
        if chunk[-1] != sp.eom:
            raise ValueError("reconstruct: target chunk does not end with <eom>")
        q = int(np.flatnonzero(np.isin(chunk, sp.masks))[0])
        lead.append(chunk[:q])  # SPM puts the prefix before its <mask_1>
        fills[int(chunk[q])] = chunk[q + 1:-1]
    parts = list(lead)
    holes = np.flatnonzero(np.isin(inp, sp.masks))
    prev = 0
    for h in holes:
        parts += [inp[prev:h], fills[int(inp[h])]]
        prev = h + 1
    parts.append(inp[prev:])
    return np.concatenate(parts) if parts else inp[:0]


# ---------------------------------------------------------------------------------------------- reference
def span_corruption_reference(tokens: list[list[int]], segments: list[list[int]], specials: Specials,
                              rngs, seq_len: int, *, ratio: tuple[float, float], span_len: tuple[int, int],
                              max_spans: int) -> list[list[int]]:
    """File-level span corruption in plain Python loops, same draws as `span_corruption`.

    The oracle for tests (identical tokens) and the baseline in benchmarks/bench_objectives.py.
    """
    (rmin, rmax), (lo, hi), K = ratio, span_len, max_spans
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
        flat = rng.random(len(docs) * (1 + 2 * K)).tolist()
        sample: list[int] = []
        for di, doc in enumerate(docs):
            d = flat[di * (1 + 2 * K):(di + 1) * (1 + 2 * K)]
            n = len(doc) - (doc[-1] == specials.eot)
            m = round((rmin + d[0] * (rmax - rmin)) * n)
            lengths, total = [], 0
            for j in range(K):
                if total >= m:
                    break
                ln = min(lo + min(int(d[1 + j] * (hi - lo + 1)), hi - lo), m - total)
                lengths.append(ln)
                total += ln
            k = len(lengths)
            gap = 1 if n - total - (k - 1) >= 0 else 0
            room = n - total - gap * max(k - 1, 0)
            cuts = sorted(min(int(d[1 + K + j] * (room + 1)), room) for j in range(k))
            starts, before = [], 0
            for j in range(k):
                starts.append(cuts[j] + before + gap * j)
                before += lengths[j]
            pos = 0
            for j in range(k):
                sample += doc[pos:starts[j]]
                sample.append(specials.masks[j])
                pos = starts[j] + lengths[j]
            sample += doc[pos:]
            sample.append(specials.sep)
            for j in range(k):
                sample.append(specials.masks[j])
                sample += doc[starts[j]:starts[j] + lengths[j]]
                sample.append(specials.eom)
        if len(sample) > seq_len:
            raise ValueError("reference: window overflows seq_len")
        out.append(sample + [specials.pad] * (seq_len - len(sample)))
    return out
