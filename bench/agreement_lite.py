"""Does the light captioner (issue 26: captioner.lite, no torch) give today's captions?

Exports the model as bundles (`captioner export-onnx`: fp32, and --fp16 with every weight rounded to fp16), then
captions a dataset split with today's fp32 ONNX Runtime path (`Captioner.load(backend="onnx")`: the reference) and
with `LiteCaptioner` on each bundle, all at one thread. For each bundle it reports, against the reference: the
largest feature difference, how many captions are identical (and what share), the BLEU-4 delta (coco-compatible),
and the first captions that differ. The issue asks >= 99% identical and BLEU-4 within 0.001. The CPU is named.

    .venv/bin/python bench/agreement_lite.py --data flickr8k:../shared/data/flickr8k --data coco:../shared/data/coco
    .venv/bin/python bench/agreement_lite.py --data flickr8k:../shared/data/flickr8k --limit 50   # a quick check
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from agreement import emit, parser, split_images  # bench/agreement.py: the shared options and report
from captioner.cpu import describe
from captioner.lite.captioner import LiteCaptioner
from captioner.pipeline.captioner import Captioner
from captioner.training.bundle import export_bundle
from captioner.training.metrics import score_captions

CHUNK = 32


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--bundles", type=Path, default=None, help="export the bundles here (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as each caption worker runs
    items, images, refs = split_images(args)
    with tempfile.TemporaryDirectory(prefix="bundles-") as tmp:
        root = args.bundles or Path(tmp)
        sizes = {}
        for name, fp16 in (("lite-fp32", False), ("lite-fp16", True)):
            manifest = export_bundle(args.model, root / name, fp16=fp16, overwrite=True)
            sizes[name] = sum(f["bytes"] for f in manifest["files"].values())
        cap = Captioner.load(args.model, backend="onnx")
        cfg = cap.search_config(beam=args.beam)
        feats = {"onnx": [], "lite-fp32": [], "lite-fp16": []}
        texts = {k: [] for k in feats}
        for i in range(0, len(images), CHUNK):
            f = cap.encode(cap.preprocess(images[i:i + CHUNK]))
            feats["onnx"].append(f.numpy())
            texts["onnx"] += [c.text for c in cap.caption_features(f, cfg)]
        for name in ("lite-fp32", "lite-fp16"):
            lite = LiteCaptioner.load(root / name, threads=1)
            lcfg = lite.search_config(beam=args.beam)
            for i in range(0, len(images), CHUNK):
                f = lite.encode(lite.preprocess(images[i:i + CHUNK]))
                feats[name].append(f)
                texts[name] += [c.text for c in lite.caption_features(f, lcfg)]
    scores = {k: score_captions(v, refs) for k, v in texts.items()}
    out = {"data": args.data, "split": args.split, "images": len(items), "beam": args.beam,
           "model": str(args.model or "shipped"), "cpu": describe(), "reference": "onnx (Captioner.load(backend='onnx'))",
           "onnx": scores["onnx"]}
    ref = np.concatenate(feats["onnx"]) if feats["onnx"] else np.zeros(0)
    for name in ("lite-fp32", "lite-fp16"):
        mine = np.concatenate(feats[name]) if feats[name] else np.zeros(0)
        same = sum(a == b for a, b in zip(texts["onnx"], texts[name]))
        out[name] = {"bundle_bytes": sizes[name], "feature_max_abs_diff": float(np.abs(mine - ref).max()) if ref.size else 0.0,
                     "identical_captions": same, "identical_share": round(same / max(1, len(items)), 4),
                     "bleu4_delta": round(scores[name]["BLEU-4"] - scores["onnx"]["BLEU-4"], 5),
                     "differences": [{"image": Path(it.image).name, "onnx": a, name: b}
                                     for it, a, b in zip(items, texts["onnx"], texts[name]) if a != b][:10],
                     "scores": scores[name]}
    emit(out, args.json)


if __name__ == "__main__":
    main()
