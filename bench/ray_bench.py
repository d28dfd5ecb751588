"""Ray Data engine against plain `captioner caption` on the same images, in the same run (issue 28).

    .venv/bin/python bench/ray_bench.py --images 800 --shard-sizes 50,100,200,400 --json bench/ray.json
    .venv/bin/python bench/ray_bench.py --images 96 --shard-sizes 24,48     # smoke run (~2 minutes)

Generates N 640x480 JPEGs (bench.make_images) and packs them into WebDataset shards (img2dataset's layout), then:
1. plain: the whole `captioner caption SHARDS/*.tar -o plain.parquet` command (default workers), in a subprocess;
2. a local Ray cluster of two nodes, one CPU each (ray.cluster_utils.Cluster): its start-up time;
3. for each shard size, the same images on the cluster (caption_shards: one actor per CPU, cluster already up):
   the job's wall time (actor start and model load included) and the time to its first finished shard;
4. plain again, after the cluster is shut down (the two plain figures show how quiet the machine was).
Per-shard overhead: a least-squares line of job seconds against the number of shards over the shard sizes (the
slope is what each shard costs beyond its images: reading the tar's index, the Parquet file and its marker,
Ray's scheduling); the shard size that keeps it under 10% of a shard's captioning time follows from it.

Measure on a quiet machine (`uptime`, no `captioner train` running): the figures are only as good as that."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]  # bench.py (make_images), then this checkout's captioner


def pack(images: list[Path], folder: Path, size: int) -> list[Path]:
    """WebDataset tars of `size` images each: KEY.jpg + KEY.json, keys as img2dataset makes them."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(images), size):
        path = folder / f"{s // size:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, image in enumerate(images[s:s + size]):
                key = f"{s // size:05d}{i:04d}"
                for name, data in ((f"{key}.jpg", image.read_bytes()), (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def plain(shards: Path, out: Path, args: argparse.Namespace) -> float:
    """Seconds for the whole plain command (start-up, imports and model load included)."""
    cmd = [sys.executable, "-m", "captioner", "-q", "caption", str(shards / "*.tar"), "-o", str(out), "--overwrite",
           "--no-progress", "--batch-size", str(args.batch_size), *(["--backend", args.backend] if args.backend else [])]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if res.returncode not in (0, 3):
        sys.exit(f"plain captioner caption failed ({res.returncode}): {res.stderr[-2000:]}")
    return time.perf_counter() - start


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """(slope, intercept) of seconds against shards, least squares; None with fewer than two shard counts."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="images to caption (default 400)")
    p.add_argument("--shard-sizes", default="50,100,200", help="images per shard, comma-separated (default 50,100,200)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default=None, help="--backend for both (default: auto)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    sizes = [int(s) for s in args.shard_sizes.split(",")]
    from bench import make_images
    from captioner.cpu import describe

    results: dict = {"cpu": describe(), "images": args.images, "load_average_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="captioner-raybench-") as tmp:
        tmp_path = Path(tmp)
        os.environ["CAPTIONER_CACHE"] = str(tmp_path / "cache")  # inherited by the command and the cluster's workers
        os.environ["PYTHONPATH"] = str(ROOT)
        make_images(tmp_path / "images", args.images)
        images = sorted((tmp_path / "images").glob("*.jpg"))
        for size in sizes:
            pack(images, tmp_path / f"shards-{size}", size)
        pack(images[:8], tmp_path / "warm", 8)
        plain(tmp_path / "warm", tmp_path / "warm.parquet", args)  # auto's measurement and exports, into the cache
        results["plain_s"] = [plain(tmp_path / f"shards-{sizes[0]}", tmp_path / "plain.parquet", args)]
        print(f"plain: {args.images / results['plain_s'][0]:.1f} img/s", file=sys.stderr)

        import ray
        from ray.cluster_utils import Cluster

        from captioner import caption_shards

        start = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        results["ray_startup_s"] = time.perf_counter() - start
        results["ray"] = {}
        try:  # a first small job: the nodes' worker processes and page cache warm, as for the plain command
            caption_shards([str(tmp_path / "warm" / "*.tar")], tmp_path / "out-warm", backend=args.backend or "auto",
                           batch_size=args.batch_size, concurrency=2)
            for size in sizes:
                first: list[float] = []
                start = time.perf_counter()
                report = caption_shards([str(tmp_path / f"shards-{size}" / "*.tar")], tmp_path / f"out-{size}",
                                        backend=args.backend or "auto", batch_size=args.batch_size, concurrency=2,
                                        on_shard=lambda s: first.append(time.perf_counter()) if not first else None)
                seconds = time.perf_counter() - start
                shards = len(report.shards)
                results["ray"][size] = {"shards": shards, "seconds": seconds, "first_shard_s": first[0] - start,
                                        "in_actor_s": sum(s["seconds"] for s in report.shards)}
                print(f"ray, shards of {size}: {args.images / seconds:.1f} img/s ({shards} shards)", file=sys.stderr)
        finally:
            ray.shutdown()
            cluster.shutdown()
        results["plain_s"].append(plain(tmp_path / f"shards-{sizes[0]}", tmp_path / "plain.parquet", args))
    results["load_average_end"] = os.getloadavg()[0]
    line = fit([(r["shards"], r["seconds"]) for r in results["ray"].values()])
    plain_ips = args.images / (sum(results["plain_s"]) / len(results["plain_s"]))
    best = max(results["ray"].items(), key=lambda kv: args.images / kv[1]["seconds"])
    ray_ips = args.images / best[1]["seconds"]
    results.update(plain_ips=plain_ips, ray_ips=ray_ips, ratio=ray_ips / plain_ips)
    rows = [("plain `captioner caption` (whole command), before / after the cluster",
             " / ".join(f"{args.images / s:.1f} img/s ({s:.1f} s)" for s in results["plain_s"])),
            ("Ray cluster start-up (2 nodes + connect)", f"{results['ray_startup_s']:.1f} s")]
    for size, r in results["ray"].items():
        rows.append((f"Ray, 2 nodes x 1 CPU, shards of {size} ({r['shards']} shards; job, cluster up)",
                     f"{args.images / r['seconds']:.1f} img/s ({r['seconds']:.1f} s; first shard after "
                     f"{r['first_shard_s']:.1f} s)"))
    rows.append(("Ray / plain (best shard size)", f"{results['ratio']:.2f} (goal >= 0.80)"))
    if line:
        slope, intercept = line
        actors = 2  # the wall-clock slope is each shard's overhead shared by the actors working in parallel
        per_image = sum(r["in_actor_s"] for r in results["ray"].values()) / (args.images * len(results["ray"]))
        overhead = slope * actors  # actor-seconds per shard
        results.update(per_shard_overhead_s=overhead, fixed_s=intercept, actor_s_per_image=per_image)
        rows.append(("per-shard overhead (2 x slope of job s over shards)",
                     f"{overhead:.3f} actor-s/shard (intercept {intercept:.1f} s: start-up + captioning)"))
        if overhead > 0 and per_image > 0:
            size10 = 10 * overhead / per_image  # overhead < 10% of a shard's captioning time
            results["shard_size_10pct"] = size10
            rows.append(("shard size with overhead under 10%",
                         f">= {size10:.0f} images (captioning {per_image * 1000:.1f} ms/img per actor)"))
        else:
            rows.append(("shard size with overhead under 10%", "any measured (no overhead above the noise)"))
    print(f"\nCPU: {results['cpu']}; load average {results['load_average_start']:.2f} -> "
          f"{results['load_average_end']:.2f}; {args.images} JPEGs 640x480\n")
    print("| what | result |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
