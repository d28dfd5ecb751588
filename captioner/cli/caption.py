"""`captioner caption`: its options, their checks, and the run (files in, rows out to stdout or -o, metadata);
the captioning itself is pipeline/batch.py."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

from ..errors import CaptionerError, UsageProblem
from ..media.images import (
    MAX_PIXELS,
    display_name,
    path_text,
    skipped_summary,
)
from ..options import (
    BATCH_SIZE,
    EXIT_EPILOG,
    MEGAPIXELS,
    TOPK,
    WORKER_SECONDS,
    WORKERS,
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
from ..pipeline.batch import (
    FORMATS,
    CaptionJob,
    FileWriter,
    Row,
    _parts,
    caption_files,
    merge_parts,
    read_rows,
)
from ..runtime.workers import WORKER_TIMEOUT
from ..runtime.workers import start as start_workers

log = logging.getLogger("captioner")


def add_caption_parser(sub: argparse._SubParsersAction) -> None:
    from ..media.metadata import add_metadata_args
    from .cluster import add_ray_args

    p = sub.add_parser(
        "caption", help="caption image files, folders and glob patterns in batches",
        description="Caption images (sorted by path) in batches. Default output: PATH<TAB>caption lines on stdout. "
                    "With -o, rows (path, caption, score, alternatives, error, warning) are written and synced after "
                    "every batch, so a killed run loses nothing: rerun it with the same PATHs and --resume (rows are "
                    "matched by path). An existing OUT is never replaced silently: --resume adds the missing rows to "
                    "it, --overwrite replaces it; without either the run is refused (exit 2). Unreadable files are reported on stderr and written with `error` set. "
                    "With --write-metadata or --sidecar, a file whose metadata could not be written counts as failed.",
        epilog=EXIT_EPILOG + " Several processes: `torchrun --nproc_per_node=N -m captioner caption PATH... -o OUT` (-o is "
               "required, stdout mode is refused): process r captions images r, r+N, ... into OUT.rank<r>.part; "
               "process 0 merges them into OUT in sorted order, deletes the parts and sets the exit code "
               "(torchrun reports any non-zero code as a failure). Many machines, with retries and per-shard resume: --ray "
               "(docs/scale.md).")
    p.add_argument("inputs", nargs="*", metavar="PATH",  # "*": --ray [ADDRESS] may take the first (check_ray_args)
                   help="image files, folders, glob patterns (quoted), WebDataset shards (.tar) and path lists "
                        "(.txt, one path per line; .csv or .parquet with a path column; docs/scale.md)")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders; `**` in patterns")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="OUT",
                   help="out.csv, out.jsonl, out.parquet (also key, shard, model and each sample's json/txt), or "
                        "library.sqlite: a SQLite library with a full-text index of the "
                        "captions (path, size, mtime, caption, alternatives, score, model, time), searched by "
                        "`captioner search`; with --ray a folder")
    p.add_argument("--topk", type=TOPK, default=None,
                   help=f"also write the N best captions (alternatives; N <= --beam, else a usage error), {TOPK.describe()}")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=32, help=f"images per batch, {BATCH_SIZE.describe()} (default 32)")
    p.add_argument("--workers", type=WORKERS, default=min(2, os.cpu_count() or 1),
                   help=f"processes that load and caption batches, {WORKERS.describe()} (0 = in the main process; "
                        "a job of one batch always runs there; default %(default)s)")
    p.add_argument("--worker-timeout", type=WORKER_SECONDS, default=WORKER_TIMEOUT, metavar="SECONDS",
                   help="stop with an error (exit 1, rows written so far kept) when no worker finishes a batch for "
                        f"this long, {WORKER_SECONDS.describe()} (default %(default)g)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in OUT, caption only the missing images (a .sqlite library also "
                        "re-captions changed photos and drops deleted ones); without -o, with --write-metadata or "
                        "--sidecar: skip the images that already carry captioner's description")
    p.add_argument("--max-pixels", type=MEGAPIXELS, default=MAX_PIXELS / 2**20, metavar="MP",
                   help=f"largest image in megapixels (2**20 pixels), {MEGAPIXELS.describe()} (default "
                        f"{MAX_PIXELS // 2**20}). A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale to fit; other "
                        "formats are refused unread (decompression bomb protection)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (without --resume or --overwrite an existing OUT is refused, exit 2)")
    add_metadata_args(p)
    add_ray_args(p)
    add_model_args(p)
    add_backend_args(p, compile_alias=True)
    add_search_args(p)
    add_common_args(p)
    p.set_defaults(func=run_caption, check=check_caption_args, parser=p)


def output_format(output: Path | None) -> str | None:
    """csv, jsonl, parquet or sqlite by OUT's suffix (None without -o; anything else is returned for the usage error)."""
    from ..media.library import SUFFIXES

    if output is None:
        return None
    return "sqlite" if output.suffix.lower() in SUFFIXES else output.suffix.lower().lstrip(".")


def check_caption_args(args: argparse.Namespace) -> None:
    """Options that do not go together: a UsageError (exit 2) before anything is loaded."""
    from ..media import metadata
    from ..media.shards import is_shard
    from ..pipeline import parquet
    from .cluster import check_ray_args

    world, _ = _world()
    resolve_backend(args)
    ray = check_ray_args(args, world)  # --ray's own rules (cli/cluster.py)
    if not args.inputs:
        raise UsageError("the following arguments are required: PATH")
    if ray:
        return
    fmt, tagging = output_format(args.output), args.write_metadata or args.sidecar
    if args.output is not None and fmt not in (*FORMATS, "parquet", "sqlite"):
        raise UsageError(f"unknown output format {args.output.suffix or args.output.name!r}: use .csv, .jsonl, "
                         ".parquet or .sqlite")
    if any(is_shard(os.fsdecode(i)) for i in args.inputs) and (fmt == "sqlite" or tagging):
        raise UsageError("images inside .tar shards go to -o out.parquet, .csv or .jsonl, not to a .sqlite library "
                         "or image metadata")
    if fmt == "parquet" and world > 1:
        raise UsageError("a .parquet file is written by one process: run without torchrun (or with --ray)")
    if args.output is None and (args.resume and not tagging or world > 1):
        raise UsageError("--resume and torchrun need -o OUT (--resume also works with --write-metadata or --sidecar)")
    if fmt == "sqlite" and world > 1:
        raise UsageError("a .sqlite library is written by one process: run without torchrun")
    if args.topk is not None and args.beam is not None and args.topk > args.beam:
        raise UsageError(f"--topk {args.topk} is more than --beam {args.beam}: a beam search finds at most --beam "
                         "captions (raise --beam)")
    if args.resume and args.overwrite:
        raise UsageError("--resume keeps OUT's rows, --overwrite replaces them: use one")
    if args.output is not None and not (args.resume or args.overwrite) and (
            parquet.has_rows(args.output) if fmt == "parquet" else _has_rows(args.output)):
        raise UsageProblem(f"{display_name(args.output)} exists: use --resume to add to it or --overwrite to replace it")
    problem = metadata.usage_problem(args)
    if problem:
        raise UsageError(problem)


def _has_rows(out: Path) -> bool:
    """OUT is a file with something in it (an empty file, e.g. from mktemp, holds nothing to lose)."""
    try:
        return out.is_file() and out.stat().st_size > 0
    except OSError:
        return False


def _world() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def _echo(rows: list[Row], stdout: bool, alternatives: bool) -> None:
    """Errors on stderr (around the progress bar); with stdout, PATH<TAB>caption (+ alternatives) lines."""
    from tqdm import tqdm

    for r in rows:
        if r["error"]:
            tqdm.write(f"captioner: {display_name(r['path'])}: {r['error']}", file=sys.stderr)
        elif r.get("warning"):
            tqdm.write(f"captioner: {display_name(r['path'])}: warning: {r['warning']}", file=sys.stderr)
        if stdout and not r["error"]:  # the path as path_text: tab, newline and odd bytes escaped
            print(f"{path_text(r['path'])}\t{r['caption']}", flush=True)
            for n, (text, score) in enumerate(r["alternatives"][1:] if alternatives else [], 2):
                print(f"\t{n}. {text} ({score:.3f})", flush=True)


def run_caption(args: argparse.Namespace) -> int:
    if args.ray is not None:
        from .cluster import run_ray

        return run_ray(args)
    from ..media import metadata
    from ..media.library import LibraryWriter
    from ..media.shards import gather

    world, rank = _world()
    tagging = metadata.metadata_options(args)
    fmt = output_format(args.output)
    skipped: list[Path] = []
    paths, input_errors, sources = gather(args.inputs, args.recursive, skipped)  # files, path lists, tar shards
    for name, msg in input_errors if rank == 0 else []:
        print(f"captioner: {name}: {msg}", file=sys.stderr)
    for p in skipped if rank == 0 and args.verbose else []:
        print(f"captioner: skipped {display_name(p)} (not an image file by its extension)", file=sys.stderr)
    if not paths:
        raise CaptionerError("no images to caption" + ("" if input_errors else " (--recursive for subfolders?)"))
    exiftool = metadata.find_exiftool() if tagging else None  # before the model loads: fail fast
    from ..pipeline.load import is_light, load_captioner
    from ..runtime.workers import LIGHT_PRELOAD

    light = is_light(args.model, args.backend, args.int8)
    if args.workers and len(paths[rank::world]) > args.batch_size and args.device == "cpu":
        start_workers(LIGHT_PRELOAD if light else None)  # before the model loads: the fork server's imports overlap it
    local = os.environ.get("LOCAL_RANK", "0")
    cap = load_captioner(args.model, f"cuda:{local}" if world > 1 and args.device == "cuda" else args.device,
                         backend=args.backend, int8=args.int8)
    if args.topk is not None and args.beam is None and args.topk > cap.search_cfg.beam:
        raise UsageProblem(f"--topk {args.topk} is more than the model's beam ({cap.search_cfg.beam}): add "
                           f"--beam {args.topk} or more")
    job = CaptionJob(**search_kwargs(args), topk=args.topk, batch_size=args.batch_size, workers=args.workers,
                     worker_timeout=args.worker_timeout, max_pixels=int(args.max_pixels * 2**20),
                     progress_bar=show_progress(args) and rank == 0)
    alternatives = cap.search_config(**search_kwargs(args), topk=args.topk).topk > 1
    stamps = metadata.stamps(paths[rank::world]) if tagging or fmt == "sqlite" else {}
    with contextlib.ExitStack() as stack:
        from tqdm import tqdm

        note = partial(tqdm.write, file=sys.stderr)  # around the progress bar
        tagger = stack.enter_context(metadata.MetadataWriter(tagging, cap.model_id, stamps, exiftool,
                                                             notes=note)) if tagging else None
        tag = tagger or (lambda rows: None)
        if args.output is None:
            done = tagger.done(paths) if args.resume else set()
            results = caption_files(cap, [p for p in paths if str(p) not in done], job,
                                    lambda rows: (tag(rows), _echo(rows, not args.dry_run, alternatives)))
            return _finish(args, results, input_errors, skipped)

        out = args.output
        part = out.with_name(f"{out.name}.rank{rank}.part") if world > 1 else out
        old: list[Row] = []
        if fmt == "sqlite":
            writer = LibraryWriter(out, cap.model_id, stamps, alternatives, resume=args.resume)
            old = writer.kept(paths) if args.resume else []
        elif fmt == "parquet":
            from ..pipeline.parquet import ParquetWriter

            writer = ParquetWriter(out, cap.model_id, sources, alternatives, resume=args.resume)
            old = writer.kept()
        else:
            for f in ([out] + (_parts(out) if world > 1 else [])) if args.resume else []:
                old += read_rows(f, fmt, fix=f == part)
            writer = FileWriter(part, fmt, append=args.resume, alternatives=alternatives)
        done = {r["path"] for r in old}  # path_text; a raw name in a file from before path_text still counts
        stack.callback(writer.close)
        results = caption_files(cap, [p for p in paths[rank::world] if path_text(p) not in done and str(p) not in done], job,
                                lambda rows: (tag(rows), _echo(rows, False, alternatives), writer(rows)))
    if fmt == "parquet":
        writer.finish(paths)  # OUT written from the journal, atomically
    rows: list[Row] = old + results
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(hours=12))
        try:
            dist.barrier()
            if rank != 0:
                return 0
            parts = _parts(out) if args.resume else [out.with_name(f"{out.name}.rank{r}.part") for r in range(world)]
            rows = merge_parts(out, fmt, parts, paths, keep_existing=args.resume)
        finally:
            dist.destroy_process_group()
    return _finish(args, rows, input_errors, skipped)


def _finish(args: argparse.Namespace, rows: list[Row], input_errors: list, skipped: list[Path]) -> int:
    """The summary line on stderr (unless -q), then the exit code."""
    failed = sum(1 for r in rows if r["error"]) + len(input_errors)
    warned = sum(1 for r in rows if r.get("warning") and not r["error"])
    if not args.quiet:
        hint = "; -v lists them" if skipped and not args.verbose else ""
        print(f"captioner: {len(rows) + len(input_errors) - failed} captioned ({warned} with a warning), "
              f"{failed} failed, {skipped_summary(skipped)}{hint}", file=sys.stderr)
    return _exit_code(rows, input_errors)


def _exit_code(rows: list[Row], input_errors: list) -> int:
    """0 all captioned, 3 some inputs failed, 1 none could be captioned (cliargs.outcome)."""
    failed = sum(1 for r in rows if r["error"]) + len(input_errors)
    return outcome(len(rows) + len(input_errors) - failed, failed)
