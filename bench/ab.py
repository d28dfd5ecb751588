"""Two checkouts' `captioner caption` side by side, interleaved in one run on one machine: bench.py's caption
stages (model load excluded) and the whole command as a user runs it (start-up, imports and load included).

    git worktree add /tmp/before REV
    .venv/bin/python bench/ab.py --before /tmp/before --after . [--images 200] [--rounds 3]

Both use this venv, one shared cache (the same ONNX exports, the same answer of auto) and the same generated
JPEGs; rounds alternate which checkout goes first; the median of the rounds is reported with every run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def stage(tree: Path, name: str, images: Path, env: dict) -> dict:
    cmd = [sys.executable, str(tree / "bench" / "bench.py"), "--stage", name, "--input", str(images), "--threads",
           str(os.cpu_count() or 1), "--backends", "", "--calibrate", "0", "--user-cache", str(images.parent / "none")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PYTHONPATH": str(tree)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{tree}: stage {name} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def whole_command(tree: Path, images: Path, beam: int, env: dict) -> float:
    out = images.parent / f"out-{os.getpid()}-{time.monotonic_ns()}.csv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "captioner", "-q", "caption", str(images), "-o", str(out), "--beam",
                    str(beam), "--no-progress"], env={**env, "PYTHONPATH": str(tree)}, check=True, cwd=images.parent)
    return len(list(images.glob("*.jpg"))) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import make_images

    from captioner.cpu import describe

    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    with tempfile.TemporaryDirectory(prefix="captioner-ab-") as tmp:
        images = Path(tmp) / "images"
        make_images(images, args.images)
        env = {**os.environ, "CAPTIONER_CACHE": f"{tmp}/cache", "HOME": tmp}
        prep = stage(trees["after"], "prepare", images, env)
        print(f"cpu: {describe()}; auto: {prep['auto']}", flush=True)
        res: dict = {t: {k: [] for k in ("b1", "b3", "cmd_b1", "cmd_b3")} for t in trees}
        for r in range(args.rounds):
            for t in (("before", "after") if r % 2 == 0 else ("after", "before")):
                for b in (1, 3):
                    s = stage(trees[t], f"caption_b{b}", images, env)
                    res[t][f"b{b}"].append(round(s["ips"], 1))
                    res[t][f"cmd_b{b}"].append(round(whole_command(trees[t], images, b, env), 1))
                print(r, t, {k: v[-1] for k, v in res[t].items()}, f"load {os.getloadavg()[0]:.2f}", flush=True)
    print("| checkout | caption greedy / beam 3 img/s (load excluded) | whole command greedy / beam 3 img/s |")
    print("|---|---|---|")
    for t, v in res.items():
        med = {k: statistics.median(x) for k, x in v.items()}
        print(f"| {t} ({trees[t]}) | {med['b1']:.1f} / {med['b3']:.1f} | {med['cmd_b1']:.1f} / {med['cmd_b3']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe(), "auto": prep["auto"], "runs": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
