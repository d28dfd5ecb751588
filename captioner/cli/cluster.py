"""`captioner caption ... --ray [ADDRESS]`: the flags, their checks and the run of the Ray engine
(captioner/pipeline/distributed.py; docs/scale.md). Standard library only until a job runs."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from ..errors import UsageProblem
from ..media.images import display_name
from ..options import Range, UsageError, outcome, search_kwargs, show_progress
from ..pipeline.distributed import (
    SHARD_SIZE,
    caption_shards,
    existing,
    ray_module,
    shard_file,
)

CONCURRENCY = Range(int, 1, 100_000)
NUM_CPUS = Range(float, 0, 1024, lo_open=True)
RETRIES = Range(int, 0, 1000)
SHARD_IMAGES = Range(int, 1, 10_000_000)
_ADDRESS = re.compile(r"^(auto|local|[a-z][a-z0-9+]*://.+|[^/\s]+:\d+)$")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (Ray Data; pip install 'captioner[ray]'; docs/scale.md)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="caption on a Ray cluster into -o DIR: one DIR/NAME.parquet per shard (each .tar; "
                        "--ray-shard-size images of path lists, files and folders) and a marker DIR/_done/NAME.json "
                        "written last; --resume skips shards with a marker. ADDRESS: auto, local, HOST:PORT or "
                        "ray://HOST:PORT (default: RAY_ADDRESS, or the cluster started on this machine, else a new "
                        "local one)")
    g.add_argument("--ray-concurrency", type=CONCURRENCY, default=None, metavar="N",
                   help="caption actors (one model each), default: the cluster's CPUs / --ray-num-cpus")
    g.add_argument("--ray-num-cpus", type=NUM_CPUS, default=1.0, metavar="N",
                   help="CPUs per actor (its torch threads), default 1")
    g.add_argument("--ray-retries", type=RETRIES, default=3, metavar="N",
                   help="times Ray retries a shard whose actor died (a lost node), default 3")
    g.add_argument("--ray-shard-size", type=SHARD_IMAGES, default=SHARD_SIZE, metavar="N",
                   help=f"images per shard made from path lists, files and folders (a .tar is one shard), "
                        f"default {SHARD_SIZE}")


def check_ray_args(args: argparse.Namespace, world: int) -> bool:
    """--ray's rules (a UsageError or UsageProblem before anything is loaded); False without --ray. argparse
    gives --ray the next word even when it is an input (`--ray a.tar b.tar`): a word that is no address goes
    back to the inputs."""
    if args.ray is None:
        return False
    if args.ray and not _ADDRESS.match(args.ray):
        args.inputs.insert(0, args.ray)
        args.ray = ""
    if not args.inputs:
        raise UsageError("the following arguments are required: PATH")
    if world > 1:
        raise UsageError("--ray and torchrun are two ways to use several machines: use one")
    if args.output is None:
        raise UsageError("--ray needs -o DIR: a folder for one Parquet file per shard")
    file_like = args.output.suffix.lower() in (".csv", ".jsonl", ".sqlite", ".sqlite3", ".db", ".parquet")
    if file_like and not args.output.is_dir():
        raise UsageError(f"with --ray, -o is a folder (one Parquet file per shard), not {args.output.suffix} file")
    if args.write_metadata or args.sidecar:
        raise UsageError("--write-metadata and --sidecar write files on the machine that has them: run without --ray")
    if args.device != "cpu":
        raise UsageError("--ray captions on CPUs for now (drop --device)")
    if args.resume and args.overwrite:
        raise UsageError("--resume keeps OUT's rows, --overwrite replaces them: use one")
    if not (args.resume or args.overwrite) and existing(args.output):
        raise UsageProblem(f"{display_name(args.output)} holds shards of an earlier run: use --resume to do only "
                           "the unfinished ones or --overwrite to caption them all again")
    return True


def run_ray(args: argparse.Namespace) -> int:
    """`captioner caption ... --ray`: the job, each failed image on stderr, a summary line, the exit code."""
    from tqdm import tqdm

    ray_module()  # the install hint before anything else happens
    bar = tqdm(unit="shard", file=sys.stderr, disable=not show_progress(args), dynamic_ncols=True)

    def shown(summary: dict[str, Any]) -> None:
        for path, error in summary.get("errors", []):
            tqdm.write(f"captioner: {display_name(path)}: {error}", file=sys.stderr)
        if summary["failed"] > len(summary.get("errors", [])):
            tqdm.write(f"captioner: ... {summary['failed'] - len(summary['errors'])} more failed in "
                       f"{display_name(shard_file(args.output, summary['shard']))}", file=sys.stderr)
        bar.update(1)

    with bar:
        report = caption_shards(args.inputs, args.output, address=args.ray or None, model=args.model,
                                device=args.device, backend=args.backend, int8=args.int8, search=search_kwargs(args),
                                topk=args.topk, batch_size=args.batch_size, max_pixels=int(args.max_pixels * 2**20),
                                shard_size=args.ray_shard_size, concurrency=args.ray_concurrency,
                                num_cpus=args.ray_num_cpus, max_retries=args.ray_retries, redo=args.overwrite,
                                recursive=args.recursive, verbose=bool(args.verbose), on_shard=shown)
    for name, msg in report.input_errors:
        print(f"captioner: {name}: {msg}", file=sys.stderr)
    rows, failed = report.total("rows"), report.total("failed") + len(report.input_errors)
    skipped = sum(1 for s in report.shards if s.get("skipped"))
    if not args.quiet:
        print(f"captioner: {rows + len(report.input_errors) - failed} captioned ({report.total('warned')} with a "
              f"warning), {failed} failed, in {len(report.shards)} shards ({skipped} finished before, skipped) "
              f"-> {display_name(args.output)} ({report.seconds:.1f} s)", file=sys.stderr)
    return outcome(rows + len(report.input_errors) - failed, failed)
