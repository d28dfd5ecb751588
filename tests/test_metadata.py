"""`captioner caption --write-metadata / --sidecar` (captioner.media.metadata) on a tiny random-weight model, read
back by an independent reader (`exiftool -j`): the fields in JPEG, PNG, TIFF, WebP, GIF and sidecars; pixels
and image data untouched; camera, GPS and keyword metadata kept; a person's description kept unless
--overwrite-metadata; read-only, unsupported and changed files as error rows; --dry-run; atomic writes,
also when the run is killed with SIGKILL halfway and resumed."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import picture
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

import captioner.pipeline.batch
from captioner.media import metadata
from captioner.cli.main import main
from captioner.pipeline.captioner import Captioner

ROOT = Path(__file__).resolve().parents[1]
needs_exiftool = pytest.mark.skipif(shutil.which("exiftool") is None,
                                    reason="exiftool is missing: apt-get install libimage-exiftool-perl")
KEPT = ("IFD0:Make", "IFD0:Model", "ExifIFD:DateTimeOriginal", "ExifIFD:FNumber", "GPS:GPSLatitudeRef",
        "GPS:GPSLatitude", "GPS:GPSLongitudeRef", "GPS:GPSLongitude", "XMP-dc:Subject", "IPTC:Keywords")


# ------------------------------------------------------------------------ helpers ------
def exiftool(*args: object) -> list[dict]:
    done = subprocess.run(["exiftool", "-j", "-G1", *map(str, args)], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout or "[]")


def tags(path: Path) -> dict:
    found = exiftool("-a", "-XMP:all", "-EXIF:all", "-IPTC:all", path)
    return found[0] if found else {}


def pixels(path: Path) -> tuple[str, bytes]:
    with Image.open(path) as im:
        im.load()
        return im.mode, np.asarray(im).tobytes()


def camera_jpeg(path: Path, i: int) -> Path:
    """A JPEG with camera EXIF, GPS position, and keywords in XMP and IPTC."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "Canon EOS 5D Mark IV"
    sub = exif.get_ifd(0x8769)
    sub[0x9003], sub[0x829D] = "2024:05:01 10:00:00", IFDRational(28, 10)
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (IFDRational(52), IFDRational(31), IFDRational(12))
    gps[3], gps[4] = "E", (IFDRational(13), IFDRational(24), IFDRational(36))
    picture(i, (96, 64)).save(path, exif=exif, quality=90)
    if shutil.which("exiftool"):
        subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Subject=dog", "-XMP-dc:Subject=beach",
                        "-IPTC:Keywords=holiday", str(path)], check=True, timeout=120)
    return path


def image_data(path: Path) -> list[bytes]:
    """The file's parts that are not metadata: JPEG segments other than APPn/COM plus the scan data; PNG and
    WebP chunks other than metadata ones (VP8X holds the WebP's metadata flags). These must not change."""
    data = path.read_bytes()
    parts = []
    if data[:2] == b"\xff\xd8":
        i = 2
        while i < len(data):
            marker, size = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
            if marker == 0xDA:
                return parts + [data[i:]]
            if not (0xE0 <= marker <= 0xEF or marker == 0xFE):
                parts.append(data[i:i + 2 + size])
            i += 2 + size
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        i = 8
        while i < len(data):
            size, kind = struct.unpack(">I4s", data[i:i + 8])
            if kind not in (b"iTXt", b"tEXt", b"zTXt", b"eXIf", b"tIME"):
                parts.append(data[i:i + 12 + size])
            i += 12 + size
    elif data[:4] == b"RIFF":
        i = 12
        while i < len(data):
            kind, size = struct.unpack("<4sI", data[i:i + 8])
            if kind not in (b"XMP ", b"EXIF", b"VP8X"):
                parts.append(data[i:i + 8 + size])
            i += 8 + size + size % 2
    return parts


def run(*argv: object) -> int:
    return main(["caption", *map(str, argv), "--no-progress"])


def read_jsonl(path: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in map(json.loads, path.read_text().splitlines())}


FORMATS = {"photo.jpg": "JPEG", "plain.jpg": "JPEG", "image.png": "PNG", "scan.tif": "TIFF", "web.webp": "WEBP",
           "anim.gif": "GIF"}


@pytest.fixture
def photos(tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    camera_jpeg(d / "photo.jpg", 0)
    for i, name in enumerate(sorted(FORMATS)):
        if name != "photo.jpg":
            img = picture(i + 1)
            (img.convert("P") if name.endswith(".gif") else img).save(d / name)
    (d / "image.png").chmod(0o640)
    return d


# -------------------------------------------------------------------------- tests ------
@needs_exiftool
def test_write_metadata_every_format(photos, tiny_model, tmp_path, capsys):
    before = {p.name: (p.read_bytes(), tags(p), pixels(p), image_data(p), p.stat()) for p in photos.iterdir()}
    out = tmp_path / "out.jsonl"
    assert run(photos, "--write-metadata", "-o", out, "--model", tiny_model, "--workers", 0) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = read_jsonl(out)
    assert sorted(os.listdir(photos)) == sorted(FORMATS)  # no temporary file left, no sidecar
    model = Captioner.load(tiny_model).model_id
    for found in exiftool("-a", "-XMP:all", "-EXIF:all", "-IPTC:all", "-File:FileType", *sorted(photos.iterdir())):
        name = Path(found["SourceFile"]).name
        old_bytes, old_tags, old_pixels, old_data, old_stat = before[name]
        caption = rows[name]["caption"]
        assert caption and not rows[name]["error"]
        assert found["File:FileType"].removeprefix("Extended ") == FORMATS[name]  # WebP with metadata: Extended
        assert found["XMP-dc:Description"] == caption
        assert found["XMP-iptcCore:AltTextAccessibility"] == caption
        assert found["XMP-captioner:Caption"] == caption and found["XMP-captioner:MachineGenerated"] is True
        assert found["XMP-captioner:CaptionModel"] == model
        assert found["XMP-captioner:CaptionSoftware"].startswith("captioner ") and found["XMP-captioner:CaptionDate"]
        assert found.get("IFD0:ImageDescription") == (caption if FORMATS[name] in ("JPEG", "TIFF") else None)
        for key in KEPT:  # camera, GPS, keywords: as before (absent stays absent)
            assert found.get(key) == old_tags.get(key), (name, key)
        path = photos / name
        assert path.read_bytes() != old_bytes
        assert pixels(path) == old_pixels  # never re-encoded
        assert image_data(path) == old_data  # outside the metadata, the same bytes
        st = path.stat()
        assert (st.st_mode, st.st_mtime_ns) == (old_stat.st_mode, old_stat.st_mtime_ns)  # permissions, mtime kept
    assert before["photo.jpg"][1]["GPS:GPSLatitude"] and before["photo.jpg"][1]["XMP-dc:Subject"] == ["dog", "beach"]
    assert oct((photos / "image.png").stat().st_mode & 0o777) == "0o640"


@needs_exiftool
def test_sidecars_leave_originals_alone(photos, tiny_model, tmp_path):
    picture(7).save(photos / "raw.bmp")  # any format gets a sidecar
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in photos.iterdir()}
    subprocess.run(["exiftool", "-q", "-o", str(photos / "plain.jpg.xmp"), "-XMP-xmp:Rating=4"], check=True, timeout=120)
    out = tmp_path / "out.jsonl"
    assert run(photos, "--sidecar", "-o", out, "--model", tiny_model, "--workers", 0) == 0
    rows = read_jsonl(out)
    for name, (data, mtime) in before.items():
        assert (photos / name).read_bytes() == data and (photos / name).stat().st_mtime_ns == mtime
    cars = sorted(photos.glob("*.xmp"))
    assert [c.name for c in cars] == sorted(f"{n}.xmp" for n in before)
    for found in exiftool(*cars):
        caption = rows[Path(found["SourceFile"]).name.removesuffix(".xmp")]["caption"]
        assert found["File:FileType"] == "XMP"
        assert found["XMP-dc:Description"] == found["XMP-iptcCore:AltTextAccessibility"] == caption
        assert found["XMP-captioner:MachineGenerated"] is True
    assert exiftool(photos / "plain.jpg.xmp")[0]["XMP-xmp:Rating"] == 4  # an existing sidecar is edited, not replaced


@needs_exiftool
def test_a_persons_description_is_kept(tiny_model, tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    picture(1).save(d / "xmp.jpg")
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=Granny's 90th birthday",
                    str(d / "xmp.jpg")], check=True, timeout=120)
    exif = Image.Exif()
    exif[0x010E] = "Our first flat"
    picture(2).save(d / "exif.jpg", exif=exif)
    exif[0x010E] = "OLYMPUS DIGITAL CAMERA"  # a camera's placeholder is no description
    picture(3).save(d / "camera.jpg", exif=exif)
    mine = {n: (d / n).read_bytes() for n in ("xmp.jpg", "exif.jpg")}
    assert run(d, "--write-metadata", "--model", tiny_model, "--workers", 0) == 0
    err = capsys.readouterr().err
    assert err.count("kept its own description") == 2 and "--overwrite-metadata" in err
    assert {n: (d / n).read_bytes() for n in mine} == mine
    assert tags(d / "camera.jpg")["XMP-captioner:MachineGenerated"] is True
    assert run(d, "--write-metadata", "--overwrite-metadata", "--model", tiny_model, "--workers", 0) == 0
    for name in ("xmp.jpg", "exif.jpg"):
        found = tags(d / name)
        assert found["XMP-dc:Description"] == found["IFD0:ImageDescription"] == found["XMP-captioner:Caption"]
    # captioner's own descriptions are rewritten by a later run; a person's edit of one is kept again
    assert run(d, "--write-metadata", "--model", tiny_model, "--workers", 0) == 0
    assert "kept" not in capsys.readouterr().err
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description-x-default=Corrected by hand",
                    str(d / "camera.jpg")], check=True, timeout=120)
    edited = (d / "camera.jpg").read_bytes()
    assert run(d, "--write-metadata", "--model", tiny_model, "--workers", 0) == 0
    assert "camera.jpg: kept its own description" in capsys.readouterr().err
    assert (d / "camera.jpg").read_bytes() == edited


@needs_exiftool
def test_unwritable_files_are_error_rows_and_the_rest_is_written(tiny_model, tmp_path, monkeypatch, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(4):
        picture(i).save(d / f"ok{i}.jpg")
    picture(4).save(d / "locked.jpg")
    (d / "locked.jpg").chmod(0o444)
    picture(5).save(d / "old.bmp")
    picture(6).save(d / "moving.png")
    load = captioner.pipeline.batch._load

    def load_and_change(path, *rest):  # someone edits moving.png while it is being captioned
        img = load(path, *rest)
        if path.name == "moving.png":
            picture(9).save(path)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        return img

    monkeypatch.setattr(captioner.pipeline.batch, "_load", load_and_change)
    untouched = {n: (d / n).read_bytes() for n in ("locked.jpg", "old.bmp")}
    out = tmp_path / "out.jsonl"
    assert run(d, "--write-metadata", "-o", out, "--model", tiny_model, "--workers", 0, "--batch-size", 3) == 3
    err = capsys.readouterr().err
    rows = read_jsonl(out)
    assert "read-only" in rows["locked.jpg"]["error"] and "BMP" in rows["old.bmp"]["error"]
    assert "changed during the run" in rows["moving.png"]["error"]
    for name in ("locked.jpg", "old.bmp", "moving.png"):
        assert f"{d / name}: {rows[name]['error']}" in err and rows[name]["caption"]
    assert {n: (d / n).read_bytes() for n in untouched} == untouched
    assert "XMP-dc:Description" not in tags(d / "moving.png")
    for i in range(4):
        assert not rows[f"ok{i}.jpg"]["error"] and tags(d / f"ok{i}.jpg")["XMP-dc:Description"] == rows[f"ok{i}.jpg"]["caption"]
    assert not [p for p in os.listdir(d) if ".captioner-" in p]


@needs_exiftool
def test_dry_run_changes_nothing(photos, tiny_model, tmp_path, capsys):
    subprocess.run(["exiftool", "-q", "-overwrite_original", "-XMP-dc:Description=A day at the sea",
                    str(photos / "plain.jpg")], check=True, timeout=120)
    state = lambda: {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_mode) for p in photos.iterdir()}  # noqa: E731
    before = state()
    assert run(photos, "--write-metadata", "--dry-run", "--model", tiny_model, "--workers", 0) == 0
    out = capsys.readouterr().out.splitlines()
    assert state() == before
    assert len(out) == len(before)
    assert sum(line.startswith("would write  ") for line in out) == len(before) - 1
    assert [line for line in out if line.startswith("would keep   ")] == [
        f"would keep   {photos / 'plain.jpg'}: its own description 'A day at the sea' (--overwrite-metadata replaces it)"]
    assert any("EXIF ImageDescription" in line and "photo.jpg" in line for line in out)
    assert run(photos, "--sidecar", "--dry-run", "--model", tiny_model, "--workers", 0) == 0
    assert all(".xmp" in line for line in capsys.readouterr().out.splitlines())
    assert state() == before


def test_usage_errors(photos, tiny_model, tmp_path, capsys):
    for args in (["--overwrite-metadata"], ["--dry-run"], ["--write-metadata", "--dry-run", "-o", tmp_path / "o.csv"],
                 ["--resume"]):
        assert run(photos, *args, "--model", tiny_model) == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: ") and "Traceback" not in err
    assert not (tmp_path / "o.csv").exists()


def test_missing_exiftool_is_one_clear_error(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    assert run(photos, "--write-metadata", "--model", tmp_path / "not-loaded-first.pt") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exiftool" in err and "apt-get install libimage-exiftool-perl" in err
    assert "Traceback" not in err and "not-loaded-first" not in err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


@needs_exiftool
def test_failed_replace_leaves_the_original_whole(photos, monkeypatch):
    """The write fails at the last step (the rename): the original is untouched, no temporary file stays."""
    path = photos / "photo.jpg"
    data = path.read_bytes()

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    rows = [{"path": str(path), "caption": "a red square", "error": ""}]
    with metadata.MetadataWriter(metadata.MetadataOptions(), "m", metadata.stamps([path])) as writer:
        monkeypatch.setattr(metadata.os, "replace", no_space)
        writer(rows)
        monkeypatch.undo()
    assert rows[0]["error"] == "metadata not written: No space left on device"
    assert path.read_bytes() == data and sorted(os.listdir(photos)) == sorted(FORMATS)


# ------------------------------------------------------------------- SIGKILL ------
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SLOW = ("import sys, time, captioner.pipeline.batch as b; load = b.load_image; "
        "b.load_image = lambda p, *a: (time.sleep(0.03), load(p, *a))[1]; from captioner.cli.main import main; sys.exit(main())")


@needs_exiftool
def test_sigkill_halfway_then_resume(tiny_model, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(40):
        picture(i).save(d / f"pic{i:02d}.{'png' if i % 3 == 0 else 'jpg'}")
    original = {p.name: (p.read_bytes(), pixels(p)) for p in d.iterdir()}
    args = [d, "--write-metadata", "--model", tiny_model, "--workers", 0, "--batch-size", 4, "--no-progress"]
    cmd = [sys.executable, "-c", SLOW, "caption", *map(str, args)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: exiftool is killed with it

    def written() -> int:
        return sum((d / n).stat().st_size != len(data) for n, (data, _) in original.items())

    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and written() < 10:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()
    changed = [d / n for n, (data, _) in original.items() if (d / n).read_bytes() != data]
    untouched = len(original) - len(changed)
    found = exiftool("-XMP-dc:Description", *changed)  # each file is either as it was or completely written
    assert sorted(Path(f["SourceFile"]) for f in found if f.get("XMP-dc:Description")) == sorted(changed)
    assert all(pixels(p) == original[p.name][1] for p in changed)
    assert len(changed) >= 10 and untouched >= 1
    done = subprocess.run([sys.executable, "-m", "captioner", "caption", *map(str, args), "--resume"], env=ENV,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == untouched  # the resumed run captioned only what was left
    assert sorted(os.listdir(d)) == sorted(original)  # a killed write's temporary file is gone too
    found = exiftool("-XMP-dc:Description", "-XMP-captioner:Caption", d)
    assert len(found) == 40 and all(f["XMP-dc:Description"] == f["XMP-captioner:Caption"] for f in found)
    assert all(pixels(d / n) == px for n, (_, px) in original.items())


@needs_exiftool
@pytest.mark.parametrize("mode", ["--write-metadata", "--sidecar"])
def test_shared_photos_and_a_camera_jpeg(mode, tiny_model, tmp_path):
    """The issue's acceptance 1 and 2 on copies of ../shared/data/photos plus a camera JPEG with GPS."""
    from conftest import shared_or_skip

    d = tmp_path / "photos"
    shutil.copytree(shared_or_skip("photos"), d, copy_function=shutil.copyfile)  # copies we may write
    d.chmod(0o755)
    camera_jpeg(d / "camera-gps.jpg", 3)
    images = sorted(p for p in d.iterdir() if p.suffix in (".jpg", ".png"))
    before = {p: (p.read_bytes(), pixels(p), tags(p)) for p in images}
    assert run(d, mode, "--model", tiny_model, "--workers", 0) == 0
    for p, (data, px, old) in before.items():
        found = tags(sidecar := p.with_name(p.name + ".xmp")) if mode == "--sidecar" else tags(p)
        assert found["XMP-dc:Description"] and found["XMP-iptcCore:AltTextAccessibility"] == found["XMP-dc:Description"]
        assert pixels(p) == px
        if mode == "--sidecar":
            assert p.read_bytes() == data and sidecar.is_file()
        else:
            assert all(found.get(k) == old.get(k) for k in KEPT)
    assert before[d / "camera-gps.jpg"][2]["GPS:GPSLongitude"]
