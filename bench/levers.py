"""Decode-time levers of a trained model, measured on a validation split (never test): beam width, length
penalty, no-repeat n-gram, squash vs centre-crop resizing at inference, and the EMA weights vs the raw weights
of the same epoch. Prints one Markdown row per setting (val BLEU-4, CIDEr-D, repeat rate).

    .venv/bin/python bench/levers.py --model runs/general/best.pt [--raw runs/general/last.pt] \\
        --data flickr8k:../shared/data/flickr8k --data coco:../shared/data/coco
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import torch


def _load(path: Path, raw: bool = False):
    from captioner.pipeline.captioner import Captioner
    from captioner.model.checkpoint import load_checkpoint, save_checkpoint

    if not raw:
        cap = Captioner.load(path, prepare=False)
    else:  # the raw (not averaged) weights a --ema run keeps in last.pt's train state
        ckpt = load_checkpoint(path)
        ckpt = {k: v for k, v in ckpt.items() if k not in ("format", "train_state")} | {"decoder": ckpt["train_state"]["raw"]}
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "raw.pt", ckpt)
            cap = Captioner.load(Path(tmp) / "raw.pt", prepare=False)
    cap.encoder.prepare_inference(cap.device, bf16=False)  # fp32: the features training cached
    return cap


def row(name: str, cap, data: list[str], cache: Path, **search) -> str:
    from captioner.training.evaluate import evaluate

    res = evaluate(cap, data, "val", cache_dir=cache, workers=2, **search)
    s = res.scores
    print(f"| {name} | {s['BLEU-4']:.4f} | {s['CIDEr-D']:.3f} | {s['repeat_rate']:.1%} |", flush=True)
    return name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--raw", type=Path, default=None, help="a --ema run's last.pt: also score its raw and EMA weights")
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| setting (val split) | BLEU-4 | CIDEr-D | repeats a content word |\n|---|---|---|---|")
    cap = _load(args.model)
    for beam in (1, 3, 5):
        row(f"beam {beam}", cap, args.data, args.cache_dir, beam=beam)
    for lp in (0.5, 1.0):
        row(f"beam 3, length penalty {lp}", cap, args.data, args.cache_dir, beam=3, length_penalty=lp)
    for n in (2, 3):
        row(f"beam 3, no-repeat {n}-gram", cap, args.data, args.cache_dir, beam=3, no_repeat_ngram=n)
    for beam in (3, 5):
        row(f"beam {beam}, no repeated content word", cap, args.data, args.cache_dir, beam=beam, no_repeat_words=True)
    row("beam 5, no-repeat 2-gram", cap, args.data, args.cache_dir, beam=5, no_repeat_ngram=2)
    from captioner.model.encoder import image_transform

    cap.encoder.config = replace(cap.encoder.config, resize="squash")  # trained on crops, shown squashed images
    cap.transform = image_transform(cap.encoder.config.name, "squash")
    row("beam 3, squash at inference (trained on centre crops)", cap, args.data, args.cache_dir, beam=3)
    if args.raw:
        row("last epoch, EMA weights, beam 3", _load(args.raw), args.data, args.cache_dir, beam=3)
        row("last epoch, raw weights (no EMA), beam 3", _load(args.raw, raw=True), args.data, args.cache_dir, beam=3)


if __name__ == "__main__":
    main()
