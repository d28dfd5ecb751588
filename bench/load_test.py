"""Load test of the web app: N concurrent gradio_client clients x R image requests each on /caption.

    .venv/bin/python bench/load_test.py --clients 16 --requests 10 --json bench/load.json [--model PATH]

Starts `python app.py --port P --model M` in its own process (the shipped model unless --model), waits
until it serves, creates one gradio_client.Client per simulated user (analytics off), then every client
sends its R requests back to back, all clients at once, cycling through a few generated images (each
request uploads its image, as a browser would). Reports errors (must be 0), latency p50/p95/max,
throughput (requests/s over the whole run) and the app process's peak RSS (psutil if installed, else
VmHWM from /proc/PID/status). Exit code 0 when every request succeeded, 1 otherwise."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n different 640x480 JPEGs: a colour gradient and a few random shapes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, 640, dtype=np.float32)[None, :, None]
        arr = np.broadcast_to(a * (1 - t) + b * t, (480, 640, 3)).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 6))):
            x0, y0 = int(rng.integers(0, 500)), int(rng.integers(0, 360))
            box = (x0, y0, x0 + int(rng.integers(40, 200)), y0 + int(rng.integers(40, 200)))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        paths.append(folder / f"load{i}.jpg")
        img.save(paths[-1], quality=90)
    return paths


# ------------------------------------------------------------------------- the app ---------
def rss_mib(pid: int) -> dict[str, float]:
    """Current and peak resident memory of one process, in MiB."""
    try:
        import psutil  # noqa: PLC0415 - optional

        info = psutil.Process(pid).memory_info()
        peak = getattr(info, "peak_wset", None)  # Windows only; elsewhere VmHWM below
        if peak is not None:
            return {"rss": info.rss / 2**20, "peak": peak / 2**20}
    except ImportError:
        pass
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024  # kB
    return {"rss": fields["VmRSS"], "peak": fields["VmHWM"]}


class App:
    """`python app.py` in a child process, its output in a log file; a context manager."""

    def __init__(self, model: Path | None, port: int, threads: int | None, log: Path, startup_timeout: float):
        self.url, self.log, self.startup_timeout = f"http://127.0.0.1:{port}/", log, startup_timeout
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, str(ROOT / "app.py"), "--port", str(port)] + (["--model", str(model)] if model else [])
        self.cmd = cmd
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def tail(self, n: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < self.startup_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with code {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "config", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - start
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"app.py did not serve {self.url} within {self.startup_timeout:.0f} s:\n{self.tail()}")

    def __enter__(self) -> "App":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------------ the load ---------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    return float(np.percentile(values, q)) if values else float("nan")


def run(clients: int = 16, requests: int = 10, model: Path | None = None, images: int = 4, beam: int = 3,
        max_len: int = 20, topk: int = 3, threads: int | None = None, request_timeout: float = 300.0,
        startup_timeout: float = 300.0, log=print) -> dict:
    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory(prefix="captioner-load-") as tmp:
        tmp = Path(tmp)
        pictures = make_images(tmp / "images", images)
        port = free_port()
        with App(model, port, threads, tmp / "app.log", startup_timeout) as app:
            startup_s = app.wait_ready()
            idle = rss_mib(app.proc.pid)
            log(f"app ready on {app.url} in {startup_s:.1f} s (pid {app.proc.pid}, RSS {idle['rss']:.0f} MiB)")
            users = [Client(app.url, verbose=False, analytics_enabled=False, download_files=False)
                     for _ in range(clients)]
            latencies: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            gate = threading.Barrier(clients + 1)

            def user(k: int) -> None:
                gate.wait()
                for r in range(requests):
                    picture = pictures[(k + r) % len(pictures)]
                    t0 = time.perf_counter()
                    try:
                        job = users[k].submit(handle_file(str(picture)), beam, max_len, topk, api_name="/caption")
                        text, _alternatives, _attention = job.result(timeout=request_timeout)
                        problem = None if isinstance(text, str) and text.strip() else f"empty caption {text!r}"
                    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                    dt = time.perf_counter() - t0
                    with lock:
                        if problem:
                            errors.append(f"client {k} request {r}: {problem}")
                        else:
                            latencies.append(dt)

            threads_ = [threading.Thread(target=user, args=(k,), daemon=True) for k in range(clients)]
            for t in threads_:
                t.start()
            gate.wait()
            start = time.perf_counter()
            for t in threads_:
                t.join()
            wall = time.perf_counter() - start
            memory = rss_mib(app.proc.pid)
            alive = app.proc.poll() is None
            for c in users:
                try:
                    c.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
    total = clients * requests
    return {
        "clients": clients, "requests_per_client": requests, "requests": total, "ok": len(latencies),
        "errors": len(errors), "error_messages": errors[:20], "app_alive_after": alive,
        "model": str(model) if model else "shipped (captioner/assets/model.pt)",
        "decoding": {"beam": beam, "max_len": max_len, "topk": topk}, "images": images,
        "wall_s": round(wall, 3), "throughput_rps": round(len(latencies) / wall, 3) if wall else None,
        "latency_s": {"p50": round(percentile(latencies, 50), 3), "p95": round(percentile(latencies, 95), 3),
                      "max": round(max(latencies), 3) if latencies else None,
                      "mean": round(statistics.fmean(latencies), 3) if latencies else None},
        "app_rss_mib": {"idle": round(idle["rss"], 1), "end": round(memory["rss"], 1),
                        "peak": round(memory["peak"], 1)},
        "startup_s": round(startup_s, 2), "app_threads": threads or "default",
        "machine": {"cpus": os.cpu_count(), "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=10, help="requests per client (default 10)")
    p.add_argument("--model", type=Path, default=None, help="checkpoint; default: the shipped model")
    p.add_argument("--images", type=int, default=4, help="different generated images to cycle through (default 4)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the app (default: inherited)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.images) < 1:
        p.error("--clients, --requests and --images must be >= 1")
    print(f"load test: {args.clients} clients x {args.requests} requests on /caption", file=sys.stderr)
    res = run(args.clients, args.requests, args.model, args.images, args.beam, args.max_len, args.topk,
              args.threads, log=lambda m: print(m, file=sys.stderr))
    lat = res["latency_s"]
    print(f"requests {res['requests']}  ok {res['ok']}  errors {res['errors']}  wall {res['wall_s']:.1f} s  "
          f"throughput {res['throughput_rps']:.2f} req/s  latency p50 {lat['p50']:.2f} s  p95 {lat['p95']:.2f} s  "
          f"max {lat['max']} s  app peak RSS {res['app_rss_mib']['peak']:.0f} MiB")
    for m in res["error_messages"]:
        print(f"  error: {m}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0 if res["errors"] == 0 and res["app_alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
