"""Greedy and batched beam search in NumPy, over any decoder step: `step(words, a, keys, state) -> (logits, state,
alpha)` on arrays (an ONNX Runtime session, or a torch Decoder wrapped). Every image of a batch and every beam of
every image live in one array program: no per-image Python loop. Once an image's hypotheses have all finished, its
rows drop out of the step's batch (see _shrink), so one long caption does not keep the whole batch busy.

This is the one search (issue 26): the torch captioner and training's validation decode run it too, through
model/search.py. It is the torch search it replaced, step for step: float32 log-probabilities, the same masks
(length, `<unk>`, no-repeat n-grams and content words), the same rows decoded at each step; tests/test_lite.py
checks that both give the same hypotheses (the old one is kept as the tests' oracle, tests/reference_search.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

import numpy as np

from ..errors import CaptionerError

NEG = -1e9
# A caption scoring below this (raw log-prob, length_penalty 0) is flagged "low confidence": the shipped model's
# 1st percentile on the Flickr8k dev images, beam 3 (docs/results.md "Low-confidence captions").
LOW_SCORE = -21.8

State = tuple[np.ndarray, np.ndarray]  # (h, c); a GRU's c is carried along unchanged
Step = Callable[[np.ndarray, np.ndarray, np.ndarray, State], tuple[np.ndarray, State, np.ndarray]]


def score_warning(score: float | None, length_penalty: float = 0.0) -> str:
    """'' for a usual score; a one-line warning for one below LOW_SCORE (raw log-probs only)."""
    if score is None or length_penalty or score >= LOW_SCORE:
        return ""
    return f"low confidence (score {score:.1f} below {LOW_SCORE:g})"


@dataclass
class SearchConfig:
    beam: int = 3
    max_len: int = 20  # words, <end> not counted
    min_len: int = 1
    length_penalty: float = 0.0  # score / len**length_penalty ; 0 = raw log-prob
    no_repeat_ngram: int = 0  # forbid repeating any n-gram of this size (0 = off)
    no_repeat_words: bool = False  # never repeat a content word within a caption (needs `repeat_mask`, see search)
    suppress_unk: bool = True
    topk: int = 1  # alternatives returned per image (<= beam)


def configure(base: SearchConfig, **overrides: Any) -> SearchConfig:
    """`base` with `overrides` (None = keep), each checked against the CLI's range for it: a bad value (beam=0) is
    a CaptionerError, never a silent greedy search. topk is capped at the beam."""
    from ..options import BEAM, LENGTH_PENALTY, MAX_LEN, NO_REPEAT_NGRAM, TOPK

    values = {f.name: getattr(base, f.name) for f in fields(SearchConfig)}
    limits = {"beam": BEAM, "max_len": MAX_LEN, "topk": TOPK, "length_penalty": LENGTH_PENALTY,
              "no_repeat_ngram": NO_REPEAT_NGRAM}
    for k, v in overrides.items():
        if k not in values:
            raise CaptionerError(f"unknown search option {k!r} (known: {', '.join(values)})")
        if v is not None and k in limits:
            try:
                overrides[k] = limits[k].check(v)
            except ValueError as exc:
                raise CaptionerError(f"{k}={v!r}: {exc}") from None
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["topk"] = min(values["topk"], max(values["beam"], 1))
    return SearchConfig(**values)


@dataclass
class Hypothesis:
    tokens: list[int]  # words only (no <start>/<end>)
    score: float  # length-normalised log-probability
    logprob: float
    attention: np.ndarray  # (len(tokens), L) float32: one map per generated word


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - x.max(1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))


def _mask_logp(logp: np.ndarray, t: int, cfg: SearchConfig, specials: tuple[int, int, int, int],
               history: np.ndarray, repeat_mask: np.ndarray | None) -> np.ndarray:
    """NEG for what may not come next (in place): specials, <end> before min_len, content words already said,
    the word that would repeat an n-gram."""
    pad, start, end, unk = specials
    rows = np.arange(logp.shape[0])[:, None]
    if cfg.no_repeat_words and repeat_mask is not None and history.shape[1]:
        said = repeat_mask[history]  # (N, t): the content words already said
        logp[np.broadcast_to(rows, history.shape)[said], history[said]] = NEG
    logp[:, pad] = NEG
    logp[:, start] = NEG
    if cfg.suppress_unk:
        logp[:, unk] = NEG
    if t < cfg.min_len:
        logp[:, end] = NEG
    n = cfg.no_repeat_ngram
    if n and history.shape[1] >= n:
        windows = np.lib.stride_tricks.sliding_window_view(history, n, axis=1)  # (N, W, n)
        if n == 1:
            hit = np.ones(windows.shape[:2], dtype=bool)
        else:
            hit = (windows[:, :, :-1] == history[:, None, -(n - 1):]).all(-1)
        logp[np.broadcast_to(rows, hit.shape)[hit], windows[:, :, -1][hit]] = NEG
    return logp


def _step(step: Step, words: np.ndarray, a: np.ndarray, keys: np.ndarray, state: State,
          rows: np.ndarray | None) -> tuple[np.ndarray, State, np.ndarray]:
    """step on `rows` only (all when None; a and keys are then already those rows'). The other rows are finished and
    their outputs unused: they get zero logits and attention and keep their state."""
    if rows is None:
        return step(words, a, keys, state)
    logits, (h, c), alpha = step(words[rows], a, keys, (state[0][rows], state[1][rows]))
    n = words.shape[0]
    full_logits = np.zeros((n, logits.shape[1]), logits.dtype)
    full_logits[rows] = logits
    full_alpha = np.zeros((n, alpha.shape[1]), alpha.dtype)
    full_alpha[rows] = alpha
    new_h, new_c = state[0].copy(), state[1].copy()
    new_h[rows], new_c[rows] = h, c
    return full_logits, (new_h, new_c), full_alpha


def _shrink(unfinished: np.ndarray, rows: np.ndarray | None, a: np.ndarray, keys: np.ndarray,
            a_rows: np.ndarray, keys_rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """The rows to decode next: those of images with an unfinished hypothesis (`unfinished`: per row, all of an
    image's rows alike, because beams only move within their image). Gathering a and keys costs about a decoder
    step, so the set only shrinks once it would lose at least a quarter of its rows."""
    live = int(unfinished.sum())
    if live > 0.75 * (len(rows) if rows is not None else unfinished.size):
        return rows, a_rows, keys_rows
    rows = np.flatnonzero(unfinished)
    return rows, a[rows], keys[rows]


def _hypothesis(row: np.ndarray, logprob: np.float32, alphas: np.ndarray, end: int, cfg: SearchConfig) -> Hypothesis:
    toks = [int(x) for x in row]
    length = toks.index(end) if end in toks else len(toks)
    return Hypothesis(toks[:length], float(logprob) / max(length + 1, 1) ** cfg.length_penalty,
                      float(logprob), np.ascontiguousarray(alphas[:length], dtype=np.float32))


def _forced_end(vocab: int, end: int) -> np.ndarray:
    return np.where(np.arange(vocab) == end, np.float32(0.0), np.float32(NEG)).astype(np.float32)


def greedy(step: Step, a: np.ndarray, keys: np.ndarray, state: State, cfg: SearchConfig,
           specials: tuple[int, int, int, int] = (0, 1, 2, 3), repeat_mask: np.ndarray | None = None
           ) -> list[list[Hypothesis]]:
    pad, start, end, _ = specials
    n = a.shape[0]
    words = np.full(n, start, dtype=np.int64)
    history = np.zeros((n, 0), dtype=np.int64)
    total = np.zeros(n, dtype=np.float32)
    done = np.zeros(n, dtype=bool)
    alphas = []
    rows, a_rows, keys_rows = None, a, keys
    for t in range(cfg.max_len + 1):
        logits, state, alpha = _step(step, words, a_rows, keys_rows, state, rows)
        logp = _mask_logp(log_softmax(logits), t, cfg, specials, history, repeat_mask)
        if t == cfg.max_len:  # force <end>
            logp[:, :] = _forced_end(logp.shape[1], end)
        words = logp.argmax(1)
        best = logp[np.arange(n), words]
        words = np.where(done, pad, words)
        total += np.where(done, np.float32(0.0), best)
        done |= words == end
        history = np.concatenate([history, words[:, None]], 1)
        alphas.append(alpha)
        if bool(done.all()):
            break
        rows, a_rows, keys_rows = _shrink(~done, rows, a, keys, a_rows, keys_rows)
    stacked = np.stack(alphas, 1)
    return [[_hypothesis(history[i], total[i], stacked[i], end, cfg)] for i in range(n)]


def _top(cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest values and their indices, largest first (torch.topk), ties to the lower index. k passes
    of argmax: k is small (the beam), and argmax over a row is several times faster than np.argpartition. `cand` is
    used up (the picked values become -inf)."""
    rows = np.arange(cand.shape[0])
    top = np.empty((cand.shape[0], k), cand.dtype)
    idx = np.empty((cand.shape[0], k), np.int64)
    for j in range(k):
        pick = cand.argmax(1)
        idx[:, j], top[:, j] = pick, cand[rows, pick]
        cand[rows, pick] = -np.inf
    return top, idx


def beam_search(step: Step, a: np.ndarray, keys: np.ndarray, state: State, cfg: SearchConfig,
                specials: tuple[int, int, int, int] = (0, 1, 2, 3), repeat_mask: np.ndarray | None = None
                ) -> list[list[Hypothesis]]:
    """Returns, per image, the cfg.topk best hypotheses (best first)."""
    pad, start, end, _ = specials
    b, k = a.shape[0], cfg.beam
    a, keys = np.repeat(a, k, 0), np.repeat(keys, k, 0)  # (B, ...) -> (B*K, ...)
    state = (np.repeat(state[0], k, 0), np.repeat(state[1], k, 0))
    words = np.full(b * k, start, dtype=np.int64)
    scores = np.full((b, k), NEG, dtype=np.float32)
    scores[:, 0] = 0.0  # only the first beam is alive at t=0
    scores = scores.reshape(-1)
    history = np.zeros((b * k, 0), dtype=np.int64)
    alphas = np.zeros((b * k, 0, a.shape[1]), dtype=np.float32)
    done = np.zeros(b * k, dtype=bool)
    finished_row: np.ndarray | None = None  # a finished hypothesis only extends with <pad> at no cost
    rows, a_rows, keys_rows = None, a, keys
    base = (np.arange(b) * k)[:, None]
    for t in range(cfg.max_len + 1):
        logits, state, alpha = _step(step, words, a_rows, keys_rows, state, rows)
        vocab = logits.shape[1]
        if finished_row is None:
            finished_row = np.where(np.arange(vocab) == pad, np.float32(0.0), np.float32(NEG)).astype(np.float32)
        logp = _mask_logp(log_softmax(logits), t, cfg, specials, history, repeat_mask)
        if t == cfg.max_len:  # force <end>: every hypothesis finishes, none is lost
            logp[:, :] = _forced_end(vocab, end)
        logp = np.where(done[:, None], finished_row, logp)
        cand = (scores[:, None] + logp).reshape(b, k * vocab)
        top, idx = _top(cand, k)
        origin = (idx // vocab + base).reshape(-1)
        words = (idx % vocab).reshape(-1)
        scores = top.reshape(-1)
        history = np.concatenate([history[origin], words[:, None]], 1)
        alphas = np.concatenate([alphas[origin], alpha[origin][:, None]], 1)
        state = (state[0][origin], state[1][origin])
        done = done[origin] | (words == end) | (words == pad)
        if bool(done.all()):
            break
        unfinished = np.repeat((~done).reshape(b, k).any(1), k)
        rows, a_rows, keys_rows = _shrink(unfinished, rows, a, keys, a_rows, keys_rows)
    out = []
    for i in range(b):
        hyps = [_hypothesis(history[i * k + j], scores[i * k + j], alphas[i * k + j], end, cfg) for j in range(k)]
        hyps = [hyp for hyp in hyps if hyp.logprob > NEG / 2]
        hyps.sort(key=lambda hyp: -hyp.score)
        out.append(hyps[: max(cfg.topk, 1)])
    return out


def search(step: Step, a: np.ndarray, keys: np.ndarray, state: State, cfg: SearchConfig,
           specials: tuple[int, int, int, int] = (0, 1, 2, 3), repeat_mask: np.ndarray | None = None
           ) -> list[list[Hypothesis]]:
    """Greedy (beam 1) or beam search from the prepared decoder inputs (annotations a (B, L, D), their attention
    keys (B, L, A), the initial state (h0, c0)). `repeat_mask` (V,) bool: the words cfg.no_repeat_words never
    repeats (the vocabulary minus function words)."""
    if a.shape[0] == 0:
        return []
    run = greedy if cfg.beam <= 1 else beam_search
    mask = None if repeat_mask is None else np.asarray(repeat_mask, dtype=bool)
    return run(step, a, keys, state, cfg, specials, mask)
