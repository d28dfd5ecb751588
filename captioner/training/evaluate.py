"""Evaluation: decode a split with a trained model, write per-image predictions, score them;
and a nearest-neighbour baseline (caption of the closest training image) under the same scorer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import CaptionerError
from ..model.encoder import image_transform
from ..model.vocab import tokenize
from ..pipeline.captioner import Captioner
from .data import Item, cache_features
from .metrics import attention_stats, caption_faults, coco_bleu, score_captions
from .train import gather_items


@dataclass
class EvalResult:
    split: str
    images: int
    scores: dict[str, float]
    predictions: list[dict]


def split_items(specs: Sequence[str], split: str) -> list[Item]:
    items = [it for it in gather_items(specs) if it.split == split]
    if not items:
        raise CaptionerError(f"no {split!r} images in {', '.join(specs)}")
    return items


def _features(cap: Captioner, items: list[Item], cache_dir: Path, workers: int, batch_size: int = 100) -> np.ndarray:
    """The items' annotation vectors, from the feature cache (encoded first where missing); a fine-tuned model's
    cache holds trunk activations, which its tuned stages turn into features here."""
    enc = cap.encoder
    cached = cache_features([it.image for it in items], enc, image_transform(enc.config.name, enc.config.resize),
                            cache_dir, num_workers=workers, device=str(cap.device))
    if not enc.config.finetune:
        return cached
    return np.concatenate([enc.from_cached(torch.from_numpy(np.array(cached[i:i + batch_size])).to(cap.device)).cpu().numpy()
                           for i in range(0, len(cached), batch_size)])


def evaluate(cap: Captioner, specs: Sequence[str], split: str = "test", out: Path | None = None,
             cache_dir: Path = Path("cache"), workers: int = 2, batch_size: int = 100, meteor: bool = False,
             **search) -> EvalResult:
    items = split_items(specs, split)
    feats = _features(cap, items, cache_dir, workers)
    cfg = cap.search_config(**search)
    caps = []
    for i in range(0, len(items), batch_size):
        caps += cap.caption_features(torch.from_numpy(np.array(feats[i:i + batch_size])).float(), cfg)
    preds = [{"image": str(it.image), "dataset": it.dataset, "caption": c.text, "score": round(c.score, 4),
              "references": it.captions} for it, c in zip(items, caps)]
    scores = score_captions([c.text for c in caps], [it.captions for it in items], with_meteor=meteor)
    scores |= caption_faults([c.text for c in caps])
    scores |= attention_stats([c.attention for c in caps])
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(p) + "\n" for p in preds))
    return EvalResult(split, len(items), scores, preds)


def consensus_caption(captions: Sequence[str]) -> str:
    """The reference that agrees most (BLEU-4 against the others) with its siblings."""
    if len(captions) == 1:
        return captions[0]
    toks = [tokenize(c) for c in captions]
    best = max(range(len(toks)), key=lambda i: coco_bleu([toks[i]], [[t for j, t in enumerate(toks) if j != i]])[3])
    return captions[best]


def nearest_neighbour(cap: Captioner, specs: Sequence[str], split: str = "test", cache_dir: Path = Path("cache"),
                      workers: int = 2) -> EvalResult:
    """Baseline: each image gets the consensus caption of the training image whose mean-pooled
    encoder feature is closest by cosine."""
    train, test = split_items(specs, "train"), split_items(specs, split)
    pool = lambda f: torch.nn.functional.normalize(torch.from_numpy(np.array(f)).float().mean(1), dim=1)  # noqa: E731
    sims = pool(_features(cap, test, cache_dir, workers)) @ pool(_features(cap, train, cache_dir, workers)).T
    nearest = sims.argmax(1).tolist()
    hyps = [consensus_caption(train[j].captions) for j in nearest]
    preds = [{"image": str(it.image), "caption": h, "neighbour": str(train[j].image)} for it, h, j in zip(test, hyps, nearest)]
    return EvalResult(split, len(test), score_captions(hyps, [it.captions for it in test]), preds)
