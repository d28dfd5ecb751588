"""The torch search as it was before issue 26 made lite/search.py the one search (captioner/model/search.py at
commit 3792e49), kept here only as the tests' oracle: test_lite.py checks that the NumPy search gives its hypotheses.
Not used by the package."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from captioner.lite.search import NEG, SearchConfig
from captioner.model.decoder import Decoder


@dataclass
class Hypothesis:
    tokens: list[int]  # words only (no <start>/<end>)
    score: float  # length-normalised log-probability
    logprob: float
    attention: torch.Tensor  # (len(tokens), L): one map per generated word


def _mask_logp(logp: torch.Tensor, t: int, cfg: SearchConfig, specials: tuple[int, int, int, int],
               history: torch.Tensor | None, repeat_mask: torch.Tensor | None = None) -> torch.Tensor:
    pad, start, end, unk = specials
    if cfg.no_repeat_words and repeat_mask is not None and history is not None and history.shape[1]:
        # the content words already said get NEG: a scatter over the (N, t) history, not a mask over (N, V)
        said = logp.gather(1, history)
        logp.scatter_(1, history, torch.where(repeat_mask[history], NEG, said))
    logp[:, pad] = NEG
    logp[:, start] = NEG
    if cfg.suppress_unk:
        logp[:, unk] = NEG
    if t < cfg.min_len:
        logp[:, end] = NEG
    n = cfg.no_repeat_ngram
    if n and history is not None and history.shape[1] >= n:
        windows = history.unfold(1, n, 1)  # (N, W, n)
        if n == 1:
            hit = torch.ones(windows.shape[:2], dtype=torch.bool, device=logp.device)
        else:
            hit = (windows[:, :, :-1] == history[:, -(n - 1):].unsqueeze(1)).all(-1)
        rows = torch.arange(logp.shape[0], device=logp.device).unsqueeze(1).expand_as(hit)
        logp[rows[hit], windows[:, :, -1][hit]] = NEG
    return logp


def _step(decoder: Decoder, words: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, state: tuple,
          rows: torch.Tensor | None) -> tuple[torch.Tensor, tuple, torch.Tensor]:
    """decoder.step on `rows` only (all when None; a and keys are then already those rows'). The other rows
    are finished and their outputs unused: they get zero logits and attention and keep their state."""
    if rows is None:
        return decoder.step(words, a, keys, state)
    logits, (h, c), alpha = decoder.step(words[rows], a, keys, (state[0][rows], state[1][rows]))
    n = words.shape[0]
    return (logits.new_zeros(n, logits.shape[1]).index_copy_(0, rows, logits),
            (state[0].index_copy(0, rows, h), state[1].index_copy(0, rows, c)),
            alpha.new_zeros(n, alpha.shape[1]).index_copy_(0, rows, alpha))


def _shrink(unfinished: torch.Tensor, rows: torch.Tensor | None, a: torch.Tensor, keys: torch.Tensor,
            a_rows: torch.Tensor, keys_rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The rows to decode next: those of images with an unfinished hypothesis (`unfinished`: per row, all of an
    image's rows alike, because beams only move within their image). Gathering a and keys costs about a
    decoder step, so the set only shrinks once it would lose at least a quarter of its rows."""
    live = int(unfinished.sum())
    if live > 0.75 * (len(rows) if rows is not None else unfinished.numel()):
        return rows, a_rows, keys_rows
    rows = unfinished.nonzero().squeeze(1)
    return rows, a[rows], keys[rows]


@torch.no_grad()
def greedy(decoder: Decoder, feats: torch.Tensor, cfg: SearchConfig, specials=(0, 1, 2, 3),
           repeat_mask: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    pad, start, end, _ = specials
    a, keys, state = decoder.prepare(feats)
    n = feats.shape[0]
    words = torch.full((n,), start, dtype=torch.long, device=feats.device)
    history = torch.zeros(n, 0, dtype=torch.long, device=feats.device)
    total = torch.zeros(n, device=feats.device)
    done = torch.zeros(n, dtype=torch.bool, device=feats.device)
    alphas = []
    rows, a_rows, keys_rows = None, a, keys
    for t in range(cfg.max_len + 1):
        logits, state, alpha = _step(decoder, words, a_rows, keys_rows, state, rows)
        logp = _mask_logp(torch.log_softmax(logits.float(), 1), t, cfg, specials, history, repeat_mask)
        if t == cfg.max_len:  # force <end>
            logp[:, :] = torch.where(torch.arange(logp.shape[1], device=logp.device) == end, 0.0, NEG)
        best, words = logp.max(1)
        words = torch.where(done, torch.full_like(words, pad), words)
        total += torch.where(done, torch.zeros_like(best), best)
        done |= words == end
        history = torch.cat([history, words.unsqueeze(1)], 1)
        alphas.append(alpha)
        if bool(done.all()):
            break
        rows, a_rows, keys_rows = _shrink(~done, rows, a, keys, a_rows, keys_rows)
    alphas_t = torch.stack(alphas, 1)
    return [[_hypothesis(history[i], total[i], alphas_t[i], end, cfg)] for i in range(n)]


def _hypothesis(row: torch.Tensor, logprob: torch.Tensor, alphas: torch.Tensor, end: int, cfg: SearchConfig) -> Hypothesis:
    toks = row.tolist()
    length = toks.index(end) if end in toks else len(toks)
    return Hypothesis(toks[:length], float(logprob) / max(length + 1, 1) ** cfg.length_penalty,
                      float(logprob), alphas[:length].float().cpu())


@torch.no_grad()
def beam_search(decoder: Decoder, feats: torch.Tensor, cfg: SearchConfig, specials=(0, 1, 2, 3),
                repeat_mask: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Returns, per image, the cfg.topk best hypotheses (best first)."""
    pad, start, end, _ = specials
    b, k, dev = feats.shape[0], cfg.beam, feats.device
    a, keys, (h, c) = decoder.prepare(feats)
    expand = lambda x: x.repeat_interleave(k, 0)  # noqa: E731 - (B, ...) -> (B*K, ...)
    a, keys, state = expand(a), expand(keys), (expand(h), expand(c))
    words = torch.full((b * k,), start, dtype=torch.long, device=dev)
    scores = torch.full((b, k), NEG, device=dev)
    scores[:, 0] = 0.0  # only the first beam is alive at t=0
    scores = scores.view(-1)
    history = torch.zeros(b * k, 0, dtype=torch.long, device=dev)
    alphas = torch.zeros(b * k, 0, a.shape[1], device=dev)
    done = torch.zeros(b * k, dtype=torch.bool, device=dev)
    vocab = decoder.cfg.vocab_size
    # a finished hypothesis only extends with <pad> at no cost
    finished_row = torch.where(torch.arange(vocab, device=dev) == pad, 0.0, NEG)
    rows, a_rows, keys_rows = None, a, keys
    for t in range(cfg.max_len + 1):
        logits, state, alpha = _step(decoder, words, a_rows, keys_rows, state, rows)
        logp = _mask_logp(torch.log_softmax(logits.float(), 1), t, cfg, specials, history, repeat_mask)
        if t == cfg.max_len:  # force <end>: every hypothesis finishes, none is lost
            logp[:, :] = torch.where(torch.arange(vocab, device=dev) == end, 0.0, NEG)
        logp = torch.where(done.unsqueeze(1), finished_row, logp)
        cand = (scores.unsqueeze(1) + logp).view(b, k * vocab)
        top, idx = cand.topk(k, dim=1)
        origin = (idx // vocab + torch.arange(b, device=dev).unsqueeze(1) * k).view(-1)
        words = (idx % vocab).view(-1)
        scores = top.view(-1)
        history = torch.cat([history[origin], words.unsqueeze(1)], 1)
        alphas = torch.cat([alphas[origin], alpha[origin].unsqueeze(1)], 1)
        state = (state[0][origin], state[1][origin])
        done = done[origin] | (words == end) | (words == pad)
        if bool(done.all()):
            break
        rows, a_rows, keys_rows = _shrink((~done).view(b, k).any(1).repeat_interleave(k), rows, a, keys, a_rows, keys_rows)
    out = []
    for i in range(b):
        hyps = [_hypothesis(history[i * k + j], scores[i * k + j], alphas[i * k + j], end, cfg) for j in range(k)]
        hyps = [hyp for hyp in hyps if hyp.logprob > NEG / 2]
        hyps.sort(key=lambda hyp: -hyp.score)
        out.append(hyps[: max(cfg.topk, 1)])
    return out


def search(decoder: Decoder, feats: torch.Tensor, cfg: SearchConfig, specials=(0, 1, 2, 3),
           repeat_mask: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Greedy (beam 1) or beam search. `repeat_mask` (V,) bool: the words cfg.no_repeat_words never repeats
    (Vocab.content_mask: the vocabulary minus function words)."""
    run = greedy if cfg.beam <= 1 else beam_search
    return run(decoder, feats, cfg, specials, repeat_mask)
