"""How often the encoder's ImageNet labels name something people see: on the first N COCO images in
../shared/data/coco (captions.json + images/), each top-3 label counts as matching when one of its words
(3+ letters, plural allowed) appears in one of the image's 5 human captions. A lower bound on precision
("alp" for mountains, "Granny Smith" for apples do not match), printed per probability threshold; picked
captioner.media.tags.IMAGENET_MIN_PROB.

    .venv/bin/python bench/imagenet_tags.py [--images 240]   # ~1 min on one core
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.pipeline.captioner import Captioner  # noqa: E402
from captioner.media.tags import IMAGENET_MIN_PROB, IMAGENET_TOPK  # noqa: E402

COCO = ROOT.parent / "shared" / "data" / "coco"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=240)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not (COCO / "captions.json").is_file():
        sys.exit(f"needs {COCO}/captions.json and images/")
    data = json.loads((COCO / "captions.json").read_text())
    refs: dict[int, list[str]] = defaultdict(list)
    for a in data["annotations"]:
        refs[a["image_id"]].append(a["caption"].lower())
    cap = Captioner.load()
    images = data["images"][: args.images]
    rows: list[tuple[float, bool]] = []
    for i in range(0, len(images), 16):
        chunk = images[i:i + 16]
        pics = [Image.open(COCO / "images" / m["file_name"]).convert("RGB") for m in chunk]
        for m, labels in zip(chunk, cap.imagenet_labels(cap.encode(cap.preprocess(pics)), IMAGENET_TOPK)):
            text = " ".join(refs[m["id"]])
            for name, p in labels:
                words = [w for w in re.findall(r"[a-z]+", name.lower()) if len(w) > 2]
                rows.append((p, any(re.search(rf"\b{w}s?\b", text) for w in words)))
    print(f"{len(images)} COCO images, top-{IMAGENET_TOPK} labels\n")
    print("| min probability | labels per image | share matching a human caption |")
    print("|---:|---:|---:|")
    for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        kept = [hit for p, hit in rows if p >= t]
        mark = " (default)" if t == IMAGENET_MIN_PROB else ""
        print(f"| {t:g}{mark} | {len(kept) / len(images):.2f} | {sum(kept) / max(1, len(kept)):.2f} |")


if __name__ == "__main__":
    main()
