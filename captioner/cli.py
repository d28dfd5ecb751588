"""`captioner` command line: caption, video, cache, train, evaluate, export.

Exit codes: 0 success, 1 error (one line on stderr, no traceback), 2 usage error,
3 some inputs failed (batch runs), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from .errors import CaptionerError

log = logging.getLogger("captioner")


def _add_search_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--beam", type=int, default=None, help="beam size (1 = greedy; default: the model's, usually 3)")
    g.add_argument("--max-len", type=int, default=None, help="maximum caption length in words")
    g.add_argument("--length-penalty", type=float, default=None, help="rank beams by logprob / len**P (default: model's)")
    g.add_argument("--no-repeat-ngram", type=int, default=None, help="forbid repeating n-grams of this size")


def _search_kwargs(args: argparse.Namespace) -> dict:
    return {"beam": args.beam, "max_len": args.max_len, "length_penalty": args.length_penalty,
            "no_repeat_ngram": args.no_repeat_ngram}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="checkpoint (.pt); default: the model shipped in the package")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")


# --------------------------------------------------------------------------- train ------
def _field_comments(cls: type) -> dict[str, str]:
    """Each dataclass field's trailing `# comment` in the source: the one description of a setting."""
    import inspect
    import re

    found = (re.match(r"\s+(\w+): [^#]+#\s*(.+)", line) for line in inspect.getsource(cls).splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a captioning model on cached encoder features",
                       description="Train the attention decoder on one or more datasets (one shared vocabulary). "
                                   "Features of the frozen encoder are cached under --cache-dir. Early stopping "
                                   "on validation BLEU-4 from beam decoding. Works under torchrun (DDP).")
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH",
                   help="dataset, repeatable; KIND: karpathy, flickr8k, coco, table (csv/jsonl); detected if omitted")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    defaults, notes = TrainConfig(), _field_comments(TrainConfig)
    for f in fields(TrainConfig):
        if f.name == "data":
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=default, metavar="BOOL",
                           help=f"{notes.get(f.name, '')} (default: {default})")
        else:
            p.add_argument(flag, type=type(default), default=default, help=f"{notes.get(f.name, '')} (default: {default})")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import config_from_args, train

    cfg = config_from_args(vars(args))
    best = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"best checkpoint: {best}")
    return 0


# --------------------------------------------------------------------------- cache ------
def _add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="encode a dataset's images into the feature cache (the first stage of train)",
                       description="Fill the feature cache that `captioner train` and `captioner evaluate` read: the "
                                   "training split's views and the val/test features, fp32 with the encoder's "
                                   "BatchNorm folded (the same on every CPU). Run it alone so that encoding and "
                                   "training can happen on different machines or at different thread counts.")
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH", help="dataset(s), as for train")
    p.add_argument("--views", type=int, default=1, help="cached views of each training image (default: 1)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder name, as for train")
    p.add_argument("--grid", type=int, default=7, choices=(7, 14), help="annotation grid (default: 7)")
    p.add_argument("--resize", default="crop", choices=("crop", "squash"), help="how images become square (default: crop)")
    p.add_argument("--cache-dir", default="cache", help="cache folder (default: cache)")
    p.add_argument("--workers", type=int, default=2, help="image-loading processes (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    p.set_defaults(func=_run_cache)


def _run_cache(args: argparse.Namespace) -> int:
    from .train import TrainConfig, cache_all

    if args.views < 1:
        raise CaptionerError("--views must be at least 1")
    cfg = TrainConfig(data=args.data, encoder=args.encoder, grid=args.grid, resize=args.resize, views=args.views,
                      cache_dir=args.cache_dir, num_workers=args.workers, device=args.device)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # under torchrun every rank encodes its shard of each split (data.cache_features)
        import torch.distributed as dist

        dist.init_process_group("gloo")
    try:
        cached = cache_all(cfg)
    finally:
        if distributed:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        for split, arrays in cached.items():
            print(f"{split}: {len(arrays)} view(s) of {len(arrays[0])} images cached in {args.cache_dir}")
    return 0


# ------------------------------------------------------------------------ evaluate ------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="decode a split and print BLEU-1..4 (+ CIDEr-D, ROUGE-L)",
                       description="Decode every image of a split, write per-image predictions (JSONL) and print "
                                   "coco-caption compatible BLEU-1..4 (0-1 scale), nltk BLEU, CIDEr-D and ROUGE-L.")
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH", help="dataset(s), as for train")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("-o", "--output", type=Path, default=None, help="per-image predictions (JSONL)")
    p.add_argument("--baseline", action="store_true", help="also score the nearest-neighbour baseline")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--meteor", action="store_true", help="also METEOR (pycocoevalcap's jar; needs Java)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="encoder precision: fp32 (default: the same features, so the same scores, on every CPU, "
                        "as training caches them) or bf16 (what `caption` runs on CPUs with AMX / AVX512-BF16)")
    _add_model_args(p)
    _add_search_args(p)
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, nearest_neighbour
    from .metrics import format_scores
    from .model import Captioner

    cap = Captioner.load(args.model, args.device, prepare=False)  # fp32: the features training cached
    cap.encoder.prepare_inference(cap.device, bf16=args.precision == "bf16")
    res = evaluate(cap, args.data, args.split, args.output, args.cache_dir, args.workers, meteor=args.meteor,
                   **_search_kwargs(args))
    report = {"split": res.split, "images": res.images, "beam": cap.search_config(**_search_kwargs(args)).beam,
              "precision": args.precision, "model": res.scores}
    if args.baseline:
        report["nearest_neighbour"] = nearest_neighbour(cap, args.data, args.split, args.cache_dir, args.workers).scores
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{res.split}: {res.images} images, beam {report['beam']}, encoder {args.precision}")
        print("model:            " + format_scores(res.scores))
        print(f"faults:           {res.scores['repeat_rate']:.1%} of captions repeat a content word, "
              f"{res.scores['unk_rate']:.1%} contain <unk>")
        if args.baseline:
            print("nearest neighbour: " + format_scores(report["nearest_neighbour"]))
    return 0


# -------------------------------------------------------------------------- export ------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="strip a training checkpoint to a small fp16 model file")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    _add_search_args(p)
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .train import export

    overrides = {k: v for k, v in _search_kwargs(args).items() if v is not None}
    dst = export(args.src, args.dst, half=not args.fp32, search_overrides=overrides)
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Offline image and video captioning (EfficientNet-Lite encoder + Show-Attend-Tell decoder). "
                    "Run `captioner COMMAND --help` for each command.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from .batch import add_caption_parser
    from .library import add_search_parser
    from .videocli import add_video_parser

    add_caption_parser(sub)
    add_search_parser(sub)
    add_video_parser(sub)
    _add_cache(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except CaptionerError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
