"""Shared fixtures. Everything the core suite needs is made here; tests that need the real
data in ../shared/data skip when it is absent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
torch.set_num_threads(1)  # 2 cores shared with data-loader workers: 1 thread is faster here
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _cache_of_the_session(tmp_path_factory):
    """Exports, compiled encoders and auto's measurements go to a cache of this test session, never the user's
    (a test that needs its own sets CAPTIONER_CACHE itself)."""
    before = os.environ.get("CAPTIONER_CACHE")
    os.environ["CAPTIONER_CACHE"] = str(tmp_path_factory.mktemp("captioner-cache"))
    yield
    if before is None:
        os.environ.pop("CAPTIONER_CACHE", None)
    else:
        os.environ["CAPTIONER_CACHE"] = before


def picture(i: int, size: tuple[int, int] = (64, 48)) -> "Image.Image":
    """A light-grey image with a centred rectangle whose colour depends on i."""
    from PIL import Image

    img = Image.new("RGB", size, (240, 240, 240))
    img.paste(((i * 53) % 256, (i * 97) % 256, (i * 151) % 256),
              (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return img


def picture_folder(tmp_path_factory, name: str, files: list[str]) -> Path:
    """A new folder with picture(i) saved as files[i] (the format follows the extension)."""
    d = tmp_path_factory.mktemp(name)
    for i, file in enumerate(files):
        picture(i).save(d / file)
    return d


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    """Five small good PNGs, ok0.png .. ok4.png."""
    return picture_folder(tmp_path_factory, "good", [f"ok{i}.png" for i in range(5)])


def shared_or_skip(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def make_tiny_model(path: Path, seed: int = 0, words: tuple[str, ...] = ("a", "red", "blue", "circle", "square", "above")) -> Path:
    """A random-weight checkpoint on the `pixels` encoder: deterministic, tiny, instant."""
    from captioner.model.decoder import Decoder, DecoderConfig
    from captioner.model.checkpoint import save_checkpoint
    from captioner.model.search import SearchConfig
    from captioner.model.vocab import SPECIALS

    torch.manual_seed(seed)
    itos = list(SPECIALS) + list(words)
    cfg = DecoderConfig(vocab_size=len(itos), feat_dim=192, feat_proj=32, embed_dim=16, hidden_dim=32, attn_dim=16, dropout=0.0)
    dec = Decoder(cfg)
    with torch.no_grad():  # make <end> unlikely early so captions have a few words
        dec.L_o.bias[2] = -2.0
    save_checkpoint(path, {"config": {"encoder": {"name": "pixels", "pretrained": False, "grid": 7},
                                      "decoder": cfg.to_dict(), "search": SearchConfig(beam=3, max_len=8).__dict__},
                           "vocab": itos, "decoder": dec.state_dict()})
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.pt")


def jpeg_bytes(i: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """picture(i) as JPEG bytes."""
    import io

    buf = io.BytesIO()
    picture(i, size).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A WebDataset tar (img2dataset's layout): for each (key, {ext: data}) the members KEY.ext, in order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(folder: Path, shards: int, per_shard: int, corrupt: int = 0) -> list[Path]:
    """`shards` tars of `per_shard` JPEG samples each (KEY.jpg, KEY.json, KEY.txt, keys as img2dataset makes them);
    the last `corrupt` samples of each shard hold bytes that are no image."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for s in range(shards):
        samples = []
        for i in range(per_shard):
            key, n = f"{s:05d}{i:04d}", s * per_shard + i
            image = jpeg_bytes(n) if i < per_shard - corrupt else b"not an image %d" % n
            samples.append((key, {"jpg": image, "json": json.dumps({"key": key, "n": n}).encode(),
                                  "txt": f"alt text {n}".encode()}))
        made.append(write_shard(folder / f"{s:05d}.tar", samples))
    return made
