"""Issue 25, the items a second branch finished: zips (item 3), the example photos (12), lightly corrupt videos
(9), the app's layout (11), low-confidence captions (10) and the library API's argument checks."""

from __future__ import annotations

import importlib.util
import io
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import picture

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- item 3: zips ------
def png(i: int) -> bytes:
    buf = io.BytesIO()
    picture(i).save(buf, "PNG")
    return buf.getvalue()


def make_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": made on purpose
        for name, data in members:
            zf.writestr(name, data)
    return path


@pytest.fixture(scope="module")
def batch(tiny_model):
    """The app's Batch tab function: (uploaded paths) -> (rows [file, caption, score, error], toasts)."""
    gr = pytest.importorskip("gradio")
    from captioner.app import ui
    from captioner.pipeline.captioner import Captioner

    fn = ui.caption_batch_fn(Captioner.load(tiny_model), ui.WorkDir(), max_zip_bytes=2**20)

    def call(*paths: Path) -> tuple[list[list], list[str]]:
        toasts: list[str] = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gr, "Warning", lambda message, *a, **k: toasts.append(message))
            rows = fn([str(p) for p in paths], 3, progress=lambda *a, **k: None)[1]
        return [[r[0], r[1], r[3]] for r in rows], toasts
    return call


def test_zip_duplicate_names_keep_both(batch, tmp_path):
    z = make_zip(tmp_path / "dup.zip", [("a.png", png(1)), ("a.png", png(2)), ("sub/a.png", png(3))])
    rows, _ = batch(z)
    assert [r[0] for r in rows] == ["dup.zip/a.png", "dup.zip/a (2).png", "dup.zip/sub/a.png"]
    assert all(r[1] and not r[2] for r in rows)


def test_zip_empty_or_holding_only_zips_says_so(batch, tmp_path):
    empty = make_zip(tmp_path / "empty.zip", [])
    rows, toasts = batch(empty)
    assert rows == [["empty.zip", "", "empty.zip: empty zip archive (no files in it)"]]
    assert toasts == ["1 of 1 files failed (see the error column)"]
    inner = make_zip(tmp_path / "inner.zip", [("a.png", png(1))])
    outer = make_zip(tmp_path / "outer.zip", [("inner.zip", inner.read_bytes())])
    rows, _ = batch(outer)
    assert len(rows) == 1 and "holds only zip archives (inner.zip)" in rows[0][2] and "not opened" in rows[0][2]
    mixed = make_zip(tmp_path / "mixed.zip", [("b.png", png(2)), ("inner.zip", inner.read_bytes())])
    rows, _ = batch(mixed)
    assert rows[0][:2] == ["mixed.zip/b.png", rows[0][1]] and rows[0][1] and not rows[0][2]
    assert rows[1][0] == "mixed.zip/inner.zip" and "not opened" in rows[1][2]
    text = make_zip(tmp_path / "text.zip", [("readme.txt", b"hi")])
    assert batch(text)[0] == [["text.zip", "", "text.zip: no images in this zip archive (1 other files)"]]


def test_zip_macos_extras_are_skipped_silently(batch, tmp_path):
    z = make_zip(tmp_path / "mac.zip", [("a.png", png(1)), ("__MACOSX/._a.png", b"\0\5\26\7 appledouble"),
                                        ("__MACOSX/sub/x.png", b"junk"), ("sub/._b.png", b"junk"), ("sub/b.png", png(2))])
    rows, toasts = batch(z)
    assert [r[0] for r in rows] == ["mac.zip/a.png", "mac.zip/sub/b.png"] and not any(r[2] for r in rows)
    assert toasts == []


def test_truncated_zip_is_a_damaged_zip(batch, tmp_path):
    whole = make_zip(tmp_path / "whole.zip", [("a.png", png(1)), ("b.png", png(2))]).read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(whole[:len(whole) // 2])
    rows, _ = batch(cut)
    assert rows == [["cut.zip", "", "cut.zip: damaged zip (truncated: its table of contents is missing)"]]


def encrypt_flag(path: Path) -> Path:
    """Mark every member as encrypted (what `zip -e` sets; zipfile cannot write encrypted archives)."""
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        while i >= 0:
            data[i + off] |= 1
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))
    return path


def test_encrypted_zip_is_one_clear_line(batch, tmp_path):
    z = encrypt_flag(make_zip(tmp_path / "secret.zip", [("a.png", png(1)), ("b.png", png(2))]))
    rows, _ = batch(z)
    assert rows == [["secret.zip", "", "secret.zip: encrypted zip (password-protected): unzip it with its password "
                                       "first"]]


def test_unsafe_zip_captions_its_safe_members_and_names_the_unsafe_ones(batch, tmp_path):
    slip = make_zip(tmp_path / "slip.zip", [("ok.png", png(1)), ("../evil.png", png(2)), ("sub/fine.png", png(3))])
    rows, toasts = batch(slip)
    assert [r[0] for r in rows] == ["slip.zip/ok.png", "slip.zip/../evil.png", "slip.zip/sub/fine.png"]
    assert rows[0][1] and rows[2][1] and not rows[0][2] and not rows[2][2]
    assert rows[1][1:] == ["", "refused, unsafe path: not extracted"]
    assert toasts == ["1 of 3 files failed (see the error column)"]
    assert not (tmp_path / "evil.png").exists()
    bomb = make_zip(tmp_path / "bomb.zip", [("good.png", png(1)), ("bomb.png", bytes(4 * 2**20))])  # limit 1 MiB
    rows, _ = batch(bomb)
    assert rows[0][0] == "bomb.zip/good.png" and rows[0][1] and not rows[0][2]
    assert rows[1][0] == "bomb.zip/bomb.png" and "refused" in rows[1][2] and "zip bomb" in rows[1][2]


def test_zip_member_decompressing_beyond_its_header_is_cut_off(tmp_path):
    from captioner.media.images import extract_zip

    z = make_zip(tmp_path / "small.zip", [("a.png", png(1)), ("b.png", png(2))])
    real_open = zipfile.ZipFile.open
    calls = []

    def lying_open(self, info, *a, **k):  # the second member streams far more than declared
        calls.append(info.filename)
        return io.BytesIO(bytes(3 * 2**20)) if info.filename == "b.png" else real_open(self, info, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(zipfile.ZipFile, "open", lying_open)
        got = extract_zip(z, tmp_path / "out", max_total_bytes=2**20) if (tmp_path / "out").mkdir() is None else None
    assert [s for _, s in got.images] == ["a.png"] and got.problems == [("b.png", "refused, expands beyond 1 MiB "
                                                                                 "(zip bomb)")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


# ------------------------------------------------------------------- item 12: real example photos ------
def test_examples_are_the_licensed_photos_small_and_listed():
    from PIL import Image

    from captioner.app.ui import EXAMPLES_DIR, example_images

    names = sorted(Path(p).name for p in example_images())
    assert names == ["astronaut.jpg", "camera.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    licences = (EXAMPLES_DIR / "LICENSES.txt").read_text(encoding="utf-8")
    for name in names:
        line = next(x for x in licences.splitlines() if x.startswith(name + " "))
        assert "public domain" in line or "CC0" in line
        with Image.open(EXAMPLES_DIR / name) as im:
            assert im.format == "JPEG" and max(im.size) <= 640 and im.mode == "RGB"
    assert sum(p.stat().st_size for p in EXAMPLES_DIR.iterdir()) < 2**20


def test_make_examples_rebuilds_them_from_the_shared_photos(tmp_path):
    from conftest import shared_or_skip

    from captioner.app.ui import EXAMPLES_DIR

    photos = shared_or_skip("photos")
    spec = importlib.util.spec_from_file_location("make_examples", ROOT / "data" / "make_examples.py")
    make_examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_examples)
    made = make_examples.main(photos, tmp_path)
    assert sorted(p.name for p in made) == sorted(p.name for p in EXAMPLES_DIR.glob("*.jpg"))
    assert all(p.read_bytes() == (EXAMPLES_DIR / p.name).read_bytes() for p in made)  # deterministic
    assert (tmp_path / "LICENSES.txt").read_text() == (EXAMPLES_DIR / "LICENSES.txt").read_text()


# ------------------------------------------------------------------- item 9: a lightly corrupt MP4 ------
def damaged_mp4(tmp_path: Path) -> Path:
    """A valid PyAV MP4 with bytes overwritten in three places in the middle of its frame data (mdat)."""
    import struct

    import numpy as np
    from test_video import make_video

    data = bytearray(make_video(tmp_path / "clip.mp4").read_bytes())
    i = data.find(b"mdat")
    start, end = i + 4, i - 4 + struct.unpack(">I", data[i - 4:i])[0]
    rng = np.random.default_rng(0)
    for at in (0.3, 0.5, 0.7):
        k = start + int((end - start) * at)
        data[k:k + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    bad = tmp_path / "damaged.mp4"
    bad.write_bytes(bytes(data))
    return bad


def test_lightly_corrupt_mp4_is_captioned_with_a_warning(tmp_path, tiny_model, capsys):
    import json

    from captioner.cli.main import main

    bad = damaged_mp4(tmp_path)
    out = tmp_path / "out.json"
    assert main(["video", str(bad), "--model", str(tiny_model), "--no-progress", "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"captioner: {bad}: warning: damaged video: ")
    assert "undecodable packets skipped" in err[0] and "Traceback" not in err[0]
    (video,) = json.loads(out.read_text())["videos"]
    assert len(video["times"]) == 10 and video["warnings"] == [err[0].split("warning: ", 1)[1]]
    assert main(["video", str(tmp_path / "clip.mp4"), "--model", str(tiny_model), "--no-progress",
                 "-o", str(tmp_path / "clean.json")]) == 0  # an intact file: no warning
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "clean.json").read_text())["videos"][0]["warnings"] == []


# ------------------------------------------------- the bad-input table: #45, #41 (library API) ------
@pytest.mark.parametrize("option, value, message", [("beam", 0, "beam=0: 0 is out of range: must be from 1 to 16"),
                                                    ("max_len", 1.5, "max_len=1.5: 1.5 is not a whole number"),
                                                    ("topk", -1, "topk=-1"), ("beem", 3, "unknown search option 'beem'")])
def test_captioner_caption_checks_its_search_options(tiny_model, option, value, message):
    from captioner.errors import CaptionerError
    from captioner.pipeline.captioner import Captioner

    cap = Captioner.load(tiny_model)
    with pytest.raises(CaptionerError, match=message.replace("(", r"\(").replace(".", r"\.")):
        cap.caption([picture(1)], **{option: value})
    assert len(cap.caption([picture(1)], beam=1)[0].alternatives) == 1  # in range: fine


def test_caption_files_accepts_bytes_paths(tiny_model, tmp_path):
    import os

    from captioner.pipeline.batch import caption_files
    from captioner.pipeline.captioner import Captioner

    picture(1).save(tmp_path / "a.png")
    name = os.path.join(os.fsencode(tmp_path), b"x\xff.png")  # not UTF-8: only bytes name it exactly
    picture(2).save(os.fsdecode(name))
    rows = caption_files(Captioner.load(tiny_model), [str(tmp_path / "a.png"), tmp_path / "a.png", name], workers=0)
    assert [r["error"] for r in rows] == ["", "", ""] and all(r["caption"] for r in rows)
    assert rows[2]["path"] == os.fsdecode(name)


# ------------------------------------------------------ item 11: the empty Batch tab's download boxes ------
def test_batch_downloads_are_hidden_until_there_are_results(tiny_model):
    pytest.importorskip("gradio")
    from captioner.app import ui
    from captioner.pipeline.captioner import Captioner

    demo = ui.build_demo(Captioner.load(tiny_model))
    boxes = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None) in
             ("batch-csv", "batch-jsonl", "batch-sqlite")}
    assert len(boxes) == 3 and not any(b.visible for b in boxes.values())
