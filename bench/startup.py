#!/usr/bin/env python
"""How long a user waits before anything happens: `captioner --help`, a command's --help and usage errors
(each a fresh `python -m captioner` process, median of --repeat runs), and, with --app, the web app's time
to first page (the GET of / answers) and to first caption (the first /caption API call returns), from a
fresh `python app.py`. Prints a Markdown table; --json FILE writes the numbers.

    .venv/bin/python bench/startup.py              # the CLI only (~5 s)
    .venv/bin/python bench/startup.py --app        # and the app (~1 min on a 2-core CPU)

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
CASES = {
    "captioner --help": ["--help"],
    "captioner caption --help": ["caption", "--help"],
    "captioner train --help": ["train", "--help"],
    "usage error: caption x.jpg -o out.txt": ["caption", "x.jpg", "-o", "out.txt"],
    "usage error: caption x.jpg --beam 0": ["caption", "x.jpg", "--beam", "0"],
    "usage error: video x.mp4 --every -1": ["video", "x.mp4", "--every", "-1"],
    "usage error: train --data d --epochs 0": ["train", "--data", "d", "--epochs", "0"],
}


def time_cli(argv: list[str], repeat: int) -> tuple[float, int]:
    """Median wall time of `python -m captioner ARGV` in seconds, and its exit code."""
    times, code = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "captioner", *argv], env=ENV, cwd=ROOT,
                              capture_output=True).returncode
        times.append(time.perf_counter() - t)
    return statistics.median(times), code


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
        while True:
            if proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise SystemExit("app.py did not start")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        page = time.perf_counter() - t0
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
    args = p.parse_args()
    results: dict[str, dict] = {}
    print("| command | exit code | seconds (median) |\n|---|---|---|")
    for name, argv in CASES.items():
        seconds, code = time_cli(argv, args.repeat)
        results[name] = {"seconds": round(seconds, 3), "exit_code": code}
        print(f"| `{name}` | {code} | {seconds:.2f} |")
    if args.app:
        for name, seconds in time_app().items():
            results[f"app.py: {name}"] = {"seconds": round(seconds, 2)}
            print(f"| `python app.py`: {name} | | {seconds:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"load": os.getloadavg()[0], "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
