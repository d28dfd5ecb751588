"""`captioner video FILE...`: sample frames, caption them in batches, merge into segments."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..errors import CaptionerError
from ..options import (
    BATCH_SIZE,
    DEFAULT_SCENE_THRESHOLD,
    EVERY,
    EXIT_EPILOG,
    MAX_FRAMES,
    SCENE_THRESHOLD,
    SIMILARITY,
    UsageError,
    add_backend_args,
    add_common_args,
    add_model_args,
    add_search_args,
    outcome,
    resolve_backend,
    search_kwargs,
    show_progress,
)

OUTPUTS = (".srt", ".vtt", ".json", ".csv")


def add_video_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "video", help="tag the frames of videos with timestamped captions",
        description="Sample frames every --every seconds (stream timestamps; seeks when sampling is sparse), "
                    "caption them in batches, merge consecutive frames whose captions agree into segments, and "
                    "tag each segment with objects: the nouns of its captions and the encoder's ImageNet labels "
                    "(source marked in JSON/CSV). A bad video is reported and the others still run.",
        epilog=EXIT_EPILOG)
    p.add_argument("videos", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--every", type=EVERY, default=1.0,
                   help=f"seconds between sampled frames, {EVERY.describe()} (0 only with --scenes; default 1.0)")
    p.add_argument("--scenes", action="store_true", help="also sample on scene changes")
    p.add_argument("--scene-threshold", type=SCENE_THRESHOLD, default=DEFAULT_SCENE_THRESHOLD,
                   help="a frame is a scene cut when its 16x16 colour thumbnail differs from the frame before by "
                        f"more than this (mean absolute difference), {SCENE_THRESHOLD.describe()} "
                        f"(default {DEFAULT_SCENE_THRESHOLD:g})")
    p.add_argument("--similarity", type=SIMILARITY, default=1.0,
                   help="merge consecutive captions whose word overlap (Jaccard) is at least this, "
                        f"{SIMILARITY.describe()} (1.0 = exact)")
    p.add_argument("--max-frames", type=MAX_FRAMES, default=None, help="stop after this many sampled frames per video")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=16, help=f"frames per batch, {BATCH_SIZE.describe()}")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="out.srt | out.vtt | out.json | out.csv (SRT/VTT with several videos: one file per video)")
    p.add_argument("--frames-dir", type=Path, default=None, help="save the sampled frames as JPEGs named by timestamp")
    add_model_args(p)
    add_backend_args(p)
    add_search_args(p)
    add_common_args(p)
    p.set_defaults(func=run_video, check=check_video_args, parser=p)


def check_video_args(args: argparse.Namespace) -> None:
    resolve_backend(args)
    if args.every == 0 and not args.scenes:
        raise UsageError("argument --every: 0 samples on scene changes only, so it needs --scenes")
    if args.output is not None and args.output.suffix.lower() not in OUTPUTS:
        raise UsageError(f"unknown output format {args.output.suffix or args.output.name!r}: "
                         f"use {', '.join(OUTPUTS[:-1])} or {OUTPUTS[-1]}")


def _why(exc: OSError) -> str:
    if isinstance(exc, FileExistsError) and exc.filename:  # mkdir of a parent that is a file
        return f"{exc.filename} is a file, not a folder"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _frame_bar(path: Path, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar of frames captioned (on a terminal, without --no-progress): tag_video's progress callback."""
    if not show:
        yield None
        return
    from tqdm import tqdm

    with tqdm(desc=path.name, unit="frame", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        yield lambda n: bar.update(n - bar.n)


def run_video(args: argparse.Namespace) -> int:
    from ..media.tags import describe, frame_captioner
    from ..media.video import probe, tag_video, write_results
    from ..pipeline.load import load_captioner

    results, failed, videos = [], 0, []
    for path in args.videos:  # before the model loads (seconds): a file that is no video fails at once
        try:
            probe(path)
            videos.append(path)
        except CaptionerError as exc:
            print(f"captioner: error: {exc}", file=sys.stderr)
            failed += 1
    if not videos:
        return outcome(0, failed)
    cap = load_captioner(args.model, args.device, backend=args.backend, int8=args.int8)
    caption_fn = frame_captioner(cap, cap.search_config(**search_kwargs(args)))
    for path in videos:
        try:
            with _frame_bar(path, show_progress(args)) as progress:
                res = tag_video(path, caption_fn, every=args.every, scenes=args.scenes, batch_size=args.batch_size,
                                similarity=args.similarity, max_frames=args.max_frames, progress=progress,
                                frames_dir=args.frames_dir / path.stem if args.frames_dir and len(args.videos) > 1
                                else args.frames_dir, scene_threshold=args.scene_threshold)
        except CaptionerError as exc:
            print(f"captioner: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        except OSError as exc:  # saving --frames-dir JPEGs: disk full, read-only, a file in the way
            raise CaptionerError(f"cannot write frames to {args.frames_dir}: {_why(exc)}") from None
        results.append(res)
        for w in res.warnings:  # kept (exit 0), but never silently: also in the JSON's "warnings"
            print(f"captioner: {path}: warning: {w}", file=sys.stderr)
        if args.output is None:
            print(f"{path} ({res.duration:.1f} s): {describe(res.tag_sources)}")
            for seg in res.segments:
                print(f"  {seg.start:8.2f} - {seg.end:8.2f}  {seg.caption}  [{describe(seg.tag_sources)}]")
    if args.output is not None and results:
        try:
            write_results(results, args.output)
        except OSError as exc:  # disk full, read-only, a file where a folder should be
            raise CaptionerError(f"cannot write {args.output}: {_why(exc)}") from None
    return outcome(len(results), failed)
