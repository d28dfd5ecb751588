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
from PIL import Image

from captioner.cli import main

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


def picture(i: int, size=(64, 48)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 235))
    img.paste(((i * 67) % 256, (i * 113) % 256, (i * 29) % 256),
              (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return img


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


# A wrapper around the CLI that makes open() of UNREADABLE fail with EACCES, in captioner.images only
# (a chmod 000 is no obstacle to root, which these tests may run as).
DENY = f"""
import sys, builtins, captioner.images as images
from captioner.cli import main
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
    text = out.read_bytes().decode("utf-8", "surrogateescape")
    rows = {Path(r["path"]).name: r for r in map(json.loads, text.splitlines())}
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
    from captioner import ui
    from captioner.model import Captioner

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

    from captioner import images

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
    files.append(tmp_path / "caf\ufffd.png")
    files[-1].write_bytes((folder / os.fsdecode(NON_UTF8)).read_bytes())
    files.sort(key=lambda p: p.name)
    expect = {**expect, files[-1].name: None}
    uploads = [handle_file(str(p)) for p in files]
    thumbs, table, csv_path, jsonl_path = app_client.predict(uploads, 2, api_name="/caption_batch")
    rows = table["data"] if isinstance(table, dict) else table
    assert len(rows) == len(files)
    for r, p in zip(rows, files):  # Gradio shortens a very long upload name (to 200 characters), keeping the suffix
        assert r[0] == p.name or (len(p.name) > 200 and r[0].endswith(p.suffix) and p.name.startswith(r[0][:-4])), r[0]
    # the same per-file results as the CLI: same errors, same captions
    cli_out = tmp_path / "cli.jsonl"
    assert main(["caption", *map(str, files), "-o", str(cli_out), "--model", str(tiny_model), "--workers", "0",
                 "--no-progress", "--beam", "2"]) == 3
    cli = {Path(r["path"]).name: r for r in map(json.loads, cli_out.read_text(errors="surrogateescape").splitlines())}
    for (_, caption, score, error), key in zip(rows, (p.name for p in files)):
        name = key
        assert (expect[key] is None) == (not error), (name, error)
        if error:
            clean(error)
            assert expect[key] in error and error == cli[key]["error"], (name, error)
        else:
            assert caption == cli[key]["caption"] and score == pytest.approx(cli[key]["score"], abs=1e-3)
    assert len(thumbs) == sum(1 for r in rows if not r[3])
    # the app is still alive and well
    text, _, _ = app_client.predict(handle_file(str(folder / "plain.jpg")), 2, 8, 2, api_name="/caption")
    assert text
