"""Tokenizer and vocabulary. One tokenizer is used for training, decoding and scoring."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens with punctuation removed (as the Karpathy / coco-caption
    preprocessing does). Pure regex: no nltk data downloads needed."""
    return _TOKEN.findall(text.lower().replace("`", "'"))


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    """Function words (assets/stopwords.txt): what a "content word" is not (video tags, repeat statistics)."""
    text = resources.files("captioner").joinpath("assets/stopwords.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#"))


@dataclass
class Vocab:
    itos: list[str]
    stoi: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if list(self.itos[:4]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}")
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    pad = property(lambda self: 0)
    start = property(lambda self: 1)
    end = property(lambda self: 2)
    unk = property(lambda self: 3)

    def __len__(self) -> int:
        return len(self.itos)

    def content_mask(self) -> list[bool]:
        """Per word id: True for content words (not a function word, number, single letter or special token),
        the words search's no_repeat_words never repeats within a caption."""
        stop = stopwords()
        return [i >= len(SPECIALS) and len(w) > 1 and not w.isdigit() and w not in stop for i, w in enumerate(self.itos)]

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> "Vocab":
        counts = Counter(tok for t in texts for tok in tokenize(t))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """<start> w1 ... wn <end> (words truncated to max_len)."""
        ids = [self.stoi.get(w, self.unk) for w in tokenize(text)]
        if max_len is not None:
            ids = ids[:max_len]
        return [self.start, *ids, self.end]

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.pad, self.start):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(list(d["itos"]))
