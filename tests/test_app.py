"""The web app end to end: started in-process on a free port with the tiny model, driven through
its API with gradio_client (the same endpoints the UI calls)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [  # gradio's own pandas calls, not ours
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
ZIP_LIMIT = 32 * 2**20  # the app under test refuses archives that unpack to more than this
IMAGE_LIMIT = 2**20  # ... and image files larger than this


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_image(path: Path, colour=(200, 30, 30), size=(96, 72)) -> Path:
    img = Image.new("RGB", size, (240, 240, 240))
    arr = np.asarray(img).copy()
    arr[size[1] // 4: 3 * size[1] // 4, size[0] // 4: 3 * size[0] // 4] = colour
    Image.fromarray(arr).save(path)
    return path


def make_video(path: Path, seconds: int = 6, fps: int = 10) -> Path:
    """Solid colours changing every 2 s, 64x48."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    colours = [(255, 0, 0), (0, 200, 0), (0, 0, 255)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(seconds * fps):
            rgb = np.zeros((48, 64, 3), np.uint8)
            rgb[:] = colours[(i // (2 * fps)) % len(colours)]
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", None}


@pytest.fixture(scope="module")
def net_log():
    """Every host name this process resolves while the app runs (a request leaving the machine starts so)."""
    seen: list = []
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        seen.append(host.decode() if isinstance(host, bytes) else host)
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo
    try:
        yield seen
    finally:
        socket.getaddrinfo = real


@pytest.fixture(scope="module")
def app(tiny_model, net_log):
    from captioner.app import ui
    from captioner.pipeline.captioner import Captioner

    demo = ui.build_demo(Captioner.load(tiny_model), max_zip_bytes=ZIP_LIMIT, max_image_bytes=IMAGE_LIMIT)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app, tmp_path_factory):
    return Client(app[1], verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("downloads")))


def rows_of(table) -> list[list]:
    return table["data"] if isinstance(table, dict) else table


# ------------------------------------------------------------------------------ image ------
def test_caption_image(client, tmp_path):
    text, alternatives, attention = client.predict(handle_file(str(write_image(tmp_path / "a.png"))), 3, 8, 3,
                                                   api_name="/caption")
    words = text.split()
    assert 1 <= len(words) <= 8
    rows = rows_of(alternatives)
    assert 1 <= len(rows) <= 3 and rows[0][0] == text
    scores = [r[1] for r in rows]
    assert scores == sorted(scores, reverse=True)  # length penalty 0: ranked by log-prob
    for caption, total, per_word in rows:  # item 14: what is shown is what the header says
        assert per_word == pytest.approx(total / (len(caption.split()) + 1), abs=2e-3) and total < 0
    assert [item["caption"] for item in attention] == words  # one heat map per word, labelled with it
    first = attention[0]["image"]
    with Image.open(first if isinstance(first, str) else first["path"]) as im:
        assert max(im.size) <= 320


def test_caption_image_stretched_maps(client, tmp_path):
    """The API's fifth input (optional, off by default) draws each map on its own range: other pixels."""
    photo = handle_file(str(write_image(tmp_path / "a.png")))
    text, _, flat = client.predict(photo, 3, 8, 3, api_name="/caption")
    text2, _, stretched = client.predict(photo, 3, 8, 3, True, api_name="/caption")

    def pixels(item) -> np.ndarray:
        image = item["image"]
        with Image.open(image if isinstance(image, str) else image["path"]) as im:
            return np.asarray(im.convert("RGB"), np.int32)

    assert text2 == text and len(stretched) == len(flat)
    assert any(not np.array_equal(pixels(a), pixels(b)) for a, b in zip(flat, stretched))


def test_alternatives_label_says_what_the_scores_are(app):
    from captioner.app import ui

    table = next(b for b in app[0].blocks.values() if getattr(b, "elem_id", None) == "alternatives")
    assert table.label == ui.ALTERNATIVES_LABEL and "per word" in table.label and "normalised" not in table.label
    assert ui.log_probabilities(-6.0, 2, 0.0) == (-6.0, -2.0)
    assert ui.log_probabilities(-2.0, 3, 1.0) == (-8.0, -2.0)  # score = log P / 4 under penalty 1


def test_caption_example_image_greedy(client):
    from captioner.app.ui import example_images

    examples = example_images()
    assert len(examples) >= 3 and all(Path(p).stat().st_size < 100_000 for p in examples)
    text, alternatives, _ = client.predict(handle_file(examples[0]), 1, 5, 3, api_name="/caption")
    assert text and len(rows_of(alternatives)) == 1  # greedy: one hypothesis


def test_caption_rejects_non_image(client, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(bad)), 3, 8, 3, api_name="/caption")
    assert "notes.png" in str(err.value) and "not an image" in str(err.value)


def test_caption_rejects_too_large_file(client, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(b"\0" * (IMAGE_LIMIT + 1))
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(big)), 3, 8, 3, api_name="/caption")
    assert "huge.png" in str(err.value) and "limit" in str(err.value)


def test_attention_overlay_shape_and_peak():
    from captioner.app.ui import attention_overlay

    img = Image.new("RGB", (140, 70), (128, 128, 128))
    att = np.zeros((7, 7), np.float32)
    att[0, 6] = 1.0  # top-right cell
    out = np.asarray(attention_overlay(img, att), np.int32)
    assert out.shape == (70, 140, 3)
    assert np.array_equal(out, np.asarray(attention_overlay(img, att, stretch=True), np.int32))  # 0 and 1: both scales
    hot, cold = out[5, 135], out[65, 5]
    assert hot[0] > hot[2] and cold[2] > cold[0]  # red where attended, blue elsewhere
    # item 16: a one-hot map is one bright region, in its cell's corner
    red = (out[..., 0] > out[..., 2] + 40)
    ys, xs = np.nonzero(red)
    assert red.any() and ys.max() < 70 * 2 / 7 and xs.min() > 140 * 5 / 7, (ys.max(), xs.min())
    assert red.sum() > (140 / 7) * (70 / 7) / 2  # a smooth blob around the cell, not one blocky pixel


def test_attention_levels_are_absolute_unless_stretched():
    """Issue 24: one scale for every map (0 to 3x uniform), so a flat map looks flat; stretch is the old view."""
    from captioner.app.ui import ATTENTION_SCALE, attention_levels, colour_bar

    uniform = np.full((7, 7), 1 / 49, np.float32)
    assert np.allclose(attention_levels(uniform), 1 / ATTENTION_SCALE)  # flat: one colour, a third of the way
    assert np.allclose(attention_levels(uniform * 5), 1 / ATTENTION_SCALE)  # the map is normalised to sum 1 first
    nearly = uniform.copy()
    nearly[0, 0] *= 1.2  # a 20% bump: invisible on the absolute scale, full range when stretched
    assert np.ptp(attention_levels(nearly)) < 0.1 and np.isclose(np.ptp(attention_levels(nearly, stretch=True)), 1)
    one_hot = np.zeros((7, 7), np.float32)
    one_hot[3, 4] = 1
    levels = attention_levels(one_hot)
    assert levels[3, 4] == 1 and levels.sum() == 1  # 49x uniform: the top of the scale
    assert "uniform" in colour_bar() and "minimum" in colour_bar(stretch=True)


# ------------------------------------------------------------------------------ batch ------
def read_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_batch_with_a_broken_file(client, tmp_path):
    colours = [(200, 0, 0), (0, 0, 200), (0, 160, 0)]
    good = [write_image(tmp_path / f"img{i}.png", colour=c) for i, c in enumerate(colours)]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (IMAGE_LIMIT + 1))
    files = [handle_file(str(p)) for p in (good[0], broken, *good[1:], big)]
    thumbs, table, csv_path, jsonl_path, sqlite_path = client.predict(files, 2, api_name="/caption_batch")
    rows = rows_of(table)
    assert [r[0] for r in rows] == ["img0.png", "broken.jpg", "img1.png", "img2.png", "big.png"]
    by_name = {r[0]: r for r in rows}
    assert by_name["broken.jpg"][3] and not by_name["broken.jpg"][1]
    assert "too large" in by_name["big.png"][3] and not by_name["big.png"][1]
    for name in ("img0.png", "img1.png", "img2.png"):
        assert by_name[name][1] and not by_name[name][3]
    assert len(thumbs) == 3
    table_rows = read_csv(csv_path)
    assert [r["file"] for r in table_rows] == ["img0.png", "broken.jpg", "img1.png", "img2.png", "big.png"]
    assert table_rows[1]["error"] and table_rows[1]["caption"] == "" and table_rows[1]["score"] == ""
    assert all(table_rows[i]["caption"] and not table_rows[i]["error"] and float(table_rows[i]["score"]) < 0
               for i in (0, 2, 3))
    assert "too large" in table_rows[4]["error"]
    records = [json.loads(line) for line in Path(jsonl_path).read_text().splitlines()]
    assert len(records) == 5 and records[1]["error"] and records[1]["score"] is None
    assert records[0]["alternatives"][0] == [records[0]["caption"], records[0]["score"]]
    with contextlib.closing(sqlite3.connect(sqlite_path)) as con:  # the library download: the table's rows
        stored = {p: (c, e or "") for p, c, e in con.execute("SELECT path, caption, error FROM photos")}
    assert stored == {r[0]: (r[1], r[3]) for r in rows}


def test_batch_zip(client, tmp_path):
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, c in enumerate([(250, 0, 0), (0, 0, 250), (250, 250, 0)]):
            write_image(tmp_path / f"z{i}.png", colour=c)
            zf.write(tmp_path / f"z{i}.png", f"holiday/z{i}.png")
        zf.writestr("holiday/readme.txt", "not an image")
    thumbs, table, csv_path, _, _ = client.predict([handle_file(str(archive))], 1, api_name="/caption_batch")
    rows = rows_of(table)
    assert [r[0] for r in rows] == [f"photos.zip/holiday/z{i}.png" for i in range(3)]
    assert all(r[1] and not r[3] for r in rows)
    assert len(read_csv(csv_path)) == 3 and len(thumbs) == 3


def _traversal_zip(path: Path, target: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (0, 128, 0)).save(buf, "PNG")
        zf.writestr("ok.png", buf.getvalue())
        zf.writestr(zipfile.ZipInfo(target), buf.getvalue())
    return path


def _symlink_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    return path


def _bomb_zip(path: Path, megabytes: int = 200) -> Path:
    chunk = b"\0" * 2**20
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.png", "w", force_zip64=True) as f:
            for _ in range(megabytes):
                f.write(chunk)
    return path


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "bomb"])
def test_batch_malicious_zip(client, tmp_path, kind):
    tag = uuid.uuid4().hex[:10]
    upload_tmp = Path(os.environ.get("GRADIO_TEMP_DIR", "/tmp/gradio"))
    if kind == "traversal":
        name = f"../captioner-evil-{tag}.png"
        archive = _traversal_zip(tmp_path / "evil.zip", name)
        # wherever the app unpacks (its temporary folder, or Gradio's upload folder), ../ must not land
        targets = [Path("/tmp") / name[3:], upload_tmp / name[3:], tmp_path / name[3:], Path.cwd().parent / name[3:]]
    elif kind == "absolute":
        name = f"/tmp/captioner-evil-{tag}.png"
        archive = _traversal_zip(tmp_path / "evil.zip", name)
        targets = [Path(name)]
    elif kind == "symlink":
        archive, targets = _symlink_zip(tmp_path / "link.zip"), []
    else:
        archive = _bomb_zip(tmp_path / "bomb.zip")
        assert archive.stat().st_size < 2 * 2**20
        targets = []
    good = write_image(tmp_path / "beside.png")
    # item 13: the unsafe member is one error row naming it (issue 25: the archive's safe members are still
    # captioned), the image uploaded beside it is captioned
    _, table, csv_path, _, _ = client.predict([handle_file(str(archive)), handle_file(str(good))], 1,
                                           api_name="/caption_batch")
    rows = rows_of(table)
    member = name if kind in ("traversal", "absolute") else {"symlink": "link.png", "bomb": "zeros.png"}[kind]
    safe = [f"{archive.name}/ok.png"] if kind in ("traversal", "absolute") else []
    assert [r[0] for r in rows] == [*safe, f"{archive.name}/{member}", "beside.png"]
    message = rows[-2][3]
    assert "refused" in message.lower() and "/gradio/" not in message and not rows[-2][1]
    assert all(r[1] and not r[3] for r in rows if r[0] != rows[-2][0])
    assert [r["error"] for r in read_csv(csv_path)] == ["" for _ in safe] + [message, ""]
    for t in targets:
        assert not t.exists(), f"{t} was written"


# ------------------------------------------------------------------------------ video ------
SRT_CUE = re.compile(r"^(\d+)\n(\d\d:\d\d:\d\d,\d\d\d) --> (\d\d:\d\d:\d\d,\d\d\d)\n(.+)$")


def parse_srt(text: str) -> list[tuple[float, float, str]]:
    def secs(ts: str) -> float:
        h, m, rest = ts.split(":")
        s, ms = rest.split(",")
        return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000

    cues = []
    for n, block in enumerate(text.strip().split("\n\n"), 1):
        m = SRT_CUE.match(block.strip())
        assert m, f"bad SRT cue: {block!r}"
        assert int(m.group(1)) == n
        cues.append((secs(m.group(2)), secs(m.group(3)), m.group(4)))
    return cues


def test_caption_video(client, tmp_path):
    clip = make_video(tmp_path / "clip.mp4")
    frames, table, srt_path, vtt_path = client.predict(handle_file(str(clip)), 1.0, False, 1,
                                                      api_name="/caption_video")
    assert len(frames) == 6
    labels = [f["caption"] for f in frames]
    assert [lab[:7] for lab in labels] == [f"00:0{t}.0" for t in range(6)]
    assert all(re.match(r"^\d\d:\d\d\.\d \S", lab) for lab in labels)
    rows = rows_of(table)
    assert rows and rows[0][0] == 0 and rows[-1][1] == pytest.approx(6.0, abs=0.2)
    assert all(r[2] for r in rows)
    cues = parse_srt(Path(srt_path).read_text(encoding="utf-8"))
    assert len(cues) == len(rows)
    assert [c[2] for c in cues] == [r[2] for r in rows]
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(cues, cues[1:]))
    assert Path(vtt_path).read_text(encoding="utf-8").startswith("WEBVTT")


def test_caption_video_rejects_garbage(client, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\0" * 1000)
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(bad)), 1.0, False, 1, api_name="/caption_video")
    assert "bad.mp4" in str(err.value)


# -------------------------------------------------------------------------------- app.py ----
def test_api_names(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/caption", "/caption_batch", "/caption_video"} <= names


def test_app_py_fails_cleanly_without_model(tmp_path):
    missing = tmp_path / "nope.pt"
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(missing), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.pt" in lines[0] and lines[0].startswith("app.py: error:")


def test_nothing_leaves_the_machine(client, net_log):
    """Runs after the endpoint tests above (same module-scoped app): launch, uploads, captioning,
    downloads resolved no host but this one (analytics off, no share, no CDN)."""
    client.predict(handle_file(str(ROOT / "captioner" / "assets" / "examples" / "chelsea.jpg")), 1, 4, 1,
                   api_name="/caption")
    assert "127.0.0.1" in net_log  # the hook sees the client's own lookups
    outside = sorted({h for h in net_log if h not in LOCAL_HOSTS})
    assert not outside, f"the app looked up outside hosts: {outside}"


# ------------------------------------------------------------------------- input limits ----
@pytest.mark.parametrize("endpoint, args, label", [
    ("/caption", ("IMG", 0, 8, 3), "Beam size"), ("/caption", ("IMG", 100000, 8, 3), "Beam size"),
    ("/caption", ("IMG", 3, 0, 3), "Max length"), ("/caption", ("IMG", 3, 101, 3), "Max length"),
    ("/caption", ("IMG", 3, 8, 0), "Alternatives"), ("/caption_batch", (["IMG"], -3), "Beam size"),
    ("/caption_video", ("VID", -1.0, False, 1), "Sample every"), ("/caption_video", ("VID", 1.0, False, 17), "Beam size"),
])
def test_inputs_have_the_cli_limits(client, tmp_path, endpoint, args, label):
    """Item 5: the API refuses what the CLI refuses (beam 1-16, max length 1-100, ...), before any work: Gradio
    itself for values outside a slider (whose bounds lie within the CLI's), ui.in_range for the rest."""
    image = handle_file(str(write_image(tmp_path / "a.png")))
    video = handle_file(str(make_video(tmp_path / "v.mp4", seconds=1)))
    fill = lambda a: image if a == "IMG" else video if a == "VID" else [fill(x) for x in a] if isinstance(a, list) else a  # noqa: E731
    with pytest.raises(AppError) as err:
        client.predict(*map(fill, args), api_name=endpoint)
    message = str(err.value)
    assert re.match(r"Value \S+ is (less than minimum|greater than maximum) value", message) or (
        label in message and "out of range" in message), message


def test_input_bounds_lie_within_the_cli_limits(app):
    from captioner.app import ui
    from captioner.options import BEAM, EVERY, MAX_LEN, TOPK

    limits = {"Beam size": BEAM, "Max length (words)": MAX_LEN, "Alternatives": TOPK, "Sample every (seconds)": EVERY}
    seen = set()
    for block in app[0].blocks.values():
        limit = limits.get(getattr(block, "label", None))
        if limit is not None:
            seen.add(block.label)
            assert limit.lo <= block.minimum and block.maximum <= limit.hi, block.label
    assert seen == set(limits)
    with pytest.raises(Exception, match="Beam size: 0 is out of range: must be from 1 to 16"):
        ui.in_range(0, BEAM, "Beam size")
    assert ui.in_range(3.0, BEAM, "Beam size") == 3 and isinstance(ui.in_range(3.0, BEAM, "Beam size"), int)


# --------------------------------------------------------------------------- status box ----
def test_failure_reason_stays_in_the_status_box(app, tmp_path):
    """Item 12: a failed run's reason is kept for the tab's status box (read here through the same session
    as the failed call), not only in a toast; one per tab."""
    from gradio_client import Client

    from captioner.app import ui

    ids = {getattr(b, "elem_id", None) for b in app[0].blocks.values() if isinstance(b, ui.gr.Markdown)}
    assert {"image-status", "batch-status", "video-status"} <= ids
    client = Client(app[1], verbose=False, analytics_enabled=False, download_files=str(tmp_path))
    audio = tmp_path / "sound.m4a"
    from test_bad_inputs import audio_only

    audio_only(audio)
    with pytest.raises(AppError):
        client.predict(handle_file(str(audio)), 1.0, False, 1, api_name="/caption_video")
    assert client.predict(api_name="/caption_video_status") == "**Failed:** sound.m4a: no video stream (audio only: aac)"
    assert client.predict(api_name="/caption_video_status") == ""  # shown once, then cleared
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(AppError):
        client.predict(handle_file(str(bad)), 3, 8, 3, api_name="/caption")
    message = client.predict(api_name="/caption_status")
    assert message.startswith("**Failed:** notes.png: not an image"), message
