"""`captioner` command line: caption, video, cache, train, evaluate, export, export-onnx, calibrate, info.

Arguments are parsed and checked before anything heavy is imported (torch, timm, gradio: seconds), so
`--help` and usage errors return at once; see cliargs.py for the shared options and the exit codes
(0 all good, 1 nothing could be done, 2 usage error, 3 some inputs failed, 130 interrupted).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..errors import CaptionerError
from ..options import (
    BEAM,
    EXIT_EPILOG,
    EXIT_INTERRUPTED,
    MAX_LEN,
    NON_NEGATIVE,
    POSITIVE,
    WORKERS,
    Parser,
    Range,
    UsageError,
    add_common_args,
    add_model_args,
    add_search_args,
    parse_bool,
    progress_disabled,
    search_kwargs,
    usage_error,
)

log = logging.getLogger("captioner")


# --------------------------------------------------------------------------- train ------
# Allowed values of train's numeric settings (the others: any value of their type).
TRAIN_RANGES: dict[str, Range] = {
    "finetune": NON_NEGATIVE, "finetune_lr": Range(float, 0),
    "views": POSITIVE, "text_ratio": Range(float, 0), "min_count": POSITIVE, "max_len": MAX_LEN,
    "feat_proj": NON_NEGATIVE, "embed_dim": POSITIVE, "hidden_dim": POSITIVE, "attn_dim": POSITIVE,
    "dropout": Range(float, 0, 1, hi_open=True), "epochs": POSITIVE, "batch_size": POSITIVE,
    "lr": Range(float, 0, lo_open=True), "weight_decay": Range(float, 0), "alpha_c": Range(float, 0),
    "label_smoothing": Range(float, 0, 1, hi_open=True), "grad_clip": Range(float, 0, lo_open=True),
    "ema": Range(float, 0, 1, hi_open=True), "lr_factor": Range(float, 0, 1, lo_open=True),
    "lr_patience": NON_NEGATIVE, "patience": POSITIVE, "beam": BEAM, "length_penalty": Range(float, 0, 5),
    "seed": NON_NEGATIVE, "num_workers": WORKERS, "time_limit_min": Range(float, 0), "scst_samples": POSITIVE,
    "scst_bleu": Range(float, 0), "ram_gb": Range(float, 0), "threads": Range(int, 0, 1024),
}
TRAIN_CHOICES: dict[str, tuple] = {"grid": (7, 14), "resize": ("crop", "squash"), "penalty": ("mean", "sum"),
                                   "init_state": ("image", "learned"), "select": ("bleu4", "cider")}


def train_fields() -> list[tuple[str, Any, str]]:
    """(name, default, description) of every TrainConfig field, read from train.py's source without
    importing it: the description is the field's trailing `# comment`, the one description of a setting."""
    source = Path(find_spec("captioner.training.train").origin).read_text(encoding="utf-8")
    lines = source.splitlines()
    cls = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
    found = []
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name) or node.value is None:
            continue
        try:
            default = ast.literal_eval(node.value)
        except ValueError:  # field(default_factory=...): not a command-line setting
            continue
        line = lines[node.lineno - 1]
        found.append((node.target.id, default, line.split("#", 1)[1].strip() if "#" in line else ""))
    return found


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a captioning model on cached encoder features", epilog=EXIT_EPILOG,
                       description="Train the attention decoder on one or more datasets (one shared vocabulary). "
                                   "Features of the frozen encoder are cached under --cache-dir. Early stopping "
                                   "on validation BLEU-4 from beam decoding. Works under torchrun (DDP).")
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH",
                   help="dataset, repeatable; KIND: karpathy, flickr8k, coco, table (csv/jsonl); detected if omitted")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    for name, default, note in train_fields():
        flag = "--" + name.replace("_", "-")
        limit = TRAIN_RANGES.get(name)
        if name in TRAIN_CHOICES:
            p.add_argument(flag, type=type(default), choices=TRAIN_CHOICES[name], default=default,
                           help=f"{note} (default: {default})")
        elif isinstance(default, bool):
            p.add_argument(flag, type=parse_bool, default=default, metavar="BOOL", help=f"{note} (default: {default})")
        else:
            rng = f", {limit.describe()}" if limit else ""
            p.add_argument(flag, type=limit or type(default), default=default,
                           help=f"{note} (default: {default}{rng})".replace("%", "%%"))
    add_common_args(p)
    p.set_defaults(func=_run_train, parser=p, needs_torch=True)


def _run_train(args: argparse.Namespace) -> int:
    from ..training.train import config_from_args, train

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
    p.add_argument("--views", type=POSITIVE, default=1, help=f"cached views of each training image, {POSITIVE.describe()} (default: 1)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder name, as for train")
    p.add_argument("--grid", type=int, default=7, choices=(7, 14), help="annotation grid (default: 7)")
    p.add_argument("--resize", default="crop", choices=("crop", "squash"), help="how images become square (default: crop)")
    p.add_argument("--finetune", type=NON_NEGATIVE, default=0,
                   help="cache the trunk activations that `train --finetune N` reads instead of the features (default: 0)")
    p.add_argument("--cache-dir", default="cache", help="cache folder (default: cache)")
    p.add_argument("--workers", type=WORKERS, default=2, help=f"image-loading processes, {WORKERS.describe()} (default: 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default: cpu)")
    add_common_args(p)
    p.set_defaults(func=_run_cache, parser=p, needs_torch=True)


def _run_cache(args: argparse.Namespace) -> int:
    from ..training.train import TrainConfig, cache_all

    cfg = TrainConfig(data=args.data, encoder=args.encoder, grid=args.grid, resize=args.resize, views=args.views,
                      finetune=args.finetune, cache_dir=args.cache_dir, num_workers=args.workers, device=args.device)
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
                                   "coco-caption compatible BLEU-1..4 (0-1 scale), nltk BLEU, CIDEr-D and ROUGE-L.",
                       epilog=EXIT_EPILOG)
    p.add_argument("--data", action="append", required=True, metavar="[KIND:]PATH", help="dataset(s), as for train")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("-o", "--output", type=Path, default=None, help="per-image predictions (JSONL)")
    p.add_argument("--baseline", action="store_true", help="also score the nearest-neighbour baseline")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"))
    p.add_argument("--workers", type=WORKERS, default=2, help=f"image-loading processes, {WORKERS.describe()} (default 2)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--meteor", action="store_true", help="also METEOR (pycocoevalcap's jar; needs Java)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="encoder precision: fp32 (default: the same features, so the same scores, on every CPU, "
                        "as training caches them) or bf16 (what `caption` runs on CPUs with AMX / AVX512-BF16)")
    add_model_args(p)
    add_search_args(p)
    add_common_args(p)
    p.set_defaults(func=_run_evaluate, parser=p, needs_torch=True)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ..pipeline.captioner import Captioner
    from ..training.evaluate import evaluate, nearest_neighbour
    from ..training.metrics import format_scores

    cap = Captioner.load(args.model, args.device, prepare=False)  # fp32: the features training cached
    cap.encoder.prepare_inference(cap.device, bf16=args.precision == "bf16")
    res = evaluate(cap, args.data, args.split, args.output, args.cache_dir, args.workers, meteor=args.meteor,
                   **search_kwargs(args))
    report = {"split": res.split, "images": res.images, "beam": cap.search_config(**search_kwargs(args)).beam,
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
        print(f"attention:        mean peak weight per word {res.scores['attention_peak']:.3f}, entropy "
              f"{res.scores['attention_entropy']:.3f} nats (uniform over {cap.encoder.config.grid ** 2} cells: "
              f"{cap.encoder.config.grid ** -2:.3f}, {2 * math.log(cap.encoder.config.grid):.3f})")
        if args.baseline:
            print("nearest neighbour: " + format_scores(report["nearest_neighbour"]))
    return 0


# -------------------------------------------------------------------------- export ------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="strip a training checkpoint to a small fp16 model file", epilog=EXIT_EPILOG,
                       description="Write SRC's decoder, vocabulary and settings (no optimiser state) to DST, "
                                   "fp16 unless --fp32; the decoding options become DST's defaults.")
    p.add_argument("src", type=Path, help="a training checkpoint (best.pt, last.pt)")
    p.add_argument("dst", type=Path, help="the model file to write")
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    add_search_args(p)
    add_common_args(p)
    p.set_defaults(func=_run_export, parser=p, needs_torch=True)


def _run_export(args: argparse.Namespace) -> int:
    from ..training.train import export

    overrides = {k: v for k, v in search_kwargs(args).items() if v is not None}
    dst = export(args.src, args.dst, half=not args.fp32, search_overrides=overrides)
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _add_export_onnx(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-onnx", help="write a model as ONNX files that caption without torch", epilog=EXIT_EPILOG,
                       description="Write CHECKPOINT's encoder (prepared, fp32), the decoder's prepare and step as "
                                   "ONNX files, and model.json (vocabulary, preprocessing, search defaults), into "
                                   "OUT_DIR: what the light captioner (captioner.lite) runs with ONNX Runtime and "
                                   "NumPy alone. Weights that are fp16 numbers already are stored as fp16 (the "
                                   "same results); --fp16 rounds every weight (smaller, not the same numbers).")
    p.add_argument("checkpoint", type=Path, help="a model file or training checkpoint (the shipped model.pt, best.pt)")
    p.add_argument("out_dir", type=Path, help="the folder to write the bundle into")
    p.add_argument("--fp16", action="store_true", help="store every weight as fp16 (the sessions still run in fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace a bundle already in OUT_DIR")
    add_common_args(p)
    p.set_defaults(func=_run_export_onnx, parser=p, needs_torch=True)


def _run_export_onnx(args: argparse.Namespace) -> int:
    from ..training.bundle import export_bundle

    manifest = export_bundle(args.checkpoint, args.out_dir, fp16=args.fp16, overwrite=args.overwrite)
    size = lambda f: f["bytes"] + f.get("data", {}).get("bytes", 0)  # noqa: E731 - the graph and its weights
    sizes = ", ".join(f"{f['file']} {size(f) / 2**20:.1f} MiB" for f in manifest["files"].values())
    total = sum(size(f) for f in manifest["files"].values())
    print(f"wrote {args.out_dir}: {sizes}; {total / 2**20:.1f} MiB in all ({manifest['weights'].split(' ', 1)[0]} weights)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..media.library import add_search_parser
    from .backend import add_calibrate_parser, add_info_parser
    from .caption import add_caption_parser
    from .video import add_video_parser

    parser = Parser(
        prog="captioner", epilog=EXIT_EPILOG,
        description="Offline image and video captioning (EfficientNet-Lite encoder + Show-Attend-Tell decoder). "
                    "Run `captioner COMMAND --help` for each command.")
    parser.add_argument("--version", action="version", version=f"captioner {__version__}")
    add_common_args(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_caption_parser(sub)
    add_search_parser(sub)
    add_video_parser(sub)
    _add_cache(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_export(sub)
    _add_export_onnx(sub)
    add_calibrate_parser(sub)
    add_info_parser(sub)
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """-q: warnings and errors; default: captioner's notes; -v: captioner's debug lines too; -vv: every library's
    debug log as well (Pillow's plugin imports etc. are no business of -v)."""
    verbose = args.verbose or 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.DEBUG if verbose >= 2 else logging.INFO,
                        format="%(message)s")
    if verbose == 1 and not args.quiet:
        log.setLevel(logging.DEBUG)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (`kill`, `timeout`, a job scheduler) unwinds the command as Ctrl-C does, so that its worker
    processes are stopped and finished work is kept; the default action would leave the workers orphaned."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """While the command runs, SIGTERM raises KeyboardInterrupt (main thread only: signal handlers live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Parse, check, then run the command: returns its exit code (cliargs.EXIT_CODES); nothing heavy is
    imported before the arguments are known to be valid."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        check = getattr(args, "check", None)
        if check is not None:
            check(args)  # options that do not go together: UsageError
    except UsageError as exc:
        return usage_error(exc.parser or getattr(args, "parser", parser), str(exc))
    except CaptionerError as exc:  # e.g. an existing output without --resume/--overwrite: exit 2, one line
        print(f"captioner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    _setup_logging(args)
    try:
        if getattr(args, "needs_torch", False):  # the light install has the captioning commands only
            from ..pipeline.load import require_torch

            require_torch(f"`captioner {args.command}`")
        with progress_disabled(args.no_progress), _sigterm_interrupts():
            return int(args.func(args) or 0)
    except CaptionerError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
