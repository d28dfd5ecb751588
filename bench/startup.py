#!/usr/bin/env python
"""How long a user waits before anything happens: `captioner --help`, a command's --help and usage errors
(each a fresh `python -m captioner` process, median of --repeat runs), and, with --app, the web app's time
to first page (the GET of / answers) and to first caption (the first /caption API call returns), from a
fresh `python app.py`. Prints a Markdown table; --json FILE writes the numbers.

    .venv/bin/python bench/startup.py              # the CLI only (~5 s), and one photo captioned
    .venv/bin/python bench/startup.py --app        # and the app (~1 min on a 2-core CPU)
    .venv/bin/python bench/startup.py --python /tmp/light/bin/python    # the CLI of another venv (the light one)
    .venv/bin/python bench/startup.py --make-app HEAD --make-app 2b68d8c  # `make app` on a fresh clone, timed

`captioner caption PHOTO` is timed (wall, median) with its peak RSS (the process and its children, from wait4),
by default on the default path; `--caption-flags "--backend auto"` times another.

Goal (issue 17): --help and every usage error <= 0.5 s. Run it on a quiet machine (`uptime`)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
PHOTO = ROOT.parent / "shared" / "data" / "photos" / "rocket.jpg"  # a real photo (427x640 JPEG)
if not PHOTO.is_file():
    PHOTO = sorted((ROOT / "captioner" / "assets" / "examples").glob("*.jpg"))[0]
CASES = {
    "captioner --help": ["--help"],
    "captioner caption --help": ["caption", "--help"],
    "captioner train --help": ["train", "--help"],
    "usage error: caption x.jpg -o out.txt": ["caption", "x.jpg", "-o", "out.txt"],
    "usage error: caption x.jpg --beam 0": ["caption", "x.jpg", "--beam", "0"],
    "usage error: video x.mp4 --every -1": ["video", "x.mp4", "--every", "-1"],
    "usage error: train --data d --epochs 0": ["train", "--data", "d", "--epochs", "0"],
}


def time_cli(argv: list[str], repeat: int, python: str = sys.executable) -> tuple[float, int, float]:
    """Median wall time of `python -m captioner ARGV` in seconds, its exit code, and the largest peak RSS (MiB)
    of the process (wait4's ru_maxrss: the process itself; its worker children are counted apart by the OS)."""
    times, code, rss = [], 0, 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        proc = subprocess.Popen([python, "-m", "captioner", *argv], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        times.append(time.perf_counter() - t)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        rss = max(rss, usage.ru_maxrss / 1024)
    return statistics.median(times), code, rss


def time_make_app(ref: str, timeout: float = 1800) -> dict[str, float]:
    """`make app` on a fresh clone of this repository at `ref` (packages from pip's local cache): seconds until
    the app's page answers on port 7860 (keep it free), and the size of the .venv it made (MiB)."""
    import shutil

    work = Path(tempfile.mkdtemp(prefix="captioner-make-app-"))
    clone = work / "captioner"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", ref], check=True)
    port = 7860  # what `make app` serves on
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    proc = subprocess.Popen(["make", "app"], cwd=clone, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        seconds = _wait_page(f"http://127.0.0.1:{port}/", proc, t0, timeout)
        size = int(subprocess.run(["du", "-sm", str(clone / ".venv")], capture_output=True, text=True,
                                  check=True).stdout.split()[0])
        return {"seconds": seconds, "venv_mib": size}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def _wait_page(url: str, proc: subprocess.Popen, t0: float, timeout: float) -> float:
    """Seconds from t0 until GET url answers 200 (SystemExit if proc ends or timeout passes first)."""
    while True:
        if proc.poll() is not None or time.perf_counter() - t0 > timeout:
            raise SystemExit(f"the app did not start (exit {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_app(timeout: float = 600) -> dict[str, float]:
    """Seconds from `python app.py` to the first page, then to the first caption of an example image."""
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = _wait_page(url, proc, t0, timeout)
        image = sorted((ROOT / "captioner" / "assets" / "examples").glob("*.jpg"))[0]
        client = Client(url, verbose=False, analytics_enabled=False, download_files=tempfile.mkdtemp())
        client.predict(handle_file(str(image)), 3, 20, 3, api_name="/caption")
        return {"first page (s)": page, "first caption (s)": time.perf_counter() - t0}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per CLI case (median)")
    p.add_argument("--app", action="store_true", help="also time the web app's first page and first caption")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    p.add_argument("--python", default=sys.executable, help="the interpreter whose `captioner` runs (another venv)")
    p.add_argument("--photo", type=Path, default=PHOTO, help=f"the photo `caption` is timed on (default {PHOTO})")
    p.add_argument("--caption-flags", default="", help="extra flags for that `caption`, e.g. \"--backend auto\"")
    p.add_argument("--make-app", action="append", default=[], metavar="REF",
                   help="time `make app` on a fresh clone at REF until its page answers (repeatable)")
    args = p.parse_args()
    results: dict[str, dict] = {}
    cases = {**CASES, f"caption {args.photo.name} {args.caption_flags}".strip():
             ["caption", str(args.photo), *args.caption_flags.split()]}
    print(f"python: {args.python}\n\n| command | exit code | seconds (median) | peak RSS MiB |\n|---|---|---|---|")
    for name, argv in cases.items():
        seconds, code, rss = time_cli(argv, args.repeat, args.python)
        results[name] = {"seconds": round(seconds, 3), "exit_code": code, "rss_mib": round(rss)}
        print(f"| `{name}` | {code} | {seconds:.2f} | {rss:.0f} |")
    if args.app:
        for name, seconds in time_app().items():
            results[f"app.py: {name}"] = {"seconds": round(seconds, 2)}
            print(f"| `python app.py`: {name} | | {seconds:.1f} |")
    for ref in args.make_app:
        made = time_make_app(ref)
        results[f"make app at {ref}"] = made
        print(f"| `make app` on a fresh clone at {ref}, until the page answers | | {made['seconds']:.0f} "
              f"| .venv {made['venv_mib']} MiB |")
    if args.json:
        args.json.write_text(json.dumps({"load": os.getloadavg()[0], "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
