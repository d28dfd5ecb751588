"""Do captions change with another encoder backend (`--compile`, `--backend onnx`, `--int8`)?

Captions a dataset split with the same model once per backend: the eager prepared torch encoder (the reference:
bf16 on CPUs with AMX / AVX512-BF16, fp32 elsewhere), and each of --backends: compiled (captioner/runtime/compiled.py),
onnx (fp32 in ONNX Runtime), onnx-int8 (its calibrated int8 model), fp32 (the prepared torch network without bf16,
what onnx reproduces). For each it reports, against eager: the largest feature difference and the lowest (and
mean) cosine between the annotation vectors, how many captions are identical (and what share), and the scores of
both against the references (coco-compatible BLEU, CIDEr-D, ROUGE-L) with the BLEU-4 delta; onnx-int8, when onnx
runs too, also against onnx (its own fp32 model: what --int8 changes on a CPU whose default encoder is fp32). Validation splits only: this is how
the options were checked. The CPU is named in the output.

    .venv/bin/python bench/agreement.py --data flickr8k:../shared/data/flickr8k --data coco:../shared/data/coco
    .venv/bin/python bench/agreement.py --data ../shared/data/ucm-captions --model runs/ucm/best.pt
    .venv/bin/python bench/agreement.py --data flickr8k:../shared/data/flickr8k --backends onnx onnx-int8 \
        --calibrate 200 --json bench/agreement-int8-general.json

--calibrate N first makes the int8 model from N training images spread evenly over the training split (as
`captioner calibrate` does); without it, onnx-int8 uses the one already calibrated (`captioner calibrate FOLDER`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from captioner.cli.backend import calibration_batches, spread
from captioner.cpu import describe
from captioner.training.evaluate import split_items
from captioner.media.images import load_image
from captioner.training.metrics import score_captions
from captioner.pipeline.captioner import Captioner

BACKENDS = ("compiled", "onnx", "onnx-int8", "fp32")


def parser(doc: str) -> argparse.ArgumentParser:
    """The options every agreement script shares: the split, the model, the beam, a limit and --json."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped model)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="only the first N images of the split (a quick check)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def split_images(args: argparse.Namespace) -> tuple[list, list, list]:
    """The split's items (the first --limit), their decoded images and their reference captions."""
    items = split_items(args.data, args.split)
    items = items[:args.limit] if args.limit else items
    return items, [load_image(it.image) for it in items], [it.captions for it in items]


def emit(out: dict, path: Path | None) -> None:
    """The report on stdout, and in --json's file when given."""
    json.dump(out, sys.stdout, indent=1)
    print()
    if path:
        path.write_text(json.dumps(out, indent=1) + "\n")


def load(model: Path | None, backend: str) -> Captioner:
    """The captioner whose encoder is `backend` (eager: the default prepared torch network)."""
    if backend == "eager":
        return Captioner.load(model, backend="torch")
    if backend == "fp32":  # BatchNorm folded, fp32 weights and no autocast, on every CPU
        cap = Captioner.load(model, prepare=False)
        cap.encoder.prepare_inference(cap.device, bf16=False)
        cap.compiled = lambda x: cap.encoder.forward_prepared(x)[0]
        return cap
    if backend == "compiled":
        return Captioner.load(model, backend="compiled")
    return Captioner.load(model, backend="onnx", int8=backend == "onnx-int8")


def calibrate(model: Path | None, data: list[str], count: int) -> dict:
    from captioner.runtime.onnx_encoder import quantize

    train = spread([it.image for it in split_items(data, "train")], count)
    cap = Captioner.load(model, backend="onnx")
    path, used = quantize(cap.compiled.path, calibration_batches(cap, train, 8), cap.model_id,
                          {"calibration_of": "train split", "calibration_inputs": data})
    print(f"int8 encoder calibrated on {used} training images: {path}", file=sys.stderr)
    return {"images": used, "split": "train", "path": str(path)}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["compiled"],
                   help="compared against eager (default: compiled)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="first calibrate the int8 model on N training images (for onnx-int8)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as each caption worker runs
    calibration = calibrate(args.model, args.data, args.calibrate) if args.calibrate else None
    items, images, refs = split_images(args)
    feats, texts, scores = {}, {}, {}
    for backend in ["eager", *args.backends]:
        cap = load(args.model, backend)
        cfg = cap.search_config(beam=args.beam)
        feats[backend] = torch.cat([cap.encode(cap.preprocess(images[i:i + 32])) for i in range(0, len(images), 32)])
        texts[backend] = [c.text for f in feats[backend].split(32) for c in cap.caption_features(f, cfg)]
        scores[backend] = score_captions(texts[backend], refs)
    out = {"data": args.data, "split": args.split, "images": len(items), "beam": args.beam,
           "model": str(args.model or "shipped"), "cpu": describe(), "torch": torch.__version__,
           "eager": scores["eager"], "calibration": calibration}
    def against(ref: str, backend: str) -> dict:
        a, b = feats[ref].flatten(1), feats[backend].flatten(1)
        cos = torch.nn.functional.cosine_similarity(a, b)
        same = sum(x == y for x, y in zip(texts[ref], texts[backend]))
        return {"feature_max_abs_diff": float((a - b).abs().max()), "feature_min_cosine": float(cos.min()),
                "feature_mean_cosine": float(cos.mean()), "identical_captions": same,
                "identical_share": round(same / max(1, len(items)), 4),
                "bleu4_delta": round(scores[backend]["BLEU-4"] - scores[ref]["BLEU-4"], 5)}

    for backend in args.backends:
        out[backend] = {**against("eager", backend), "scores": scores[backend]}
    if "onnx-int8" in args.backends and "onnx" in args.backends:  # int8 against its own fp32 model: what --int8
        out["onnx-int8"]["against_onnx"] = against("onnx", "onnx-int8")  # changes where fp32 is the default
    if args.backends == ["compiled"]:  # the layout of the earlier results (agreement-*.json)
        out.update({k: out["compiled"][k] for k in ("feature_max_abs_diff", "feature_min_cosine",
                                                    "identical_captions")})
        out["compiled"] = scores["compiled"]
    emit(out, args.json)


if __name__ == "__main__":
    main()
