"""Caption metrics: corpus BLEU-1..4, CIDEr-D and ROUGE-L.

BLEU and ROUGE-L are on a 0-1 scale (not 0-100). CIDEr-D is reported exactly as
coco-caption does (mean over images of 10 x cosine similarity, so 0-10; good COCO
models score about 1). Every string is tokenised with `captioner.model.vocab.tokenize`.

* `coco_bleu`: pure-Python BLEU identical to coco-caption's `BleuScorer` with
  option="closest" (the numbers papers report).
* `nltk_bleu`: nltk's `corpus_bleu`, for comparison. It agrees with `coco_bleu` up to
  coco's epsilons except where a hypothesis is shorter than k words: nltk counts at
  least one k-gram per sentence (precision denominator max(1, .)), coco counts none.
* `cider_d` / `rouge_l`: pycocoevalcap's pure-Python scorers (optional dev dependency;
  None when it is missing).
* `meteor`: pycocoevalcap's METEOR 1.5 jar, run on the machine's Java (None without either); used by
  `captioner evaluate`, not by per-epoch validation (it takes seconds). PTBTokenizer and SPICE are not used.
* `caption_faults`: how many captions repeat a content word, or contain <unk>.
* `attention_stats`: how sharp the decoder's attention is (mean peak weight and entropy per generated word).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Sequence

from captioner.errors import CaptionerError
from captioner.model.vocab import UNK, stopwords, tokenize

Tokens = Sequence[str]
_SMALL, _TINY = 1e-9, 1e-15  # coco-caption's constants (`small`, `tiny`)


def _ngrams(tokens: Tokens, n: int) -> Counter:
    """Counts of all 1..n-grams of `tokens`."""
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def coco_bleu(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n, exactly as pycocoevalcap's BleuScorer.compute_score(option="closest")."""
    correct, guess = [0] * n, [0] * n
    testlen = reflen = 0
    for hyp, rs in zip(hyps, refs, strict=True):
        maxref: Counter = Counter()
        for r in rs:
            maxref |= _ngrams(r, n)  # per-n-gram max over the references
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(maxref[gram], count)
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        testlen += len(hyp)
        reflen += min((abs(len(r) - len(hyp)), len(r)) for r in rs)[1]  # closest, ties -> shorter
    bleus, bleu = [], 1.0
    for k in range(n):
        bleu *= float(correct[k] + _TINY) / (guess[k] + _SMALL)
        bleus.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        bleus = [b * math.exp(1 - 1 / ratio) for b in bleus]
    return bleus


def nltk_bleu(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n via nltk's corpus_bleu with cumulative uniform weights.

    No smoothing: an order with zero matches gives 0 (nltk's "0 counts of n-gram
    overlaps" warning is silenced, since that 0 is the intended, unsmoothed value).
    """
    from nltk.translate.bleu_score import corpus_bleu

    weights = [tuple([1.0 / k] * k) for k in range(1, n + 1)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts", category=UserWarning)
        out = corpus_bleu([list(map(list, rs)) for rs in refs], [list(h) for h in hyps], weights=weights)
    return [float(s) for s in out] if isinstance(out, list) else [float(out)]


def _coco_inputs(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]]) -> tuple[dict, dict]:
    """pycocoevalcap's (gts, res) dicts: id -> list of space-joined, pre-tokenised strings."""
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    return gts, {i: [" ".join(h)] for i, h in enumerate(hyps)}


def cider_d(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]]) -> float | None:
    """CIDEr-D (pycocoevalcap's `Cider`; idf comes from this corpus' refs), or None if unavailable."""
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        return None
    return float(Cider().compute_score(*_coco_inputs(hyps, refs))[0])


def rouge_l(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]]) -> float | None:
    """ROUGE-L F-measure (beta 1.2, pycocoevalcap's `Rouge`), or None if unavailable."""
    try:
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        return None
    return float(Rouge().compute_score(*_coco_inputs(hyps, refs))[0])


def meteor(hyps: Sequence[Tokens], refs: Sequence[Sequence[Tokens]]) -> float | None:
    """METEOR 1.5 (pycocoevalcap's jar and wrapper, as coco-caption reports it), or None without Java or
    pycocoevalcap."""
    import shutil

    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    if shutil.which("java") is None:
        return None
    scorer = Meteor()
    try:
        return float(scorer.compute_score(*_coco_inputs(hyps, refs))[0])
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()


def repeats_content_word(tokens: Tokens) -> bool:
    """True if a word that is not a function word appears twice ("a dog with a dog on a dog")."""
    content = [w for w in tokens if w not in stopwords() and not w.isdigit() and len(w) > 1]
    return len(content) != len(set(content))


def caption_faults(hyps: Sequence[str]) -> dict[str, float]:
    """Failure rates over captions: the share that repeat a content word, and that contain <unk>."""
    if not hyps:
        return {"repeat_rate": 0.0, "unk_rate": 0.0}
    return {"repeat_rate": sum(repeats_content_word(tokenize(h)) for h in hyps) / len(hyps),
            "unk_rate": sum(UNK in h.split() for h in hyps) / len(hyps)}


def attention_stats(maps: Sequence) -> dict[str, float]:
    """Over every generated word: the mean largest weight of its attention map and the mean entropy (nats), each
    map normalised to sum 1. maps: one array (words, ...) per caption. A uniform map over L cells: 1/L and log L."""
    import numpy as np

    words = [np.asarray(m, dtype=np.float64).reshape(len(m), -1) for m in maps if len(m)]
    if not words:
        return {"attention_peak": float("nan"), "attention_entropy": float("nan")}
    a = np.concatenate(words)
    a = a / np.maximum(a.sum(1, keepdims=True), 1e-30)
    logs = np.log(np.where(a > 0, a, 1.0))  # 0 log 0 = 0
    return {"attention_peak": float(a.max(1).mean()), "attention_entropy": float(-(a * logs).sum(1).mean())}


def score_captions(hyps: Sequence[str], refs: Sequence[Sequence[str]], with_meteor: bool = False) -> dict[str, float]:
    """All metrics for raw caption strings: one hypothesis and >= 1 references per item (METEOR if asked)."""
    if len(hyps) != len(refs):
        raise CaptionerError(f"{len(hyps)} captions but {len(refs)} reference sets")
    if not hyps:
        raise CaptionerError("no captions to score")
    if any(len(rs) == 0 for rs in refs):
        raise CaptionerError("every caption needs at least one reference")
    th = [tokenize(h) for h in hyps]
    tr = [[tokenize(r) for r in rs] for rs in refs]
    scores = {f"BLEU-{k}": s for k, s in enumerate(coco_bleu(th, tr), 1)}
    scores |= {f"nltk-BLEU-{k}": s for k, s in enumerate(nltk_bleu(th, tr), 1)}
    for name, value in (("CIDEr-D", cider_d(th, tr)), ("ROUGE-L", rouge_l(th, tr)),
                        ("METEOR", meteor(th, tr) if with_meteor else None)):
        if value is not None:
            scores[name] = value
    return scores


def format_scores(scores: dict[str, float]) -> str:
    """One readable line, e.g. `BLEU-1 0.712 ... BLEU-4 0.301 (coco-caption compatible BLEU; ...)`."""
    bleu = " ".join(f"BLEU-{k} {scores[f'BLEU-{k}']:.3f}" for k in range(1, 5) if f"BLEU-{k}" in scores)
    notes = ["coco-caption compatible BLEU"]
    nltk = [f"{scores[f'nltk-BLEU-{k}']:.3f}" for k in range(1, 5) if f"nltk-BLEU-{k}" in scores]
    if nltk:
        notes.append("nltk corpus_bleu: " + "/".join(nltk))
    notes += [f"{name} {scores[name]:.3f}" for name in ("METEOR", "CIDEr-D", "ROUGE-L") if name in scores]
    notes.append("scale 0-1" + (", CIDEr-D 0-10" if "CIDEr-D" in scores else ""))
    return f"{bleu} ({'; '.join(notes)})"


class CiderD:
    """CIDEr-D against fixed references, for scoring many captions one at a time (the SCST reward).

    pycocoevalcap's `Cider` takes its idf from whatever batch it is given and re-weights every reference on
    each call; a reward needs one idf for the whole training corpus. This is the same formula (tf-idf 1..4-grams,
    clipped, Gaussian length penalty sigma 6, x10, "length" counted in bigrams as coco-caption does) with the
    document frequencies and reference vectors computed once: `CiderD(refs).score(hyp, i)` for the corpus
    `refs` equals pycocoevalcap's per-image score for hyp (tests/test_metrics.py)."""

    def __init__(self, refs: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0):
        if not refs or any(len(rs) == 0 for rs in refs):
            raise CaptionerError("CIDEr-D needs at least one reference per image")
        self.n, self.sigma, self.tokens = n, sigma, refs
        cooked = [[_ngrams(r, n) for r in rs] for rs in refs]
        self.df: Counter = Counter(g for rs in cooked for g in {g for r in rs for g in r})
        self.log_images = math.log(len(refs))
        self.refs = [[self._vector(c) for c in rs] for rs in cooked]

    def _vector(self, counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(self.n)]
        norm = [0.0] * self.n
        for gram, tf in counts.items():
            k = len(gram) - 1
            w = tf * (self.log_images - math.log(max(1.0, self.df.get(gram, 0.0))))
            vec[k][gram] = w
            norm[k] += w * w
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(x) for x in norm], bigrams

    def score(self, hyp: Tokens, i: int) -> float:
        """CIDEr-D of one caption (tokens) for image i of the corpus."""
        vh, nh, lh = self._vector(_ngrams(hyp, self.n))
        total = 0.0
        for vr, nr, lr in self.refs[i]:
            penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] and nr[k]:
                    dot /= nh[k] * nr[k]
                total += dot * penalty / self.n
        return 10.0 * total / len(self.refs[i])
