"""The real `captioner` command, as users run it: a subprocess with a fresh HOME and CAPTIONER_CACHE, the shipped
model and a timeout, over every runtime path (issue 23). `--backend auto` picks per CPU, so each of its four
answers is forced here (by writing its measurement into the fresh cache) and every CPU runs every path; worker
counts 0, 1 and 2; one batch and several; stdout, CSV, JSONL and SQLite; `video`, `evaluate`, `cache`.

A forked worker that inherits a live ONNX Runtime session hangs (issue 23): these tests then fail at their
subprocess timeout, with the command named, instead of hanging the suite."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import picture

from captioner.runtime.workers import PRELOAD

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("captioner")  # the console script pip installed beside this python
COMMAND = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "captioner"]
TIMEOUT = 240  # seconds for one command, export and measurement included; a hang fails here
FORCED = ("onnx/onnx", "torch/onnx", "onnx/torch", "torch/torch")  # auto's possible answers: ENCODER/DECODER
N = 5
CHECKPOINT = ROOT / "captioner" / "assets" / "model.pt"  # the torch backends' shipped model (the default is the bundle)


def fresh_env(root: Path) -> dict[str, str]:
    """A new user: an empty HOME and cache (onnxruntime and captioner write under them), no progress bars."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "CAPTIONER_"))}
    return {**env, "HOME": str(home), "CAPTIONER_CACHE": str(root / "cache"), "GRADIO_ANALYTICS_ENABLED": "False"}


def captioner(env: dict[str, str], *args: object, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    argv = [*COMMAND, *map(str, args)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"`captioner {' '.join(map(str, args))}` did not finish in {timeout} s (a hang?); "
                    f"stderr: {err[-1500:]}")


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    return res


def runtimes(res: subprocess.CompletedProcess) -> str:
    """ENCODER/DECODER as the command logged it with -v."""
    line = next(x for x in res.stderr.splitlines() if x.startswith("runtimes: "))
    enc, dec = line.removeprefix("runtimes: encoder ").split(", decoder step ")
    return f"{enc}/{dec}"


def force_auto(cache: Path, choice: str) -> None:
    """Write auto's answer for this CPU and the shipped model into `cache`, as its measurement would."""
    from captioner.pipeline.captioner import Captioner
    from captioner.runtime.backends import choice_path

    cap = Captioner.load(prepare=False)
    cap.encoder.prepare_inference(cap.device, bf16=False)  # the key names the prepared fp32 encoder
    encoder, decoder = choice.split("/")
    path = choice_path(cap, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"backend": encoder, "reason": "forced by the test", "ms_per_image": {},
                                "decoder": decoder, "decoder_reason": "forced by the test",
                                "decoder_ms_per_step": {}}))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five 320x240 pictures: three JPEGs (the workers' JPEG decoder), two PNGs."""
    d = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(["a.jpg", "b.png", "c.jpg", "d.jpg", "e.png"]):
        picture(i, (320, 240)).save(d / name)
    return d


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One user's cache for the matrix, so each ONNX export is made once; auto's record is rewritten per test."""
    return tmp_path_factory.mktemp("user")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from test_app import make_video

    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=4)


@contextlib.contextmanager
def serving_app(env: dict[str, str], flags: list[str]) -> Iterator[Any]:
    """`python app.py --port P FLAGS` as users start it, with `env`: a gradio Client once its page answers (the
    app is stopped after the block; one that exits or does not answer in TIMEOUT s fails the test)."""
    import gradio_client
    from test_app import free_port

    port = free_port()
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port), *flags], env=env, cwd=ROOT,
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + TIMEOUT
        client = None
        while client is None:
            assert app.poll() is None, f"app.py exited {app.returncode}: {app.stderr.read().decode()[-1500:]}"
            assert time.monotonic() < deadline, "app.py did not serve its page in time"
            try:
                client = gradio_client.Client(url, verbose=False, analytics_enabled=False)
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        yield client
    finally:
        app.terminate()
        try:
            app.wait(timeout=30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(900)
def test_first_run_on_a_new_cpu(photos, tmp_path):
    """Nothing cached: the command exports both networks, measures auto's choice, then captions, in one
    process: one batch (the README's first line) and several batches with 2 workers."""
    env = fresh_env(tmp_path / "one")
    res = ok(captioner(env, "caption", photos, "--backend", "auto", "-v"))
    assert len(res.stdout.splitlines()) == N and all("\t" in x and x.split("\t")[1] for x in res.stdout.splitlines())
    assert "measuring the torch and onnx backends" in res.stderr
    env = fresh_env(tmp_path / "several")
    ok(captioner(env, "caption", photos, "--backend", "auto", "--batch-size", "2", "--workers", "2", "-o",
                 tmp_path / "out.jsonl"))
    assert len(rows_of(tmp_path / "out.jsonl")) == N
    assert list((tmp_path / "several" / "cache" / "backend").glob("choice-*.json"))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("choice", FORCED)
def test_caption_with_each_answer_of_auto(choice, photos, shared_cache, tmp_path):
    """auto's answer forced: the one-batch stdout run (default workers), then workers 0 and 2 over three
    batches: the same captions, from the runtimes auto chose."""
    env = fresh_env(shared_cache)
    force_auto(shared_cache / "cache", choice)
    res = ok(captioner(env, "caption", photos, "--backend", "auto", "-v"))
    assert runtimes(res) == choice
    stdout = sorted((Path(x.split("\t")[0]).name, x.split("\t")[1]) for x in res.stdout.splitlines())
    assert len(stdout) == N and all(c for _, c in stdout)
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        res = ok(captioner(env, "caption", photos, "--backend", "auto", "--batch-size", "2", "--workers", workers, "-o",
                           out, "-v"))
        assert runtimes(res) == choice
        rows = rows_of(out)
        assert not any(r["error"] for r in rows) and sorted((Path(r["path"]).name, r["caption"]) for r in rows) == stdout


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-checkpoint"])
def test_caption_with_each_backend_flag(backend, photos, shared_cache, tmp_path):
    """--backend torch|onnx (the bundle; and a checkpoint exported at run time): one worker to CSV, two to a SQLite
    library (several batches each)."""
    env = fresh_env(shared_cache)
    expected = {"torch": "torch/torch"}.get(backend, "onnx/onnx")
    flags = ["--backend", "onnx", "--model", CHECKPOINT] if backend == "onnx-checkpoint" else ["--backend", backend]
    out = tmp_path / "w1.csv"
    res = ok(captioner(env, "caption", photos, *flags, "--batch-size", "2", "--workers", "1", "-o", out, "-v"))
    assert runtimes(res) == expected and len(out.read_text().splitlines()) == N + 1
    lib = tmp_path / "lib.sqlite"
    res = ok(captioner(env, "caption", photos, *flags, "--batch-size", "2", "--workers", "2", "-o", lib, "-v"))
    assert runtimes(res) == expected and "5 captioned" in res.stderr


@pytest.mark.timeout(900)
def test_caption_with_int8(photos, shared_cache, tmp_path):
    env = fresh_env(shared_cache)
    ok(captioner(env, "calibrate", photos, "--count", N))
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        res = ok(captioner(env, "caption", photos, "--int8", "--batch-size", "2", "--workers", workers, "-o", out,
                           "-v"))
        assert runtimes(res) == "onnx-int8/onnx" and len(rows_of(out)) == N


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="the compiled encoder needs g++")
def test_caption_with_the_compiled_encoder(photos, shared_cache, tmp_path):
    env = fresh_env(shared_cache)
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.jsonl"
        res = ok(captioner(env, "caption", photos, "--backend", "compiled", "--batch-size", "2", "--workers", workers,
                           "-o", out, "-v"))
        assert runtimes(res) == "compiled/torch" and len(rows_of(out)) == N


@pytest.mark.timeout(900)
def test_write_metadata_with_workers(photos, shared_cache, tmp_path):
    if shutil.which("exiftool") is None:
        pytest.skip("exiftool is not installed (apt-get install libimage-exiftool-perl)")
    env = fresh_env(shared_cache)
    force_auto(shared_cache / "cache", "onnx/onnx")
    folder = shutil.copytree(photos, tmp_path / "photos")
    res = ok(captioner(env, "caption", folder, "--sidecar", "--batch-size", "2", "--workers", "2"))
    assert len(list(folder.glob("*.xmp"))) == N, res.stderr


@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", [f"auto:{c}" for c in FORCED] + ["torch", "onnx", "onnx-checkpoint"])
def test_video_with_each_runtime(how, clip, shared_cache, tmp_path):
    """onnx: the default, the shipped bundle (no torch); onnx-checkpoint: the shipped .pt exported at run time."""
    env = fresh_env(shared_cache)
    flags = ["--backend", how]
    if how.startswith("auto:"):
        force_auto(shared_cache / "cache", how[5:])
        flags = ["--backend", "auto"]
    elif how == "onnx-checkpoint":
        flags = ["--backend", "onnx", "--model", CHECKPOINT]
    out = tmp_path / "clip.json"
    res = ok(captioner(env, "video", clip, "--every", "1", "-o", out, "-v", *flags))
    assert runtimes(res) == {"torch": "torch/torch", "onnx": "onnx/onnx", "onnx-checkpoint": "onnx/onnx"}.get(how, how[5:])
    assert len(json.loads(out.read_text())["videos"][0]["times"]) == 4


@pytest.mark.timeout(900)
def test_cache_and_evaluate_with_workers(shared_cache, tmp_path):
    """Feature extraction's image-loading workers (`cache`, and `evaluate` on its split) at 0 and 2 workers: the
    same features either way."""
    from synth import make_dataset

    data = make_dataset(tmp_path / "shapes", n_train=8, n_val=6, n_test=6)
    env = fresh_env(shared_cache)
    for workers in (0, 2):
        ok(captioner(env, "cache", "--data", data, "--workers", workers, "--cache-dir", tmp_path / f"c{workers}"))
    a, b = (sorted((tmp_path / f"c{w}").glob("feats-*.npy")) for w in (0, 2))
    assert [p.name for p in a] == [p.name for p in b] and a and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    res = ok(captioner(env, "evaluate", "--data", data, "--split", "test", "--workers", "2", "--json",
                       "--cache-dir", tmp_path / "e"))
    assert "bleu" in res.stdout.lower()


def test_the_fork_server_imports_no_runtime():
    """The fork server imports PRELOAD and forks workers from there: none of it may start onnxruntime (it
    starts a thread at import) or a torch pool, which the workers would inherit live."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in PRELOAD) +
            "assert 'onnxruntime' not in sys.modules, 'onnxruntime'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-1500:]


class _Stalls:
    """A Captioner stand-in whose workers stall on the last, one-image batch (picklable: module level)."""

    def __init__(self, cap):
        self.cap, self.device, self.transform = cap, cap.device, cap.transform

    def search_config(self, **kw):
        return self.cap.search_config(**kw)

    def caption_tensors(self, x, cfg=None):
        if len(x) == 1:
            time.sleep(3600)  # pytest-timeout fails the test if the job waits for this worker
        return self.cap.caption_tensors(x, cfg)


@pytest.mark.timeout(300)
def test_a_stalled_worker_stops_the_job_with_one_error(tiny_model, good_folder):
    """No batch for worker_timeout seconds: one CaptionerError saying so, the batches before it delivered."""
    from captioner.errors import CaptionerError
    from captioner.pipeline.batch import caption_files
    from captioner.pipeline.captioner import Captioner

    delivered: list = []
    paths = sorted(good_folder.glob("*.png"))
    assert len(paths) == 5
    with pytest.raises(CaptionerError, match=r"no caption worker finished a batch in 3 s.*4 images were captioned"):
        caption_files(_Stalls(Captioner.load(tiny_model)), paths, batch_size=2, workers=2, worker_timeout=3,
                      on_batch=delivered.extend)
    assert len(delivered) == 4 and all(r["caption"] for r in delivered)


def test_worker_timeout_is_checked_before_anything_loads(tmp_path):
    res = captioner(fresh_env(tmp_path), "caption", tmp_path, "--worker-timeout", "0", timeout=60)
    assert res.returncode == 2 and "--worker-timeout" in res.stderr


@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["onnx", "auto:onnx/onnx"])
def test_app_batch_and_video_tabs_with_the_onnx_encoder(backend, photos, clip, shared_cache):
    """app.py as users start it, on the onnx encoder: the Batch and Video tabs through their API endpoints."""
    gradio_client = pytest.importorskip("gradio_client")
    env = fresh_env(shared_cache)
    flags = ["--backend", backend]
    if backend.startswith("auto:"):
        force_auto(shared_cache / "cache", backend[5:])
        flags = ["--backend", "auto"]
    with serving_app(env, flags) as client:
        files = [gradio_client.handle_file(str(p)) for p in sorted(photos.iterdir())]
        _, table, csv_path, _, _ = client.predict(files, 1, api_name="/caption_batch")
        rows = table["data"] if isinstance(table, dict) else table
        assert len(rows) == N and all(r[1] and not r[3] for r in rows), rows
        frames, segments, srt, _ = client.predict(gradio_client.handle_file(str(clip)), 1.0, False, 1,
                                                  api_name="/caption_video")
        assert len(frames) == 4 and Path(srt).read_text(encoding="utf-8").strip()
