"""Qualitative samples for MODEL_CARD.md: the model's captions for the unseen photos in ../shared/data/photos, and
for randomly drawn test images (drawn from a `captioner evaluate -o preds.jsonl` file, so the test split is decoded
once) next to one of their references. Every caption here comes from the default path, as a user gets it (the
shipped bundle: ONNX Runtime, fp32; `--model` names another), not from the evaluation's cached features. Prints
Markdown tables.

    .venv/bin/python bench/samples.py --predictions runs/test-beam3.jsonl [--model M] [--flickr 10] [--coco 5]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

PHOTOS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "photos"


def photo_rows(cap, beam: int) -> list[str]:
    from captioner.media.images import load_image
    from captioner.model.vocab import tokenize
    from captioner.training.metrics import repeats_content_word

    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    out = cap.caption([load_image(p) for p in paths], beam=beam)
    return [f"| {p.name} | {c.text} | {'yes' if repeats_content_word(tokenize(c.text)) else 'no'} |"
            for p, c in zip(paths, out)]


def test_rows(cap, predictions: Path, dataset: str, n: int, seed: int, beam: int) -> list[str]:
    rows = [json.loads(line) for line in predictions.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["dataset"] == dataset]
    rng = random.Random(seed)
    picked = rng.sample(rows, min(n, len(rows)))
    refs = [rng.choice(r["references"]).strip() for r in picked]
    captions = [c.text for c in cap.caption([r["image"] for r in picked], beam=beam)]
    same = sum(c == r["caption"] for c, r in zip(captions, picked))
    print(f"{dataset}: {same} of {len(picked)} captions as `captioner evaluate` decoded them", file=sys.stderr)
    return [f"| {dataset} {Path(r['image']).stem} | {c} | {ref} |" for r, c, ref in zip(picked, captions, refs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--predictions", type=Path, required=True, help="`captioner evaluate -o` JSONL of the test split")
    p.add_argument("--model", type=Path, default=None, help="model for the photos (default: the shipped one)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--flickr", type=int, default=10)
    p.add_argument("--coco", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="which test images are drawn (default 0)")
    args = p.parse_args()
    from captioner.pipeline.load import load_captioner

    cap = load_captioner(args.model)
    print(f"model: {cap.model_id}, runtimes {cap.runtimes}", file=sys.stderr)
    print("| photo | caption | repeats a content word |\n|---|---|---|")
    print("\n".join(photo_rows(cap, args.beam)))
    print("\n| image | caption | a reference |\n|---|---|---|")
    print("\n".join(test_rows(cap, args.predictions, "flickr8k", args.flickr, args.seed, args.beam)
                    + test_rows(cap, args.predictions, "coco", args.coco, args.seed, args.beam)))


if __name__ == "__main__":
    main()
