"""`captioner video FILE...`: sample frames, caption them in batches, merge into segments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CaptionerError


def add_video_parser(sub: argparse._SubParsersAction) -> None:
    from .cli import _add_model_args, _add_search_args

    p = sub.add_parser(
        "video", help="tag the frames of videos with timestamped captions",
        description="Sample frames every --every seconds (stream timestamps; seeks when sampling is sparse), "
                    "caption them in batches, merge consecutive frames whose captions agree into segments, and "
                    "tag each segment with its content words. A bad video is reported and the others still run.")
    p.add_argument("videos", nargs="+", type=Path, metavar="FILE")
    p.add_argument("--every", type=float, default=1.0, help="seconds between sampled frames (default 1.0)")
    p.add_argument("--scenes", action="store_true", help="also sample on scene changes")
    p.add_argument("--scene-threshold", type=float, default=0.3, help="scene change threshold, 0-1 (default 0.3)")
    p.add_argument("--similarity", type=float, default=1.0,
                   help="merge consecutive captions whose word overlap (Jaccard) is at least this (1.0 = exact)")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many sampled frames per video")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="out.srt | out.vtt | out.json | out.csv (SRT/VTT with several videos: one file per video)")
    p.add_argument("--frames-dir", type=Path, default=None, help="save the sampled frames as JPEGs named by timestamp")
    _add_model_args(p)
    _add_search_args(p)
    p.set_defaults(func=run_video)


def _why(exc: OSError) -> str:
    if isinstance(exc, FileExistsError) and exc.filename:  # mkdir of a parent that is a file
        return f"{exc.filename} is a file, not a folder"
    return exc.strerror or str(exc)


def run_video(args: argparse.Namespace) -> int:
    from .cli import _search_kwargs
    from .model import Captioner
    from .video import tag_video, write_results

    if args.every < 0 or (args.every == 0 and not args.scenes):
        raise CaptionerError("--every must be > 0 (or 0 together with --scenes)")
    cap = Captioner.load(args.model, args.device)
    cfg = cap.search_config(**_search_kwargs(args))
    caption_fn = lambda frames: [c.text for c in cap.caption_tensors(cap.preprocess(frames), cfg)]  # noqa: E731
    results, failed = [], 0
    for path in args.videos:
        try:
            res = tag_video(path, caption_fn, every=args.every, scenes=args.scenes, batch_size=args.batch_size,
                            similarity=args.similarity, max_frames=args.max_frames,
                            frames_dir=args.frames_dir / path.stem if args.frames_dir and len(args.videos) > 1
                            else args.frames_dir, scene_threshold=args.scene_threshold)
        except CaptionerError as exc:
            print(f"captioner: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        except OSError as exc:  # saving --frames-dir JPEGs: disk full, read-only, a file in the way
            raise CaptionerError(f"cannot write frames to {args.frames_dir}: {_why(exc)}") from None
        results.append(res)
        if args.output is None:
            print(f"{path} ({res.duration:.1f} s): {', '.join(res.tags)}")
            for seg in res.segments:
                print(f"  {seg.start:8.2f} - {seg.end:8.2f}  {seg.caption}  [{', '.join(seg.tags)}]")
    if args.output is not None and results:
        try:
            write_results(results, args.output)
        except OSError as exc:  # disk full, read-only, a file where a folder should be
            raise CaptionerError(f"cannot write {args.output}: {_why(exc)}") from None
    if failed:
        return 3 if results else 1
    return 0
