"""Do captions change with the ahead-of-time compiled encoder (`captioner caption --compile`)?

Captions a dataset split twice with the same model, once with the eager prepared encoder and once with the compiled
one (captioner/compiled.py), and reports: the largest feature difference and the lowest cosine between the two
encoders' annotation vectors, how many captions are identical, and the scores of both against the references
(coco-compatible BLEU, CIDEr-D, ROUGE-L). Validation splits only: this is how the option was checked.

    .venv/bin/python bench/agreement.py --data flickr8k:../shared/data/flickr8k --data coco:../shared/data/coco
    .venv/bin/python bench/agreement.py --data ../shared/data/ucm-captions --model runs/ucm/best.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from captioner.evaluate import split_items
from captioner.images import load_image
from captioner.metrics import score_captions
from captioner.model import Captioner


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)  # as each caption worker runs
    cap = Captioner.load(args.model)
    items = split_items(args.data, args.split)
    cfg = cap.search_config(beam=args.beam)
    feats, texts = {}, {}
    for mode in ("eager", "compiled"):
        if mode == "compiled":
            cap.compile_encoder()
        chunks = [cap.preprocess([load_image(it.image) for it in items[i:i + 32]]) for i in range(0, len(items), 32)]
        feats[mode] = torch.cat([cap.encode(x) for x in chunks])
        texts[mode] = [c.text for f in feats[mode].split(32) for c in cap.caption_features(f, cfg)]
    refs = [it.captions for it in items]
    a, b = feats["eager"].flatten(1), feats["compiled"].flatten(1)
    out = {"data": args.data, "split": args.split, "images": len(items), "beam": args.beam,
           "model": str(args.model or "shipped"),
           "feature_max_abs_diff": float((a - b).abs().max()),
           "feature_min_cosine": float(torch.nn.functional.cosine_similarity(a, b).min()),
           "identical_captions": sum(x == y for x, y in zip(texts["eager"], texts["compiled"])),
           "eager": score_captions(texts["eager"], refs), "compiled": score_captions(texts["compiled"], refs)}
    json.dump(out, sys.stdout, indent=1)
    print()
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
