"""`captioner info` (this CPU, the versions, the encoder backend auto picks) and `captioner calibrate` (the int8
encoder, from real images). Standard library only at import: the work is in backends.py and onnx_encoder.py."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator

from .cliargs import EXIT_EPILOG, POSITIVE, Range, add_common_args
from .errors import CaptionerError

CALIBRATION_COUNT = 200
CALIBRATION_BATCH = Range(int, 1, 64)


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="this CPU, its vector ISA, the versions and the encoder backend auto picks",
                       description="Print the captioner version, the CPU and its vector ISA, whether it has fast "
                                   "bf16, the torch and onnxruntime versions, the model, and the encoder backend "
                                   "that `--backend auto` picks here with the ms per image it measured. Offline.",
                       epilog=EXIT_EPILOG)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (.pt); default: the model shipped in the package")
    p.add_argument("--measure", action="store_true",
                   help="measure the backends now if they have not been measured on this CPU (once; ~20 s)")
    add_common_args(p)
    p.set_defaults(func=run_info, parser=p)


def run_info(args: argparse.Namespace) -> int:
    from .backends import info

    for line in info(args.model, measure_now=args.measure):
        print(line)
    return 0


def add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="make the int8 encoder (--int8) from real images",
                       description="Static int8 quantization of the ONNX encoder (QDQ, per-channel weights), "
                                   "calibrated on COUNT images spread evenly over the sorted PATHs (e.g. a "
                                   "dataset's training images); stored beside the fp32 export in the cache, "
                                   "used by `caption --int8` and `video --int8`.", epilog=EXIT_EPILOG)
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders, glob patterns (quoted)")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders")
    p.add_argument("--count", type=POSITIVE, default=CALIBRATION_COUNT,
                   help=f"calibration images, {POSITIVE.describe()} (default {CALIBRATION_COUNT})")
    p.add_argument("--batch-size", type=CALIBRATION_BATCH, default=8,
                   help=f"images per calibration batch, {CALIBRATION_BATCH.describe()} (default 8)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (.pt); default: the model shipped in the package")
    add_common_args(p)
    p.set_defaults(func=run_calibrate, parser=p)


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when there are fewer): a dataset's sorted files are
    often grouped by class, so the first N would calibrate on one kind of scene."""
    if len(items) <= count:
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def calibration_batches(cap: "object", paths: list[Path], batch_size: int) -> Iterator["object"]:
    """Preprocessed batches of the readable images among `paths`; an unreadable one is named on stderr, skipped."""
    import torch

    from .images import display_name, load_image

    batch = []
    for path in paths:
        try:
            batch.append(cap.transform(load_image(path)))
        except Exception as exc:  # noqa: BLE001 - a bad file is skipped, calibration goes on
            print(f"captioner: {display_name(path)}: skipped ({' '.join(str(exc).split())[:200]})", file=sys.stderr)
            continue
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def run_calibrate(args: argparse.Namespace) -> int:
    from .images import find_images
    from .model import Captioner
    from .onnx_encoder import quantize

    paths, errors = find_images(args.inputs, args.recursive, [])
    for name, msg in errors:
        print(f"captioner: {name}: {msg}", file=sys.stderr)
    if not paths:
        raise CaptionerError("no images to calibrate on" + ("" if errors else " (--recursive for subfolders?)"))
    chosen = spread(sorted(paths), args.count)
    cap = Captioner.load(args.model, "cpu", backend="onnx")
    path, used = quantize(cap.compiled.path, calibration_batches(cap, chosen, args.batch_size), cap.model_id,
                          {"calibration_of": len(paths), "calibration_inputs": [str(p) for p in args.inputs]})
    print(f"int8 encoder calibrated on {used} images (of {len(paths)} found): {path}")
    return 0
