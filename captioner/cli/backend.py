"""`captioner info` (this CPU, the versions, the encoder backend auto picks) and `captioner calibrate` (the int8
encoder, from real images). Standard library only at import: the work is in backends.py and onnx_encoder.py."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Iterator

from ..errors import CaptionerError
from ..options import EXIT_EPILOG, POSITIVE, Range, add_common_args

CALIBRATION_COUNT = 200
CALIBRATION_BATCH = Range(int, 1, 64)


def add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="this CPU, its vector ISA, the versions and the encoder backend auto picks",
                       description="Print the captioner version, the CPU and its vector ISA, whether it has fast "
                                   "bf16, the torch and onnxruntime versions, the model, and the encoder backend "
                                   "that `--backend auto` picks here with the ms per image it measured. Offline.",
                       epilog=EXIT_EPILOG)
    p.add_argument("--model", type=Path, default=None,
                   help="a model bundle folder or a checkpoint (.pt); default: the model shipped in the package")
    p.add_argument("--measure", action="store_true",
                   help="measure the backends now if they have not been measured on this CPU (once; ~20 s)")
    add_common_args(p)
    p.set_defaults(func=run_info, parser=p)


def run_info(args: argparse.Namespace) -> int:
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
    p.set_defaults(func=run_calibrate, parser=p, needs_torch=True)


def spread(items: list, count: int) -> list:
    """`count` items evenly spaced over `items` (all of them when there are fewer): a dataset's sorted files are
    often grouped by class, so the first N would calibrate on one kind of scene."""
    if len(items) <= count:
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def calibration_batches(cap: "object", paths: list[Path], batch_size: int) -> Iterator["object"]:
    """Preprocessed batches of the readable images among `paths`; an unreadable one is named on stderr, skipped."""
    import torch

    from ..media.images import display_name, load_image

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
    from ..media.images import find_images
    from ..pipeline.captioner import Captioner
    from ..runtime.onnx_encoder import quantize

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


def info(model: Path | None, measure_now: bool = False, root: Path | None = None) -> list[str]:
    """`captioner info`: the lines it prints. Nothing here needs the network; a model that cannot be loaded is
    reported on its line, the others are printed all the same. Without torch (the light install) it says what
    runs by default and that the torch backends need captioner[train]."""
    from .. import __version__
    from ..cpu import describe, has_fast_bf16, vector_isa
    from ..lite.captioner import import_ort
    from ..options import cache_root
    from ..pipeline.load import (
        TRAIN_EXTRA,
        default_model,
        has_torch,
        is_light,
        load_captioner,
    )

    try:
        ort = import_ort().__version__
    except CaptionerError:
        ort = None
    torch = None
    if has_torch():
        import torch
    kernels = f" (torch kernels: {torch.backends.cpu.get_cpu_capability()})" if torch else ""
    lines = [f"captioner {__version__}",
             f"cpu: {describe()}",
             f"vector ISA: {' '.join(vector_isa()) or 'none of AVX2, AVX-512, AVX512-BF16, AMX'}{kernels}",
             f"versions: torch {torch.__version__ if torch else 'not installed (the light install)'}, onnxruntime "
             f"{ort or 'not installed'}, python {platform.python_version()}",
             f"cache: {root or cache_root()}"]
    if model is None or is_light(model):
        path = Path(model) if model else default_model()
        try:
            light = load_captioner(path)
            lines.append(f"model: {path} ({light.model_id})")
        except CaptionerError as exc:
            lines.append(f"model: {path} (cannot be loaded: {exc})")
        lines.append("backend (default, onnx): the model bundle in ONNX Runtime, fp32: the same captions on every CPU")
        if torch is None:
            return lines + [f"backends torch, auto, compiled, --int8: need torch ({TRAIN_EXTRA})"]
        model = None  # the torch backends' lines below are about the shipped checkpoint
    return lines + _torch_info(model, measure_now, root, has_fast_bf16())


def _torch_info(model: Path | None, measure_now: bool, root: Path | None, bf16: bool) -> list[str]:
    """The torch backends' lines: the checkpoint, what --backend auto picks here, the int8 encoder."""
    from ..pipeline.captioner import Captioner
    from ..pipeline.load import default_model
    from ..runtime.backends import MEASURE_BATCH, choose, known_choice
    from ..runtime.onnx_encoder import (
        check_int8,
        export_path,
        onnxruntime_version,
        read_record,
    )

    lines = [f"fast bf16: {'yes' if bf16 else 'no'} (--backend torch and auto encode in {'bf16' if bf16 else 'fp32'} "
             "on this CPU)"]
    path = Path(model) if model else default_model("auto")
    try:
        cap = Captioner.load(path, prepare=False)
        cap.encoder.prepare_inference(cap.device, bf16=False)
    except CaptionerError as exc:
        return lines + [f"checkpoint: {path} (cannot be loaded: {exc})", "backend (auto): unknown without a model"]
    lines.append(f"checkpoint (torch backends): {path} ({cap.model_id})")
    choice = choose(cap, root) if measure_now else known_choice(cap, root)
    if choice is None:
        lines.append("backend (auto): not measured yet on this CPU for this model; the first `captioner caption "
                     "--backend auto` or `video --backend auto` measures it (once), or run `captioner info --measure`")
    else:
        ms = ", ".join(f"{name} {value:.1f} ms/img" for name, value in choice.ms_per_image.items())
        lines.append(f"encoder backend (auto): {choice.backend} ({choice.reason}"
                     + (f"; one thread, batches of {MEASURE_BATCH}: {ms}" if ms else "") + ")")
        ms = ", ".join(f"{name} {value:.2f} ms" for name, value in choice.decoder_ms_per_step.items())
        lines.append(f"decoder backend (auto): {choice.decoder} ({choice.decoder_reason}"
                     + (f"; one thread, a step of {MEASURE_BATCH * 3} rows: {ms}" if ms else "") + ")"
                     + (f" [{choice.record}]" if choice.record else ""))
    if onnxruntime_version() is not None and cap.device.type == "cpu" and any(True for _ in cap.encoder.net.parameters()):
        fp32 = export_path(cap.encoder, cap.input_size(), root)
        try:
            int8 = check_int8(fp32, cap.model_id)
            lines.append(f"int8 (--int8): calibrated on {(read_record(int8) or {}).get('calibration_images', '?')} "
                         f"images [{int8}]")
        except CaptionerError:
            lines.append("int8 (--int8): not calibrated (captioner calibrate FOLDER)")
    return lines
