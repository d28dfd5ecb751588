"""captioner.media.images: every input is generated in tmp_path (no external data, no model, fast)."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from captioner.media import images
from captioner.errors import CaptionerError
from captioner.media.images import IMAGE_EXTENSIONS, ImageError, display_name, find_images, is_zip, load_image, load_image_bytes, safe_extract_zip, to_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
# A valid 8x8 RGB Photoshop file (header, three empty sections, raw black pixels).
PSD = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 8, 8, 8, 3) + bytes(12) + bytes(2 + 3 * 64)


def save(path: Path, img: Image.Image, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def error_of(path, **kw) -> str:
    """The ImageError message load_image gives: one line that names the file."""
    with pytest.raises(ImageError) as info:
        load_image(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and display_name(Path(path).name) in msg, msg
    return msg


def close(a, b, tol: int = 40) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ modes -------
def test_error_type_and_extensions():
    assert issubclass(ImageError, CaptionerError)
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize("name, mode, colour, expect", [
    ("rgb.png", "RGB", RED, RED),
    ("rgb.jpg", "RGB", RED, RED),
    ("rgb.webp", "RGB", RED, RED),
    ("rgb.bmp", "RGB", BLUE, BLUE),
    ("rgb.tiff", "RGB", BLUE, BLUE),
    ("grey.png", "L", 100, (100, 100, 100)),
    ("black.png", "1", 0, (0, 0, 0)),
    ("clear.png", "RGBA", (255, 0, 0, 0), WHITE),          # fully transparent -> white, not red/black
    ("half.png", "RGBA", (255, 0, 0, 128), (255, 127, 127)),
    ("opaque.webp", "RGBA", (0, 0, 255, 255), BLUE),
    ("la.png", "LA", (0, 0), WHITE),
    ("la_black.png", "LA", (0, 255), (0, 0, 0)),
    ("cmyk.jpg", "CMYK", (0, 255, 255, 0), RED),
    ("cmyk.tiff", "CMYK", (255, 0, 0, 0), (0, 255, 255)),
])
def test_modes_become_rgb(tmp_path, name, mode, colour, expect):
    out = load_image(save(tmp_path / name, Image.new(mode, (16, 12), colour)))
    assert out.mode == "RGB" and out.size == (16, 12)
    assert close(out.getpixel((5, 5)), expect), out.getpixel((5, 5))


@pytest.mark.parametrize("name", ["p.png", "p.gif"])
def test_palette_with_and_without_transparency(tmp_path, name):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    img.putpixel((1, 1), 1)
    img.putpixel((2, 2), 2)
    out = load_image(save(tmp_path / name, img, transparency=0))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE  # transparent index -> white
    assert out.getpixel((1, 1)) == RED and out.getpixel((2, 2)) == BLUE
    plain = load_image(save(tmp_path / f"plain_{name}", img))
    assert plain.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("name", ["g16.png", "g16.tif"])
def test_16_bit_scaled_not_clipped(tmp_path, name):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    img = Image.fromarray(ramp)
    assert img.mode.startswith("I;16")
    out = np.asarray(load_image(save(tmp_path / name, img)))
    grey = out[0, :, 0].astype(int)
    assert out.shape == (8, 256, 3) and (out[..., 0] == out[..., 2]).all()
    assert (out < 250).mean() > 0.9 and grey[0] <= 1 and grey[-1] >= 254  # not all white: a full ramp
    assert (np.diff(grey) >= 0).all() and len(np.unique(grey)) > 200


def test_to_rgb_big_endian_int_and_float_modes():
    ramp = np.tile(np.linspace(0, 65535, 64).astype(">u2"), (4, 1))
    be = Image.frombytes("I;16B", (64, 4), ramp.tobytes())
    assert np.asarray(to_rgb(be))[0, :, 0].tolist() == np.rint(ramp[0] / 257).astype(int).tolist()
    f01 = Image.fromarray(np.tile(np.linspace(0, 1, 32, dtype=np.float32), (2, 1)))
    assert f01.mode == "F" and np.asarray(to_rgb(f01))[0, [0, -1], 0].tolist() == [0, 255]
    wide = Image.fromarray(np.tile(np.linspace(-1e6, 1e6, 32), (2, 1)).astype(np.int32))
    row = np.asarray(to_rgb(wide))[0, :, 1].astype(int)
    assert wide.mode == "I" and row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()


def test_animated_gif_and_webp_give_first_frame(tmp_path):
    frames = [Image.new("RGB", (10, 10), c) for c in (RED, (0, 255, 0), BLUE)]
    for name in ("anim.gif", "anim.webp"):
        path = save(tmp_path / name, frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)
        assert close(load_image(path).getpixel((5, 5)), RED)
        with Image.open(path) as im:
            assert im.n_frames == 3
            im.seek(2)
            assert close(to_rgb(im).getpixel((5, 5)), RED)


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))  # left red, right blue
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    out = load_image(save(tmp_path / "rot.jpg", img, exif=exif, quality=95))
    assert out.size == (20, 40)
    assert close(out.getpixel((10, 5)), RED) and close(out.getpixel((10, 35)), BLUE)


def test_tiny_and_misnamed_images_load(tmp_path):
    assert load_image(save(tmp_path / "one.png", Image.new("RGB", (1, 1), RED))).size == (1, 1)
    (tmp_path / "really_png.jpg").write_bytes(png_bytes(Image.new("RGB", (3, 2), BLUE)))
    assert load_image(tmp_path / "really_png.jpg").getpixel((0, 0)) == BLUE  # content decides
    assert load_image(str(tmp_path / "one.png")).mode == "RGB"  # str paths too


def test_load_image_bytes():
    assert load_image_bytes(png_bytes(Image.new("LA", (2, 2), (0, 0)))).getpixel((1, 1)) == WHITE
    with pytest.raises(ImageError, match="photo.png: empty file"):
        load_image_bytes(b"", name="photo.png")
    with pytest.raises(ImageError, match=r"<upload>: not an image"):
        load_image_bytes(b"hello world")


# ----------------------------------------------------------------------------- errors -------
def test_missing_folder_and_empty(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    assert "folder" in error_of(tmp_path / "dir.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert "empty file" in error_of(tmp_path / "empty.jpg")
    os.mkfifo(tmp_path / "pipe.png")  # open() would block forever on a pipe
    assert "not a regular file" in error_of(tmp_path / "pipe.png")


def test_truncated_jpeg_fails(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    data = (save(tmp_path / "full.jpg", Image.fromarray(noise), quality=90)).read_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    assert "truncated" in error_of(tmp_path / "half.jpg")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # refused without flipping PIL's global switch


@pytest.mark.parametrize("name, data, expect", [
    ("notes.png", b"this is a text file, not a picture\n" * 10, "not an image"),
    ("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + os.urandom(200), "unsupported format (HEIC"),
    ("art.psd", PSD, "unsupported format (Photoshop"),  # PIL could read it: refused on purpose
    ("noise.jpg", os.urandom(300), "not an image"),
])
def test_not_images_and_unsupported_formats(tmp_path, name, data, expect):
    (tmp_path / name).write_bytes(data)
    msg = error_of(tmp_path / name)
    assert expect in msg and "png" in msg  # lists what is supported


@pytest.mark.parametrize("side", [30000, 9000])  # beyond PIL's own bomb limit / beyond only ours
def test_decompression_bomb_header_refused_fast(tmp_path, side):
    limit = Image.MAX_IMAGE_PIXELS
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    (tmp_path / "bomb.png").write_bytes(bytes(data))
    assert "too large" in error_of(tmp_path / "bomb.png")  # refused from the header, before any decoding
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global left alone
    assert "too large" in error_of(save(tmp_path / "big.png", Image.new("L", (100, 100))), max_pixels=5000)


def test_permission_denied(tmp_path, monkeypatch):
    path = save(tmp_path / "secret.png", Image.new("RGB", (2, 2), RED))
    path.chmod(0)
    try:
        if os.geteuid() == 0:  # root reads anyway
            assert load_image(path).size == (2, 2)
        else:
            assert "permission denied" in error_of(path)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert "permission denied" in error_of(path)


# ---------------------------------------------------------------------------- finding -------
@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    (root / "sub" / "deep").mkdir(parents=True)
    tiny = png_bytes(Image.new("RGB", (2, 2), RED))
    for rel in ("a.jpg", "b.PNG", ".hidden.png", "notes.txt", "sub/c.webp", "sub/deep/d.gif", "x" * 246 + ".png"):
        (root / rel).write_bytes(tiny)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # a symlink loop
    (root / "sub" / "self").symlink_to(".", target_is_directory=True)
    (root / "sub" / "zlink").symlink_to("deep", target_is_directory=True)  # real sub/deep must win
    try:
        fd = os.open(os.fsencode(root) + b"/caf\xe9.png", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, tiny)
        os.close(fd)
    except OSError:
        pytest.skip("file system refuses non-UTF-8 names")
    return root


def names(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_find_images_in_folders(tree):
    long = "x" * 246 + ".png"
    found, errors = find_images([tree])
    assert errors == [] and names(found, tree) == sorted(["a.jpg", "b.PNG", "caf\udce9.png", long])
    found, errors = find_images([tree, tree / "a.jpg", str(tree)], recursive=True)  # loops end, no duplicates
    assert errors == [] and names(found, tree) == sorted(
        ["a.jpg", "b.PNG", "caf\udce9.png", long, "sub/c.webp", "sub/deep/d.gif"])
    assert found == sorted(found, key=str)
    odd = next(p for p in found if "caf" in p.name)
    assert load_image(odd).size == (2, 2) and display_name(odd).endswith("caf\ufffd.png")
    assert display_name(odd).encode("utf-8")  # printable


def test_find_images_explicit_files_globs_and_errors(tree, monkeypatch):
    found, errors = find_images([tree / "notes.txt", tree / "missing.png", str(tree / "*.md")])
    assert names(found, tree) == ["notes.txt"]  # named explicitly: kept, load_image will judge it
    assert errors == [(str(tree / "missing.png"), "no such file or folder"),
                      (str(tree / "*.md"), "no image files match this pattern")]
    assert names(find_images([str(tree / "?.jpg"), str(tree / "[ab].*")])[0], tree) == ["a.jpg", "b.PNG"]
    deep = str(tree / "**" / "*.gif")
    assert names(find_images([deep], recursive=True)[0], tree) == ["sub/deep/d.gif"]
    assert find_images([deep])[0] == [] and find_images([deep])[1][0][0] == deep  # ** is * unless recursive
    assert names(find_images([str(tree / "sub" / "*")])[0], tree) == ["sub/c.webp"]
    every = find_images([str(tree / "**" / "*")], recursive=True)[0]
    assert len(every) == len(set(every)) == 6 and not any(w in str(p) for p in every for w in ("loop", "self", "zlink"))
    monkeypatch.chdir(tree)
    assert find_images(["*.jpg", "a.jpg", "./a.jpg"])[0] == [Path("a.jpg")]
    bad = os.fsdecode(b"/nowhere/caf\xe9*.png")
    assert find_images([bad])[1][0][0].encode("utf-8")  # error names are printable


def test_find_images_reports_unreadable_folder(tree, monkeypatch):
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(images.os, "scandir", scandir)
    found, errors = find_images([tree], recursive=True)
    assert "a.jpg" in names(found, tree) and errors == [(str(tree / "sub"), "cannot read folder: Permission denied")]


# ---------------------------------------------------------------------------- archives -------
def make_zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
        if link:
            info = zipfile.ZipInfo(link)
            info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def listing(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*"))


@pytest.fixture
def arena(tmp_path):
    """(tmp_path, dest, a check that the refusal left dest empty and nothing new anywhere around it)."""
    dest = tmp_path / "work" / "dest"
    dest.mkdir(parents=True)
    before, around = listing(tmp_path), sorted(os.listdir(tmp_path.parent))

    def untouched():
        assert list(dest.iterdir()) == [] and sorted(os.listdir(tmp_path.parent)) == around
        assert [p for p in listing(tmp_path) if p not in before and not p.endswith(".zip")] == []
    return tmp_path, dest, untouched


def test_safe_extract_zip_ok(arena):
    tmp, dest, _ = arena
    tiny = png_bytes(Image.new("RGB", (2, 2), BLUE))
    z = make_zip(tmp / "ok.zip", {"a.png": tiny, "sub/": b"", "sub/b.JPG": tiny, "readme.txt": b"hi",
                                  "__MACOSX/": b"", "./c.gif": tiny})
    assert is_zip(z) and not is_zip(tmp / "missing.zip") and not is_zip(dest)
    out = safe_extract_zip(z, dest)
    assert [p.relative_to(dest).as_posix() for p in out] == ["a.png", "c.gif", "sub/b.JPG"]
    assert load_image(out[0]).getpixel((0, 0)) == BLUE and not (dest / "readme.txt").exists()


def test_is_zip_rejects_images(tmp_path):
    png = tmp_path / "a.png"
    png.write_bytes(png_bytes(Image.new("RGB", (2, 2))) + make_zip(tmp_path / "x.zip", {"a.png": b"x"}).read_bytes())
    assert not is_zip(png) and is_zip(tmp_path / "x.zip")


@pytest.mark.parametrize("evil", ["../evil.png", "../../evil.png", "/abs/evil.png", "C:/evil.png", "a/../../evil.png",
                                  "..\\evil.png"])
def test_safe_extract_zip_refuses_escaping_paths(arena, evil):
    tmp, dest, untouched = arena
    z = make_zip(tmp / "evil.zip", {"good.png": b"fine", evil: b"payload"})
    assert zipfile.ZipFile(z).namelist()[1] == evil
    with pytest.raises(ImageError, match="unsafe path"):
        safe_extract_zip(z, dest)
    untouched()


def test_safe_extract_zip_refuses_symlinks(arena):
    tmp, dest, untouched = arena
    with pytest.raises(ImageError, match="symbolic link"):
        safe_extract_zip(make_zip(tmp / "link.zip", {"good.png": b"fine"}, link="link.png"), dest)
    untouched()


def test_safe_extract_zip_refuses_bombs_and_crowds(arena):
    tmp, dest, untouched = arena
    z = make_zip(tmp / "bomb.zip", {"good.png": b"fine", "bomb.png": bytes(100 * 2**20)})
    assert z.stat().st_size < 2**20
    with pytest.raises(ImageError, match="would expand beyond 10 MiB"):  # refused on the declared sizes
        safe_extract_zip(z, dest, max_total_bytes=10 * 2**20)
    with pytest.raises(ImageError, match="31 members"):
        safe_extract_zip(make_zip(tmp / "many.zip", {f"{i}.png": b"x" for i in range(31)}), dest, max_files=30)
    with pytest.raises(ImageError, match="not a readable zip"):
        safe_extract_zip(tmp / "bomb.png", dest)
    untouched()


def test_safe_extract_zip_lying_headers(arena, monkeypatch):
    tmp, dest, untouched = arena
    z = make_zip(tmp / "lie.zip", {"sub/good.png": b"fine", "lie.png": bytes(20 * 2**20)})
    data = bytearray(z.read_bytes())
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # declare 1000 bytes in both headers
        i = data.rfind(sig)
        data[i + off:i + off + 4] = struct.pack("<I", 1000)
    z.write_bytes(bytes(data))
    assert zipfile.ZipFile(z).getinfo("lie.png").file_size == 1000
    with pytest.raises(ImageError, match="cannot extract"):  # zipfile stops at the declared size: bad CRC
        safe_extract_zip(z, dest, max_total_bytes=10 * 2**20)
    untouched()
    # Even a stream that yields more than the headers declare is cut off at the limit while writing.
    z = make_zip(tmp / "small.zip", {"a/b/a.png": b"a", "b.png": b"b"})
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, info, *a, **k: io.BytesIO(bytes(6 * 2**20)))
    with pytest.raises(ImageError, match="zip bomb"):
        safe_extract_zip(z, dest, max_total_bytes=10 * 2**20)
    untouched()


def test_safe_extract_zip_never_writes_through_links_in_dest(arena):
    tmp, dest, _ = arena
    outside = tmp / "outside"
    outside.mkdir()
    (dest / "out").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ImageError, match="outside"):
        safe_extract_zip(make_zip(tmp / "via.zip", {"a.png": b"a", "out/x.png": b"x"}), dest)
    assert list(outside.iterdir()) == [] and sorted(p.name for p in dest.iterdir()) == ["out"]


# ------------------------------------------------------ the caption path's JPEG decode -------
def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content (smooth colour field, gradient, grain): what JPEG's DCT and a resize see in photos."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(coarse, np.float32) + np.linspace(0, 60, w, dtype=np.float32)[None, :, None]
    arr += rng.normal(0, 5, (h, w, 1)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture
def in_worker(monkeypatch):
    """captioner.pipeline.batch._load as it runs in a DataLoader worker (torchvision decodes plain JPEGs there)."""
    from captioner.pipeline import batch

    monkeypatch.setitem(batch._DECODERS, os.getpid(), batch._make_jpeg_decoder())
    assert batch._jpeg_decoder() is not None
    return batch


def as_tensor(img):
    import torch

    return img if isinstance(img, torch.Tensor) else torch.from_numpy(np.array(img)).permute(2, 0, 1)


def jpeg_variants(tmp_path: Path) -> dict[str, Path]:
    base = photo(160, 120)
    out = {"q90.jpg": save(tmp_path / "q90.jpg", base, quality=90),
           "progressive.jpg": save(tmp_path / "progressive.jpg", base, progressive=True),
           "444.jpg": save(tmp_path / "444.jpg", base, quality=95, subsampling=0),
           "grey.jpg": save(tmp_path / "grey.jpg", base.convert("L")),
           "odd.jpg": save(tmp_path / "odd.jpg", base.crop((0, 0, 117, 83)))}
    for orientation in (2, 3, 6, 8):
        exif = base.getexif()
        exif[0x0112] = orientation
        out[f"exif{orientation}.jpg"] = save(tmp_path / f"exif{orientation}.jpg", base, exif=exif)
    return out


def test_worker_jpeg_decode_gives_load_image_pixels_exactly(tmp_path, in_worker):
    """In a worker, plain RGB / grey JPEGs skip PIL (torchvision's decode_jpeg): the same pixels, bit for bit,
    EXIF orientation included, and the same tensor after the model's transform."""
    import torch
    from captioner.model.encoder import image_transform

    transform = image_transform("efficientnet_lite0")
    for name, path in jpeg_variants(tmp_path).items():
        fast, ref = in_worker._load(path, 256), load_image(path)
        assert isinstance(fast, torch.Tensor) and fast.dtype == torch.uint8, name  # the fast path was taken
        assert torch.equal(fast, as_tensor(ref)), name
        assert torch.equal(transform(fast), transform(ref)), name
        assert images.size_warning(fast) == images.size_warning(ref)
    assert images.size_warning(torch.zeros(3, 20, 40, dtype=torch.uint8)) == \
        "only 40x20 pixels (under 32 on a side): the caption is unreliable"


def test_worker_jpeg_decode_falls_back_to_pil(tmp_path, in_worker):
    """CMYK JPEGs, other formats and damaged files go through load_image: its pixels, its errors."""
    cmyk = save(tmp_path / "cmyk.jpg", photo(64, 48).convert("CMYK"))
    png = save(tmp_path / "p.png", photo(64, 48))
    for path in (cmyk, png):
        out = in_worker._load(path, 256)
        assert isinstance(out, Image.Image) and np.array_equal(np.asarray(out), np.asarray(load_image(path)))
    data = save(tmp_path / "full.jpg", photo(128, 96), quality=90).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as fast:
        in_worker._load(tmp_path / "cut.jpg", 256)
    assert str(fast.value) == error_of(tmp_path / "cut.jpg") and "truncated" in str(fast.value)


def test_worker_jpeg_decode_is_silent_on_damaged_but_decodable_data(tmp_path, in_worker, capfd):
    """libjpeg prints 'Corrupt JPEG data: ...' on fd 2 for damage it can decode past; PIL is silent, so the
    worker's decoder is too (the file is captioned, with PIL's pixels)."""
    data = save(tmp_path / "ok.jpg", photo(128, 96), quality=90).read_bytes()
    assert data.endswith(b"\xff\xd9")
    (tmp_path / "junk.jpg").write_bytes(data[:-2] + bytes(40) + b"\xff\xd9")  # junk before the end marker
    out = in_worker._load(tmp_path / "junk.jpg", 256)
    assert np.array_equal(as_tensor(out).numpy(), as_tensor(load_image(tmp_path / "junk.jpg")).numpy())
    in_worker._load(tmp_path / "ok.jpg", 256)
    assert capfd.readouterr().err == ""


def test_large_jpeg_reduced_decode_close_to_full_decode(tmp_path, in_worker):
    """A JPEG whose short side is >= 4x the resize target is decoded at reduced scale (DCT scaling), never under
    2x the target: after the transform it is within 4 grey levels of the full decode everywhere, 0.5 on average."""
    from captioner.model.encoder import image_transform

    transform = image_transform("efficientnet_lite0")
    for size in ((2048, 1536), (1200, 4100)):  # 1/2 scale; 1/4 scale, portrait
        path = save(tmp_path / f"big{size[0]}.jpg", photo(*size, seed=size[0]), quality=90)
        fast = in_worker._load(path, 256)
        assert isinstance(fast, Image.Image) and min(fast.size) < min(size)  # reduced, by PIL
        assert min(fast.size) >= 512
        grey_levels = (transform(fast) - transform(load_image(path))).abs() * 255 / 2  # mean = std = 0.5
        assert grey_levels.max() <= 4 and grey_levels.mean() <= 0.5, (size, grey_levels.max(), grey_levels.mean())


def test_caption_batches_from_workers_equal_the_main_process(tmp_path):
    """captioner caption's loading: a DataLoader worker (torchvision for plain JPEGs) gives the same batch,
    errors and warnings as the main process (PIL), for good, odd and broken files."""
    import torch
    from torch.utils.data import DataLoader

    from captioner.pipeline.batch import _Files, _split_transform
    from captioner.model.encoder import image_transform

    paths = sorted(jpeg_variants(tmp_path).values())
    small = save(tmp_path / "small.jpg", photo(40, 20))
    cmyk = save(tmp_path / "cmyk.jpg", photo(64, 48).convert("CMYK"))
    big = save(tmp_path / "big.jpg", photo(2048, 1536), quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(big.read_bytes()[:5000])
    paths += [small, cmyk, big, cut, save(tmp_path / "p.png", photo(50, 40))]
    files = _Files(paths, 4, *_split_transform(image_transform("efficientnet_lite0")))
    here = list(DataLoader(files, batch_size=None, num_workers=0))
    there = list(DataLoader(files, batch_size=None, num_workers=1))
    assert len(here) == len(there) == 4
    for (i0, x0, e0, w0), (i1, x1, e1, w1) in zip(here, there):
        assert i0 == i1 and e0 == e1 and w0 == w1 and torch.equal(x0, x1)
    errors = dict(e for _, _, err, _ in here for e in err)
    assert list(errors) == [paths.index(cut)] and "truncated" in errors[paths.index(cut)]
    warnings = {k: v for _, _, _, w in there for k, v in w.items()}
    assert warnings == {paths.index(small): "only 40x20 pixels (under 32 on a side): the caption is unreliable"}
