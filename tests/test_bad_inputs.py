"""A corpus of bad (and oddly good) inputs, generated here, thrown at every entry point:
`captioner caption` on a folder of images, the app's batch endpoint, `captioner video` on several
files, and broken / hostile checkpoints for `captioner caption` and `app.py`. Plus faults: output
that cannot be written (disk full, parent is a file) and a disk full while saving a checkpoint.

Every failure must be one clear line naming the file (no traceback, no Python exception class
names), the good inputs next to it must still be captioned, and the process / app must live on."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import socket
import struct
import subprocess
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import picture
from PIL import Image

from captioner.cli.main import main
from captioner.errors import CaptionerError
from captioner.media.images import path_from_text

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
# A Python exception class name or a traceback leaking into a user-facing message.
LEAK = re.compile(r"Traceback|\b[A-Z][A-Za-z]*(Error|Exception|Warning)\b|File \"")
# A valid 8x8 RGB Photoshop file (header, three empty sections, raw black pixels): PIL cannot write
# PSD, but it could read this one; the captioner refuses it on purpose.
PSD = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3) + bytes(12) + bytes(2 + 3 * 64)
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(range(256)) * 2
UNREADABLE = "unreadable.png"  # open() of this name fails with EACCES (simulated: root reads anything)
LONG = "l" * 246 + ".png"  # 250 bytes
NON_UTF8 = b"caf\xe9.png"


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A 1x1 PNG whose header says side x side (checksum fixed, so only the size is wrong)."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def image_corpus(d: Path) -> tuple[dict[str, str | None], list[Path]]:
    """Write the corpus into d. Returns ({file name: None if it must be captioned, else a phrase its
    error must contain}, [files outside the folder scan that must be named explicitly])."""
    d.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str | None] = {}

    def put(name: str, data: bytes, error: str | None) -> None:
        (d / name).write_bytes(data)
        expect[name] = error

    # --- good, if odd -------------------------------------------------------------------------
    put("plain.jpg", encoded(picture(1), "JPEG"), None)
    put("png_named.jpg", encoded(picture(2), "PNG"), None)
    put("one_pixel.png", encoded(Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"), None)
    g16 = Image.fromarray((np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16))
    assert g16.mode.startswith("I;16") or g16.mode == "I"
    put("sixteen_bit.png", encoded(g16, "PNG"), None)
    put("cmyk.jpg", encoded(picture(3).convert("CMYK"), "JPEG"), None)
    pal = picture(4).convert("P")
    put("palette_alpha.png", encoded(pal, "PNG", transparency=0), None)
    frames = [picture(i) for i in (5, 6, 7)]
    put("animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0), None)
    rot = picture(8, (40, 20))
    exif = rot.getexif()
    exif[0x0112] = 6
    put("exif_rotated.jpg", encoded(rot, "JPEG", exif=exif), None)
    put("grey.png", encoded(picture(9).convert("L"), "PNG"), None)
    put(LONG, encoded(picture(10), "PNG"), None)
    fd = os.open(os.fsencode(d) + b"/" + NON_UTF8, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, encoded(picture(11), "PNG"))
    os.close(fd)
    expect[os.fsdecode(NON_UTF8)] = None
    # --- bad ----------------------------------------------------------------------------------
    put("zero_bytes.jpg", b"", "empty file")
    full = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)),
                   "JPEG", quality=90)
    put("truncated.jpg", full[: len(full) // 2], "truncated")
    put("text.png", b"this is a text file, not a picture\n" * 20, "not an image")
    put("bomb.png", bomb_png(30000), "too large")
    put("heic_named.png", HEIC, "unsupported format (HEIC")
    put("psd_named.jpg", PSD, "unsupported format (Photoshop")
    put(UNREADABLE, encoded(picture(12), "PNG"), "permission denied")
    (d / "loop.png").symlink_to("loop.png")  # a symbolic link to itself
    expect["loop.png"] = "symbolic link"
    (d / "dangling.png").symlink_to("no-such-file.png")
    expect["dangling.png"] = "broken symbolic link"
    (d / "loopdir").symlink_to(".", target_is_directory=True)  # a folder loop: walked once, never forever
    # unsupported extensions are not picked up from a folder: named explicitly
    explicit = []
    for name, data, error in (("photo.heic", HEIC, "unsupported format (HEIC"),
                              ("art.psd", PSD, "unsupported format (Photoshop")):
        (d.parent / name).write_bytes(data)
        explicit.append(d.parent / name)
        expect[name] = error
    return expect, explicit


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None], list[Path]]:
    root = tmp_path_factory.mktemp("corpus")
    expect, explicit = image_corpus(root / "images")
    assert len(expect) >= 20
    return root / "images", expect, explicit


# A wrapper around the CLI that makes open() of UNREADABLE fail with EACCES, in captioner.media.images only
# (a chmod 000 is no obstacle to root, which these tests may run as).
DENY = f"""
import sys, builtins, captioner.media.images as images
from captioner.cli.main import main
from captioner.errors import CaptionerError
def _open(file, *a, **k):
    if str(file).endswith({UNREADABLE!r}):
        raise PermissionError(13, "Permission denied", str(file))
    return builtins.open(file, *a, **k)
images.open = _open
sys.exit(main(sys.argv[1:]))
"""


def run_cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DENY, *map(os.fsdecode, map(str, args))], capture_output=True,
                          timeout=timeout, env=ENV, cwd=ROOT, text=True, errors="surrogateescape")


def clean(message: str) -> None:
    assert message and "\n" not in message and not LEAK.search(message), message


# ------------------------------------------------------------------------- images: CLI ------
def test_cli_image_corpus(corpus, tiny_model, tmp_path):
    folder, expect, explicit = corpus
    out = tmp_path / "out.jsonl"
    proc = run_cli("caption", folder, *explicit, "-r", "-o", out, "--model", tiny_model, "--workers", 0,
                   "--batch-size", 4, "--no-progress")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    text = out.read_bytes().decode("utf-8")  # valid UTF-8: odd names are escaped (images.path_text)
    rows = {Path(path_from_text(r["path"])).name: r for r in map(json.loads, text.splitlines())}
    assert sorted(rows) == sorted(expect), set(rows) ^ set(expect)
    for name, error in expect.items():
        r = rows[name]
        if error is None:
            assert r["caption"] and r["error"] is None and r["score"] < 0, (name, r)
        else:
            assert not r["caption"] and r["score"] is None, (name, r)
            clean(r["error"])
            assert error in r["error"], (name, r["error"])
    err_lines = proc.stderr.strip().splitlines()
    bad = [n for n, e in expect.items() if e]
    summary = err_lines.pop()  # item 8: counts, with the files a folder held that are not images
    assert summary == f"captioner: {len(expect) - len(bad)} captioned (2 with a warning), {len(bad)} failed, 0 skipped"
    warned = [line for line in err_lines if ": warning: " in line]  # under 32 px on a side
    assert len(warned) == 2 and "exif_rotated.jpg: warning: only 20x40 pixels (under 32 on a side)" in warned[0]
    assert "one_pixel.png: warning: only 1x1 pixels (under 32 on a side)" in warned[1]
    assert rows["one_pixel.png"]["warning"].startswith("only 1x1 pixels") and rows["plain.jpg"]["warning"] is None
    err_lines = [line for line in err_lines if line not in warned]
    assert len(err_lines) == len(bad), proc.stderr
    for line in err_lines:
        assert line.startswith("captioner: ") and not LEAK.search(line), line


# ------------------------------------------------------------------------- images: app ------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_client(tiny_model, tmp_path_factory):
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    from captioner.app import ui
    from captioner.pipeline.captioner import Captioner

    demo = ui.build_demo(Captioner.load(tiny_model))
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False,
                                   download_files=str(tmp_path_factory.mktemp("downloads")))
    finally:
        demo.close()


@pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")
def test_app_batch_image_corpus(corpus, app_client, tiny_model, monkeypatch, tmp_path):
    from gradio_client import handle_file

    from captioner.media import images

    folder, expect, explicit = corpus
    real_open = open

    def deny(file, *args, **kwargs):  # the server runs in this process: the same simulated EACCES
        if str(file).endswith(UNREADABLE):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(images, "open", deny, raising=False)
    # links cannot be uploaded (the client reads the file, a browser would too), nor can a name that is not
    # text (HTTP form fields are UTF-8; a browser sends such a name with U+FFFD, as the copy below has)
    files = [p for p in folder.iterdir() if not p.is_symlink() and p.name != os.fsdecode(NON_UTF8)] + explicit
    copy = tmp_path / "caf\ufffd.png"
    copy.write_bytes((folder / os.fsdecode(NON_UTF8)).read_bytes())
    files = sorted([*files, copy], key=lambda p: p.name)
    expect = {**expect, copy.name: None}
    uploads = [handle_file(str(p)) for p in files]
    thumbs, table, csv_path, jsonl_path, _ = app_client.predict(uploads, 2, api_name="/caption_batch")
    rows = table["data"] if isinstance(table, dict) else table
    assert len(rows) == len(files)
    for r, p in zip(rows, files):  # Gradio shortens a very long upload name (to 200 characters), keeping the suffix
        assert r[0] == p.name or (len(p.name) > 200 and r[0].endswith(p.suffix) and p.name.startswith(r[0][:-4])), r[0]
    # the same per-file results as the CLI: same errors, same captions
    cli_out = tmp_path / "cli.jsonl"
    assert main(["caption", *map(str, files), "-o", str(cli_out), "--model", str(tiny_model), "--workers", "0",
                 "--no-progress", "--beam", "2"]) == 3
    cli = {Path(r["path"]).name: r for r in map(json.loads, cli_out.read_text(errors="surrogateescape").splitlines())}
    for (_, caption, score, error, *_), key in zip(rows, (p.name for p in files)):
        name = key
        assert (expect[key] is None) == (not error), (name, error)
        if error:
            clean(error)
            assert expect[key] in error and error == cli[key]["error"], (name, error)
        else:
            assert caption == cli[key]["caption"] and score == pytest.approx(cli[key]["score"], abs=1e-3)
    assert len(thumbs) == sum(1 for r in rows if not r[3])
    records = [json.loads(line) for line in Path(jsonl_path).read_text(encoding="utf-8").splitlines()]
    assert [(r["caption"], r["error"] or "") for r in records] == [(r[1], r[3]) for r in rows]
    # the app is still alive and well
    text, _, _ = app_client.predict(handle_file(str(folder / "plain.jpg")), 2, 8, 2, api_name="/caption")
    assert text


# ------------------------------------------------------------------------------- videos ------
CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path: Path, size=(64, 48), frames: int = 10, fps: int = 5) -> Path:
    w, h = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if CODEC == "libx264":
            stream.codec_context.options = {"preset": "ultrafast", "crf": "51"}
        for i in range(frames):  # made in YUV directly: no RGB conversion of a huge frame
            yuv = np.full((h * 3 // 2, w), 40 + 40 * (i * 4 // frames), np.uint8)
            frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        fmt = stream.codec_context.codec.audio_formats[0].name
        for i in range(8):
            arr = (np.sin(np.arange(1024) / 8.0) * 0.3).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(arr, format=fmt, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 16000, i * 1024, Fraction(1, 16000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def no_frames(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(CODEC, rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[list[Path], dict[str, str | None]]:
    d = tmp_path_factory.mktemp("videos")
    good = write_video(d / "good.mp4")
    (d / "zero_bytes.mp4").write_bytes(b"")
    data = good.read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 3])
    huge = write_video(d / "huge.mp4", size=(8000, 8000), frames=1, fps=1)
    assert huge.stat().st_size < 5 * 2**20
    paths = [d / "zero_bytes.mp4", d / "truncated.mp4", good, audio_only(d / "audio_only.m4a"),
             no_frames(d / "no_frames.mp4"), huge]
    # None: captioned. An MP4 whose video track got no frame has no stream at all. The 8000x8000 frame
    # (64 Mpixel: under the image limit too) decodes in ~100 MB and is captioned like any other.
    expect = {"zero_bytes.mp4": "empty file", "truncated.mp4": "not a readable video", "good.mp4": None,
              "audio_only.m4a": "no video stream", "no_frames.mp4": "no video stream", "huge.mp4": None}
    return paths, expect


def test_cli_video_corpus(videos, tiny_model, tmp_path):
    paths, expect = videos
    out = tmp_path / "out.json"
    proc = run_cli("video", *paths, "-o", out, "--model", tiny_model, "--every", 1, timeout=180)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    bad = {n: e for n, e in expect.items() if e}
    assert len(lines) == len(bad), proc.stderr
    for line, (name, error) in zip(lines, bad.items()):
        assert line.startswith("captioner: error: ") and name in line and error in line, line
        clean(line.removeprefix("captioner: error: "))
    done = json.loads(out.read_text())["videos"]
    assert [Path(v["path"]).name for v in done] == [n for n, e in expect.items() if e is None]
    good = done[0]
    assert good["duration"] == pytest.approx(2.0, abs=0.3) and len(good["captions"]) == 2 and all(good["captions"])
    assert len(done[1]["captions"]) == 1 and done[1]["captions"][0]


# -------------------------------------------------------------------------- checkpoints ------
class Payload:
    """Unpickling this runs code: it writes the marker file (what an attacker's checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory) -> tuple[dict[str, tuple[Path, str]], Path]:
    """{kind: (file, phrase the error must contain)}, and the marker file no load may create."""
    d = tmp_path_factory.mktemp("checkpoints")
    marker = d / "PWNED"
    data = tiny_model.read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(tiny_model, weights_only=True)
    torch.save({**ckpt, "vocab": ckpt["vocab"] + ["extra", "words"]}, d / "vocab_mismatch.pt")
    cfg = {**ckpt["config"], "decoder": {**ckpt["config"]["decoder"], "vocab_size": len(ckpt["vocab"]) + 2}}
    torch.save({**ckpt, "config": cfg, "vocab": ckpt["vocab"] + ["extra", "words"]}, d / "weights_mismatch.pt")
    torch.save({"format": ckpt["format"], "vocab": ckpt["vocab"]}, d / "missing_keys.pt")
    torch.save({**ckpt, "config": Payload(marker)}, d / "code.pt")  # torch's zip format, pickle inside
    (d / "code.pkl").write_bytes(pickle.dumps({"format": "captioner/1", "x": Payload(marker)}, protocol=2))
    kinds = {"truncated": (d / "truncated.pt", "corrupt or truncated"),
             "vocab_mismatch": (d / "vocab_mismatch.pt", "vocabulary has"),
             "weights_mismatch": (d / "weights_mismatch.pt", "weights do not match"),
             "missing_keys": (d / "missing_keys.pt", "not a valid captioner checkpoint"),
             "code_zip": (d / "code.pt", "refused to load"),
             "code_pickle": (d / "code.pkl", "refused to load")}
    # the payload is real: a plain pickle.load would run it
    pickle.loads((d / "code.pkl").read_bytes())
    assert marker.exists()
    marker.unlink()
    return kinds, marker


def test_bad_checkpoints_cli(checkpoints, corpus, capsys):
    kinds, marker = checkpoints
    image = corpus[0] / "plain.jpg"
    for kind, (path, phrase) in kinds.items():
        assert main(["caption", str(image), "--model", str(path), "--workers", "0", "--no-progress"]) == 1, kind
        err = capsys.readouterr().err.strip()
        assert err.startswith("captioner: error: ") and "\n" not in err and phrase in err and path.name in err, err
        clean(err.removeprefix("captioner: error: "))
        assert not marker.exists(), kind
    # and as a separate process, for the hostile one
    proc = run_cli("caption", image, "--model", kinds["code_zip"][0])
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "refused to load" in proc.stderr and not marker.exists()


def test_bad_checkpoints_app_py(checkpoints, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("captioner_app_py", ROOT / "app.py")
    app_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app_py)
    kinds, marker = checkpoints
    for kind, (path, phrase) in kinds.items():  # app.py's main(), in this process (a fresh one costs seconds)
        assert app_py.main(["--model", str(path), "--port", str(free_port())]) == 1, kind
        err = capsys.readouterr().err.strip()
        assert err.startswith("app.py: error: ") and "\n" not in err and phrase in err, (kind, err)
        clean(err.removeprefix("app.py: error: "))
    # and `python app.py` itself on the hostile checkpoint: exit 1, one line, the payload never ran
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(kinds["code_zip"][0]), "--port",
                           str(free_port())], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "refused to load" in proc.stderr and not marker.exists()


# ------------------------------------------------------------------------------- faults ------
def caption_to(out: Path, good_folder: Path, tiny_model: Path, *extra: str) -> int:
    return main(["caption", str(good_folder), "-o", str(out), "--model", str(tiny_model), "--workers", "0",
                 "--batch-size", "2", "--no-progress", *extra])


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("captioner: error: cannot write "), err
    clean(lines[0].removeprefix("captioner: error: "))
    return lines[0]


def test_output_parent_is_a_file(good_folder, tiny_model, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file\n")
    out = tmp_path / "file" / "out.jsonl"
    assert caption_to(out, good_folder, tiny_model) == 1
    assert "Not a directory" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_output_cannot_be_opened(good_folder, tiny_model, tmp_path, capsys, monkeypatch, code):
    from captioner.pipeline import batch

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(batch, "open", refuse, raising=False)
    out = tmp_path / "out.jsonl"
    assert caption_to(out, good_folder, tiny_model) == 1
    assert os.strerror(code) in one_error_line(capsys.readouterr().err) and not out.exists()


def disk_full_after(monkeypatch, good_syncs: int) -> None:
    """os.fsync succeeds good_syncs times, then the disk is full (the data was written, not synced)."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > good_syncs:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_disk_full_on_first_write_leaves_no_file(good_folder, tiny_model, tmp_path, capsys, monkeypatch, fmt):
    out = tmp_path / f"out.{fmt}"
    disk_full_after(monkeypatch, 0)
    assert caption_to(out, good_folder, tiny_model) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "nothing was written" in line
    assert not out.exists()  # no empty (or header-only) file that looks like a finished run with 0 images


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_disk_full_mid_run_keeps_complete_batches_and_resumes(good_folder, tiny_model, tmp_path, capsys, monkeypatch, fmt):
    out = tmp_path / f"out.{fmt}"
    disk_full_after(monkeypatch, 2 if fmt == "csv" else 1)  # csv: the header is one sync of its own
    assert caption_to(out, good_folder, tiny_model) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "2 rows" in line and "--resume" in line
    from captioner.pipeline.batch import read_rows

    data = out.read_bytes()
    assert data.endswith(b"\n") and len(read_rows(out, fmt)) == 2  # the first batch, no half-written row
    assert data.count(b"\n") == 2 + (fmt == "csv")
    monkeypatch.undo()  # space freed
    assert caption_to(out, good_folder, tiny_model, "--resume") == 0
    rows = read_rows(out, fmt)
    assert sorted(Path(r["path"]).name for r in rows) == [f"ok{i}.png" for i in range(5)]
    assert all(r["caption"] for r in rows)


def test_disk_full_during_checkpoint_save(tiny_model, tmp_path, monkeypatch):
    from captioner.model import checkpoint as model
    from captioner.pipeline.captioner import Captioner
    from captioner.model.checkpoint import load_checkpoint, save_checkpoint

    target = tmp_path / "last.pt"
    target.write_bytes(tiny_model.read_bytes())  # the previous, good checkpoint
    before = target.read_bytes()
    state = {k: v for k, v in load_checkpoint(tiny_model).items() if k != "format"}
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):  # some bytes reach the temporary file first
        real_save(obj, f, *args, **kwargs)
        f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fsync_fails(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for target_attr, fake in ((model.torch, ("save", save_half_then_fail)), (model.os, ("fsync", fsync_fails))):
        with monkeypatch.context() as m:
            m.setattr(target_attr, *fake)
            with pytest.raises(CaptionerError, match="No space left on device"):
                save_checkpoint(target, {**state, "vocab": state["vocab"] + ["new"]})
        assert target.read_bytes() == before  # the previous checkpoint is untouched and still loads
        assert Captioner.load(target).vocab.itos == state["vocab"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind
    save_checkpoint(target, state)  # a good save: a plain readable file, not mkstemp's 0600
    assert target.stat().st_mode & 0o777 == 0o644 and Captioner.load(target).vocab.itos == state["vocab"]


def test_disk_full_during_training_is_one_line(tmp_path, monkeypatch, capsys):
    from synth import make_dataset

    from captioner.model import checkpoint as model
    from captioner.training import train

    data = make_dataset(tmp_path / "data", n_train=16, n_val=4, n_test=4)
    real = model.save_checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_save(path, state):  # the real save_checkpoint, with torch.save failing inside it
        with monkeypatch.context() as m:
            m.setattr(model.torch, "save", disk_full)
            real(path, state)

    monkeypatch.setattr(train, "save_checkpoint", full_disk_save)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
                 "--encoder", "pixels", "--pretrained", "false", "--epochs", "1", "--batch-size", "8",
                 "--feat-proj", "16", "--embed-dim", "8", "--hidden-dim", "16", "--attn-dim", "8", "--beam", "1",
                 "--num-workers", "0", "--min-count", "1"])
    assert code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("captioner: error: ") and "No space left on device" in lines[-1]
    assert "Traceback" not in "\n".join(lines)


@pytest.mark.parametrize("where", ["output", "frames"])
def test_video_output_cannot_be_written(videos, tiny_model, tmp_path, capsys, where):
    (tmp_path / "file").write_text("a regular file\n")
    good = next(p for p in videos[0] if p.name == "good.mp4")
    flag = ["-o", str(tmp_path / "file" / "out.json")] if where == "output" else \
        ["--frames-dir", str(tmp_path / "file" / "frames")]
    assert main(["video", str(good), "--model", str(tiny_model), *flag]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("captioner: error: cannot write ") and "file" in lines[0], lines
    clean(lines[0].removeprefix("captioner: error: "))
