"""What a captioner returns for one image (`from captioner import Caption`), and how a search's hypotheses become
one: the torch Captioner and the LiteCaptioner build it here alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import CaptionerError


@dataclass
class Caption:
    text: str
    score: float  # length-normalised log-probability (higher is better)
    words: list[str]
    attention: np.ndarray  # (len(words), grid, grid), one map per word
    alternatives: list[tuple[str, float]]  # all returned beams, best first (includes this one)


def decode(tokens: Sequence[int], itos: Sequence[str], specials: tuple[int, int, int, int] = (0, 1, 2, 3)) -> str:
    """Word ids -> text: <pad> and <start> skipped, up to <end> (Vocab.decode)."""
    pad, start, end, _ = specials
    words = []
    for i in tokens:
        i = int(i)
        if i == end:
            break
        if i in (pad, start):
            continue
        words.append(itos[i])
    return " ".join(words)


def caption_of(hyps: Sequence[Any], itos: Sequence[str], grid: int,
               specials: tuple[int, int, int, int] = (0, 1, 2, 3)) -> Caption:
    """An image's hypotheses (best first; search.Hypothesis, attention (n_words, L) as an array or a CPU tensor)
    -> its Caption; `grid` is the encoder's, for a caption of no words."""
    if not hyps:  # every hypothesis scored NaN/-inf: finite but broken weights
        raise CaptionerError("the model produced no caption: its weights are damaged (use another copy)")
    best = hyps[0]
    words = [itos[t] for t in best.tokens]
    att = np.asarray(best.attention, dtype=np.float32)
    side = int(round(att.shape[1] ** 0.5)) if att.size else grid
    maps = att.reshape(len(words), side, side) if words else np.zeros((0, side, side), np.float32)
    alts = [(decode(h.tokens, itos, specials), h.score) for h in hyps]
    return Caption(" ".join(words), best.score, words, maps, alts)
