"""The default model inside the package: plain weights, consistent config, fast on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import shared_or_skip
from PIL import Image, ImageDraw

from captioner.pipeline.captioner import Captioner
from captioner.model.checkpoint import default_model_path


def test_shipped_checkpoint_is_plain_and_consistent():
    path = default_model_path()
    assert path.is_file(), "the package must ship captioner/assets/model.pt"
    assert path.stat().st_size <= 30 * 2**20
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code
    json.dumps(ckpt["config"])  # the config is JSON-able
    assert "train_state" not in ckpt
    vocab = ckpt["vocab"]
    assert vocab[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and len(set(vocab)) == len(vocab)
    assert ckpt["config"]["decoder"]["vocab_size"] == len(vocab)
    assert ckpt["config"]["encoder"]["name"] == "efficientnet_lite0"
    assert all(v.dtype in (torch.float16, torch.int64) for v in ckpt["decoder"].values())
    assert {"a", "man", "dog", "on"} <= set(vocab)


def test_shipped_model_captions_a_synthetic_image():
    """(Its latency is measured in bench/bench.py, not asserted here.)"""
    cap = Captioner.load()
    img = Image.new("RGB", (320, 240), (90, 150, 220))
    ImageDraw.Draw(img).rectangle((0, 150, 320, 240), fill=(60, 140, 50))
    cap.caption([img])  # warm-up (first call allocates)
    out = cap.caption([img], beam=3)[0]
    assert out.text and len(out.words) >= 3 and out.attention.shape == (len(out.words), 7, 7)


def test_shipped_model_on_unseen_photos():
    photos = shared_or_skip("photos")
    cap = Captioner.load()
    images = [Image.open(p).convert("RGB") for p in sorted(photos.glob("*.png"))]
    texts = [c.text for c in cap.caption(images, beam=3)]
    assert all(len(t.split()) >= 3 for t in texts)
    assert len(set(texts)) >= 3, texts  # it looks at the image: not one caption for everything
    if not texts:
        pytest.fail("no photos")


def test_shipped_bundle_is_the_shipped_checkpoint():
    """The default model (assets/model/, run without torch) is model.pt exported: the same model id, every file's
    SHA-256 as model.json records it, small enough to ship (issue 26: <= 40 MiB with model.pt; 42 MiB since the
    encoder's last stage is fine-tuned: model.pt carries its 1.03 M weights, 2 MiB)."""
    from captioner.lite.bundle import read_bundle
    from captioner.pipeline.load import default_model

    bundle = read_bundle(default_model(), verify=True)
    assert bundle.folder.name == "model" and bundle.folder.parent == default_model_path().parent
    assert bundle.model_id == Captioner.load(prepare=False).model_id
    shipped = sum(f.stat().st_size for f in bundle.folder.iterdir()) + default_model_path().stat().st_size
    assert shipped <= 42 * 2**20, shipped


def test_shipped_bundle_tracks_small_graphs_and_rebuilds_its_weights(tmp_path):
    """Only model.pt may be larger than 4 MB: the bundle's graphs are small and its data files (not tracked) are
    rebuilt, byte for byte, from model.pt and the Lite0 weights package, every tensor by a recipe."""
    import shutil

    from captioner.lite.bundle import FILES, read_bundle
    from captioner.pipeline.load import default_model

    folder = read_bundle(default_model(), verify=True).folder  # rebuilds the data files if this checkout has none
    manifest = json.loads((folder / "model.json").read_text())
    data = {f["data"]["file"]: f["data"] for f in manifest["files"].values()}
    assert len(data) == len(FILES) and all(d["rebuildable"] for d in data.values())
    assert set(manifest["sources"]) == {"checkpoint", "efficientnet_lite0"}
    assert manifest["sources"]["checkpoint"]["file"] == "../model.pt"
    for p in folder.iterdir():
        assert p.name in data or p.stat().st_size < 4 * 2**20, p
    (tmp_path / "model").mkdir()
    shutil.copyfile(default_model_path(), tmp_path / "model.pt")
    for name in [*FILES.values(), "model.json"]:
        shutil.copyfile(folder / name, tmp_path / "model" / name)
    assert read_bundle(tmp_path / "model").folder == tmp_path / "model"
    assert all((tmp_path / "model" / n).read_bytes() == (folder / n).read_bytes() for n in data)
