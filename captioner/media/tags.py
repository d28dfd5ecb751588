"""Video tags: the objects in a stretch of frames, from two sources. `caption` tags are the nouns of its
captions (assets/tagwords.txt says which content words are nouns: no tagger or data download needed);
`imagenet` tags are the encoder's own ImageNet labels (the classifier the decoder reads as attributes)
whose probability reaches IMAGENET_MIN_PROB on a frame. docs/video.md has how the list and the threshold
were made."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Sequence

from ..model.vocab import stopwords, tokenize

IMAGENET_TOPK = 3  # labels looked at per frame
IMAGENET_MIN_PROB = 0.3  # and kept from this probability on (COCO: about half match a human caption's word)
CAPTION_TAGS, IMAGENET_TAGS = 6, 3  # at most this many of each per segment / video

Labels = list[tuple[str, float]]  # one frame's ImageNet labels, most probable first


@dataclass
class Tag:
    tag: str
    source: str  # "caption" or "imagenet"
    score: float  # caption: share of the frames whose caption has the word; imagenet: mean probability


@dataclass
class FrameCaption:
    """What a video caption_fn may return for a frame instead of a plain caption: the caption and the
    frame's ImageNet labels (Captioner.imagenet_labels), which become `imagenet` tags."""
    text: str
    labels: Labels = field(default_factory=list)


def frame_captioner(cap: Any, cfg: Any = None) -> Callable[[list], list[FrameCaption]]:
    """A video caption_fn for a Captioner: each frame's caption and ImageNet labels from one encoding."""
    def caption_fn(frames: list) -> list[FrameCaption]:
        feats = cap.encode(cap.preprocess(frames))
        captions = cap.caption_features(feats, cfg or cap.search_config())
        return [FrameCaption(c.text, labels) for c, labels in zip(captions, cap.imagenet_labels(feats, IMAGENET_TOPK))]

    return caption_fn


@lru_cache(maxsize=1)
def _word_lists() -> tuple[frozenset[str], frozenset[str]]:
    """(nouns despite an -ing/-ed/-ly ending, words that are not nouns) from assets/tagwords.txt."""
    text = resources.files("captioner").joinpath("assets/tagwords.txt").read_text(encoding="utf-8")
    lists: dict[str, set[str]] = {"[nouns]": set(), "[not nouns]": set()}
    section = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):  # [compounds] sections: compounds()
            section = line if line in lists else None
        elif line and section:
            lists[section].update(line.lower().split())
    return frozenset(lists["[nouns]"]), frozenset(lists["[not nouns]"])


@lru_cache(maxsize=1)
def compounds() -> tuple[tuple[tuple[str, ...], ...], frozenset[tuple[str, ...]]]:
    """(nouns of several words, longest first; those that are not a kind of their last word: hot dog, teddy bear)
    from assets/tagwords.txt's [compounds] sections."""
    text = resources.files("captioner").joinpath("assets/tagwords.txt").read_text(encoding="utf-8")
    found: dict[str, list[tuple[str, ...]]] = {"[compounds]": [], "[compounds that are not their last word]": []}
    section = None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip().lower()
        if line.startswith("["):
            section = line if line in found else None
        elif line and section:
            found[section].append(tuple(line.split()))
    every = sorted(set(found["[compounds]"]) | set(found["[compounds that are not their last word]"]), key=lambda c: -len(c))
    return tuple(every), frozenset(found["[compounds that are not their last word]"])


def join_compounds(words: Sequence[str]) -> list[str]:
    """Caption tokens with each known compound noun as one item: [a, man, on, a, cell phone]."""
    out, i, known = [], 0, compounds()[0]
    while i < len(words):
        hit = next((c for c in known if tuple(words[i:i + len(c)]) == c or
                    tuple(words[i:i + len(c)]) == (*c[:-1], c[-1] + "s")), None)
        out.append(" ".join(words[i:i + len(hit)]) if hit else words[i])
        i += len(hit) if hit else 1
    return out


def is_noun(word: str) -> bool:
    """Whether a caption word names a thing (a possible tag)."""
    nouns, not_nouns = _word_lists()
    if len(word) < 2 or word.isdigit() or word in stopwords():
        return False
    if word in nouns:
        return True
    return word not in not_nouns and not word.endswith(("ing", "ed", "ly"))


def caption_tags(captions: Sequence[str], k: int = CAPTION_TAGS) -> list[Tag]:
    """Up to k nouns of the captions, the most frequent first (ties: first use); score = share of captions."""
    counts = Counter(w for c in captions for w in dict.fromkeys(join_compounds(tokenize(c))) if " " in w or is_noun(w))
    return [Tag(w, "caption", round(n / len(captions), 3)) for w, n in counts.most_common(k)]


def imagenet_tags(labels: Sequence[Labels], k: int = IMAGENET_TAGS, min_prob: float = IMAGENET_MIN_PROB) -> list[Tag]:
    """Up to k ImageNet labels that reach min_prob on some frame, by mean probability over all the frames."""
    total: dict[str, float] = {}
    kept: set[str] = set()
    for frame in labels:
        for name, p in frame:
            total[name] = total.get(name, 0.0) + p
            if p >= min_prob:
                kept.add(name)
    ranked = sorted(kept, key=lambda name: -total[name])[:k]
    return [Tag(name, "imagenet", round(total[name] / len(labels), 3)) for name in ranked]


def tag(captions: Sequence[str], labels: Sequence[Labels]) -> list[Tag]:
    """Caption nouns, then the ImageNet labels that are not already among them."""
    words = caption_tags(captions)
    seen = {t.tag for t in words}
    return words + [t for t in imagenet_tags(labels) if t.tag.lower() not in seen] if labels else words


def describe(tags: Sequence[Tag]) -> str:
    """Tags for people: "man, shirt, camera; ImageNet: tripod"."""
    words = ", ".join(t.tag for t in tags if t.source == "caption")
    labels = ", ".join(t.tag for t in tags if t.source == "imagenet")
    return f"{words}; ImageNet: {labels}" if words and labels else words or (f"ImageNet: {labels}" if labels else "")
