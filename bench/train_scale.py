"""Training at scale on synthetic feature caches: peak RSS, start-up time and captions/s of one epoch of
`captioner train`, with the training views streamed from the cache files (--ram-gb 0) and copied into RAM.

For each N it writes, in the project's own cache format (cache_key of the files' content digests and the
encoder identity, fp16 .npy), N training images x --views cached views plus --val validation images of
random features (7x7x1280, 125 KB a view) and 5 random captions per image in a CSV (`table:` reader), so
`captioner train` finds every cache and encodes nothing. Each run is a fresh `python -m captioner train`
process; its peak RSS is the kernel's ru_maxrss for that process (os.wait4). --cold drops the page cache
before each run (root only) so streaming reads come from the disk. Sizes whose files do not fit the free
disk space are skipped with a message; the RAM copy is skipped where the views exceed half the available
memory. The decoder is small by default (the data path is what is measured; --decoder default uses the
shipped model's sizes).

    .venv/bin/python bench/train_scale.py                          # N = 2k, 10k, 40k x 4 views, streamed + in RAM
    .venv/bin/python bench/train_scale.py --sizes 2000 --ddp       # + 2 processes (torchrun, gloo) vs 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROW = (49, 1280)  # one cached view: 7x7 grid of 1280-d EfficientNet-Lite0 features
ROW_BYTES = ROW[0] * ROW[1] * 2
DECODERS = {"small": ["--hidden-dim", "128", "--embed-dim", "128", "--feat-proj", "128", "--attn-dim", "64"],
            "default": ["--hidden-dim", "384", "--embed-dim", "384", "--feat-proj", "384", "--attn-dim", "256"]}


def write_set(root: Path, n: int, n_val: int, views: int, seed: int = 0) -> Path:
    """The CSV of a synthetic set of n training + n_val validation images, and its feature caches in root/cache."""
    from captioner.training.data import cache_key, content_digests, load_dataset
    from captioner.training.train import TrainConfig, caching_encoder

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(2000)]
    table = root / "captions.csv"
    with table.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["image", "caption", "split"])
        for i in range(n + n_val):
            name = f"{i:06d}.jpg"
            (images / name).touch()  # never decoded: only its (empty) content keys the cache
            split = "train" if i < n else "val"
            for _ in range(5):
                out.writerow([f"images/{name}", " ".join(rng.choice(words, rng.integers(8, 15))), split])
    items = load_dataset(f"table:{table}")
    identity = caching_encoder(TrainConfig(data=[f"table:{table}"])).cache_identity()
    base = rng.standard_normal((1024, *ROW), dtype=np.float32).astype(np.float16)  # rows are drawn from these
    for split, nviews in (("train", views), ("val", 1)):
        paths = [it.image for it in items if it.split == split]
        for v in range(nviews):
            (root / "cache").mkdir(exist_ok=True)
            target = root / "cache" / f"feats-{cache_key(content_digests(paths, root / 'cache'), identity, v)}.npy"
            arr = np.lib.format.open_memmap(target, mode="w+", dtype=np.float16, shape=(len(paths), *ROW))
            for lo in range(0, len(paths), 1024):
                hi = min(lo + 1024, len(paths))
                arr[lo:hi] = base[rng.permutation(1024)[:hi - lo]]
            arr.flush()
            del arr
    return table


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(cmd: list[str]) -> tuple[float, float]:
    """Run a command; (wall seconds, peak RSS in GiB of the process and its waited-for children)."""
    t = time.time()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nobody reads a pipe while the child runs
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{err.read().decode()[-3000:]}")
    return time.time() - t, usage.ru_maxrss / 2**20  # KiB on Linux


def train_cmd(table: Path, root: Path, out: str, ram_gb: float, args: argparse.Namespace, threads: int) -> list[str]:
    return ["--data", f"table:{table}", "--out", str(root / out), "--cache-dir", str(root / "cache"), "--epochs", "1",
            "--views", str(args.views), "--threads", str(threads), "--batch-size", "100", "--min-count", "1",
            "--beam", "1", "--seed", "0", "--ram-gb", str(ram_gb), *DECODERS[args.decoder]]


def measure(table: Path, root: Path, n: int, mode: str, args: argparse.Namespace) -> dict:
    """One epoch in a fresh process: mode stream | ram | ddp2 (2 processes x 1 thread) | 2threads (1 x 2)."""
    py = [sys.executable, "-m"]
    procs, threads = (2, 1) if mode == "ddp2" else (1, 2 if mode == "2threads" else args.threads)
    ram_gb = 1e4 if mode == "ram" else 0.0
    cmd = train_cmd(table, root, f"run-{mode}", ram_gb, args, threads)
    if procs > 1:
        cmd = [*py, "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "captioner", "-q",
               "train", "--no-progress", *cmd]
    else:
        cmd = [*py, "captioner", "-q", "train", "--no-progress", *cmd]
    cold = args.cold and drop_page_cache()
    wall, rss = run(cmd)
    log = json.loads((root / f"run-{mode}" / "log.jsonl").read_text().splitlines()[0])
    shutil.rmtree(root / f"run-{mode}")
    return {"n": n, "views": args.views, "cache_gb": round(n * args.views * ROW_BYTES / 2**30, 2), "mode": mode,
            "procs": procs, "threads": threads, "cold": cold, "peak_rss_gb": round(rss, 2),
            "startup_s": log.get("startup_s"), "epoch_s": log["train_s"],
            "captions_per_s": round(5 * n / log["train_s"], 1), "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="2000,10000,40000", help="comma-separated training-set sizes N")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--val", type=int, default=100, help="validation images per set")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the stream/ram runs")
    p.add_argument("--decoder", choices=sorted(DECODERS), default="small")
    p.add_argument("--modes", default="stream,ram", help="of stream, ram, ddp2, 2threads")
    p.add_argument("--ddp", action="store_true", help="also 2 processes x 1 thread (ddp2) and 1 x 2 threads")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    p.add_argument("--dir", type=Path, default=None, help="where the synthetic sets go (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--write-set", nargs=4, metavar=("ROOT", "N", "VAL", "VIEWS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.write_set:
        root, n, n_val, views = args.write_set
        write_set(Path(root), int(n), int(n_val), int(views))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from captioner.cpu import describe

    modes = args.modes.split(",") + (["ddp2", "2threads"] if args.ddp else [])
    base = Path(tempfile.mkdtemp(prefix="train-scale-", dir=args.dir))
    rows: list[dict] = []
    print(f"CPU: {describe()}; decoder {args.decoder}; {args.views} views; page cache "
          f"{'dropped before each run' if args.cold else 'warm (files just written)'}\n")
    print("| N images | cache GB | mode | peak RSS GB | start-up s | epoch s | captions/s |\n|---|---|---|---|---|---|---|")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            need = (n * args.views + args.val) * ROW_BYTES
            free = shutil.disk_usage(base).free
            if need * 1.05 + 2**30 > free:
                print(f"| {n} | {need / 2**30:.1f} | skipped: {free / 2**30:.1f} GB free on disk | | | | |", flush=True)
                continue
            root = base / f"n{n}"
            table = root / "captions.csv"
            # in a child process: writing the caches maps every page of them into the writer, and a process
            # started later inherits its parent's peak RSS as the floor of its own ru_maxrss (exec keeps it)
            subprocess.run([sys.executable, __file__, "--write-set", str(root), str(n), str(args.val),
                            str(args.views)], check=True)
            avail = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
            for mode in modes:
                if mode == "ram" and n * args.views * ROW_BYTES > avail / 2:
                    print(f"| {n} | {need / 2**30:.1f} | ram: skipped, views exceed half the available memory "
                          f"({avail / 2**30:.1f} GB) | | | | |", flush=True)
                    continue
                r = measure(table, root, n, mode, args)
                rows.append(r)
                label = f"{mode} ({r['procs']}x{r['threads']} thr{', cold' if r['cold'] else ''})"
                print(f"| {n} | {r['cache_gb']} | {label} | {r['peak_rss_gb']} | {r['startup_s']} | {r['epoch_s']} | "
                      f"{r['captions_per_s']} |", flush=True)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n(this script's own peak RSS, the floor of every row's: {own:.2f} GB)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "decoder": args.decoder, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
