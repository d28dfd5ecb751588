"""The torch-free inference core (issue 26 phase 1, captioner/lite/): its preprocessing gives the torch transform's
numbers bit for bit, its NumPy search the torch search's hypotheses, a model bundle (`captioner export-onnx`) runs in
LiteCaptioner with the torch captioner's captions, and all of it works where `import torch` fails. Small inputs, one
thread, behaviour only."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.lite.images import to_rgb
from captioner.lite.preprocess import Preprocessing, axis_weights, preprocess, resize_uint8
from captioner.model.encoder import image_transform, preprocessing

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(glob.glob(str(ROOT / "captioner" / "assets" / "examples" / "*.jpg")))


# ------------------------------------------------------------------------------------------ preprocessing ------
def odd_images() -> list[tuple[str, Image.Image]]:
    """Generated images of odd sizes, aspect ratios and modes (what to_rgb turns into RGB first)."""
    rng = np.random.default_rng(0)
    found = []
    for w, h in [(1, 1), (3, 700), (700, 3), (223, 224), (225, 225), (257, 255), (1000, 333), (57, 91), (224, 224),
                 (64, 48), (1201, 899)]:
        found.append((f"rgb {w}x{h}", Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))))
    smooth = np.add.outer(np.arange(300), np.arange(410)).astype(np.float64)
    found.append(("L", Image.fromarray((smooth % 256).astype(np.uint8), "L")))
    rgba = rng.integers(0, 256, (190, 270, 4), dtype=np.uint8)
    found.append(("RGBA", Image.fromarray(rgba, "RGBA")))
    found.append(("P", Image.fromarray(rng.integers(0, 256, (150, 333, 3), dtype=np.uint8)).convert("P")))
    found.append(("I;16", Image.fromarray((smooth * 97).astype(np.uint16))))
    assert found[-1][1].mode == "I;16"
    return found


def torch_input(image: Image.Image, name: str, resize: str) -> np.ndarray:
    """Today's encoder input: the torch transform of the image as the loader gives it (RGB)."""
    return image_transform(name, resize)(to_rgb(image.copy())).numpy()


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_preprocessing_is_bit_identical_to_torchvision(resize):
    spec = preprocessing("efficientnet_lite0", resize)
    cases = [(Path(p).name, Image.open(p)) for p in EXAMPLES] + odd_images()
    assert len(cases) >= 20
    for label, image in cases:
        want = torch_input(image, "efficientnet_lite0", resize)
        got = preprocess([image.copy()], spec)[0]
        assert got.dtype == np.float32 and got.shape == want.shape, label
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (label, float(np.abs(got - want).max()))


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite2", "pixels"])
def test_preprocessing_of_the_other_encoders(name):
    """Other crop sizes, ImageNet mean/std, and the bilinear 56x56 of the test encoder (tiny models)."""
    spec = preprocessing(name, "crop")
    for label, image in odd_images()[:8]:
        want = torch_input(image, name, "crop")
        got = preprocess([image], spec)[0]
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (name, label)


def test_the_resize_is_torchs_uint8_kernel_not_pillows():
    """Pillow's own bicubic is 1 grey level off torch's on some values (its 22-bit weights round differently);
    resize_uint8 is torch's integer arithmetic: equal to torch's interpolate on uint8, where Pillow is not."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    want = torch.nn.functional.interpolate(torch.from_numpy(pixels).permute(2, 0, 1)[None], size=(256, 384),
                                           mode="bicubic", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    ours = resize_uint8(pixels, 256, 384)
    pil = np.asarray(Image.fromarray(pixels).resize((384, 256), Image.BICUBIC))
    assert np.array_equal(ours, want)
    diff = np.abs(pil.astype(int) - want.astype(int))
    assert diff.max() == 1 and diff.any()  # why Pillow's resize is not used


def test_axis_weights_sum_to_one_at_their_precision():
    for n_in, n_out in [(451, 256), (256, 451), (5, 224), (4000, 341)]:
        first, weights, precision = axis_weights(n_in, n_out, "bicubic")
        assert 0 < precision <= 22 and weights.shape[0] == n_out and (first >= 0).all()
        assert np.abs(weights.sum(1) - (1 << precision)).max() <= weights.shape[1]  # rounding of each weight


def test_preprocessing_settings_round_trip():
    spec = preprocessing("resnet50", "squash")
    assert Preprocessing.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert preprocess([], spec).shape == (0, 3, 224, 224)


# ----------------------------------------------------------------------------------------------- search ------
def random_decoder(seed: int, cell: str = "lstm", vocab: int = 40):
    """A small random decoder with peaked word distributions (as a trained one has: few near-ties)."""
    from captioner.model.decoder import Decoder, DecoderConfig

    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=vocab, feat_dim=24, feat_proj=16, embed_dim=12, hidden_dim=20, attn_dim=8,
                        dropout=0.0, cell=cell, tie_weights=seed % 2 == 0, attributes=5 if seed % 3 == 0 else 0)
    dec = Decoder(cfg).eval()
    with torch.no_grad():
        dec.L_o.weight.mul_(12.0)
        dec.L_o.bias[2] = -1.0  # <end> not at once
    return dec


def numpy_step(decoder):
    """A torch Decoder as the lite search's step: numpy arrays in and out."""

    def step(words, a, keys, state):
        with torch.no_grad():
            logits, (h, c), alpha = decoder.step(torch.from_numpy(words), torch.from_numpy(a), torch.from_numpy(keys),
                                                 (torch.from_numpy(state[0]), torch.from_numpy(state[1])))
        return logits.numpy(), (h.numpy(), c.numpy()), alpha.numpy()

    return step


def both_searches(decoder, feats, cfg, mask):
    """(torch search's hypotheses, the same search's with every beam returned, the NumPy search's)."""
    from dataclasses import replace

    import reference_search as torch_search  # the torch search before issue 26: the oracle

    from captioner.lite import search as lite

    want = torch_search.search(decoder, feats, cfg, (0, 1, 2, 3), torch.from_numpy(mask))
    pool = torch_search.search(decoder, feats, replace(cfg, topk=max(cfg.beam, 1)), (0, 1, 2, 3), torch.from_numpy(mask))
    with torch.no_grad():
        a, keys, (h, c) = decoder.prepare(feats)
    got = lite.search(numpy_step(decoder), a.numpy(), keys.numpy(), (h.numpy(), c.numpy()), cfg, (0, 1, 2, 3), mask)
    return want, pool, got


def test_the_torch_captioners_search_is_the_numpy_search():
    """model/search.py only adapts a torch decoder to lite/search.py: the same hypotheses, exactly."""
    from captioner.lite import search as lite
    from captioner.model import search as adapter

    for beam in (1, 3):
        decoder = random_decoder(5)
        feats = torch.from_numpy(np.random.default_rng(5).normal(size=(7, 9, 24)).astype(np.float32))
        mask = np.arange(decoder.cfg.vocab_size) % 3 == 0
        cfg = lite.SearchConfig(beam=beam, max_len=10, topk=beam, no_repeat_words=True)
        via_torch = adapter.search(decoder, feats, cfg, (0, 1, 2, 3), torch.from_numpy(mask))
        with torch.no_grad():
            a, keys, (h, c) = decoder.prepare(feats)
        direct = lite.search(numpy_step(decoder), a.numpy(), keys.numpy(), (h.numpy(), c.numpy()), cfg, (0, 1, 2, 3), mask)
        for x, y in zip(via_torch, direct, strict=True):
            assert [(h.tokens, h.score, h.logprob) for h in x] == [(h.tokens, h.score, h.logprob) for h in y]
            assert all(np.array_equal(hx.attention, hy.attention) for hx, hy in zip(x, y))


def same_hypotheses(want, pool, got, where) -> int:
    """Asserts that the NumPy search returned the torch search's hypotheses: tokens, scores to float tolerance,
    attention. Two hypotheses whose scores tie to ~1e-6 may come in either order (log_softmax in NumPy and in torch
    differ in the last bits): returns 1 if there was such a swap, else 0."""
    swaps = 0
    assert len(got) == len(want), where
    for i, (w, g) in enumerate(zip(want, got)):
        assert g.score == pytest.approx(w.score, rel=1e-5, abs=1e-5), (where, i)
        if g.tokens != w.tokens:  # a near-tie: g must be another of torch's hypotheses with the same score
            twin = [p for p in pool if p.tokens == g.tokens]
            assert twin and twin[0].score == pytest.approx(g.score, rel=1e-5, abs=1e-5), (where, i, w.tokens, g.tokens)
            swaps = 1
            w = twin[0]
        assert g.logprob == pytest.approx(w.logprob, rel=1e-5, abs=1e-5), (where, i)
        assert g.attention.shape == tuple(w.attention.shape) == (len(w.tokens), w.attention.shape[1]), (where, i)
        np.testing.assert_allclose(g.attention, w.attention.numpy(), rtol=0, atol=1e-6)
    return swaps


SEARCH_OPTIONS = [dict(), dict(length_penalty=0.7), dict(min_len=4), dict(max_len=3), dict(max_len=12),
                  dict(no_repeat_ngram=1), dict(no_repeat_ngram=2), dict(no_repeat_ngram=3), dict(no_repeat_words=True),
                  dict(suppress_unk=False), dict(topk=5), dict(no_repeat_words=True, no_repeat_ngram=2, min_len=2,
                                                             length_penalty=1.0, topk=3)]


@pytest.mark.parametrize("beam", [1, 3, 5])
@pytest.mark.parametrize("options", SEARCH_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_numpy_search_gives_the_torch_searchs_hypotheses(beam, options):
    from captioner.lite.search import SearchConfig

    swaps = 0
    for seed, cell in [(0, "lstm"), (1, "gru"), (3, "lstm")]:
        decoder = random_decoder(seed, cell)
        rng = np.random.default_rng(seed)
        feats = torch.from_numpy(rng.normal(size=(6, 9, 24)).astype(np.float32))
        mask = rng.random(decoder.cfg.vocab_size) < 0.7
        mask[:4] = False
        cfg = SearchConfig(**{"beam": beam, "max_len": 8, **options})
        cfg.topk = min(cfg.topk, beam)
        want, pool, got = both_searches(decoder, feats, cfg, mask)
        assert len(got) == len(want) == 6
        for image, (ws, ps, gs) in enumerate(zip(want, pool, got)):
            assert len(gs) == min(cfg.topk, beam)
            swaps += same_hypotheses(ws, ps, gs, (seed, cell, image))
    assert swaps <= 1  # of 18 images (seed 0's image 3 has two captions whose float32 scores tie in torch)


def test_search_finishes_rows_and_keeps_lengths_apart():
    """Images whose captions end early drop out while others go on; every hypothesis is cut at <end>."""
    from captioner.lite.search import SearchConfig, search

    decoder = random_decoder(4)
    rng = np.random.default_rng(4)
    feats = torch.from_numpy(rng.normal(size=(16, 9, 24)).astype(np.float32))
    with torch.no_grad():
        a, keys, (h, c) = decoder.prepare(feats)
    calls = []
    inner = numpy_step(decoder)

    def counting(words, a_, keys_, state):
        calls.append(len(words))
        return inner(words, a_, keys_, state)

    hyps = search(counting, a.numpy(), keys.numpy(), (h.numpy(), c.numpy()), SearchConfig(beam=3, max_len=15))
    lengths = [len(hs[0].tokens) for hs in hyps]
    assert all(2 not in hs[0].tokens for hs in hyps) and 0 < min(lengths)
    assert calls[0] == 48 and (min(lengths) == max(lengths) or min(calls) < 48)


def test_search_options_are_checked_like_the_clis():
    from captioner.errors import CaptionerError
    from captioner.lite.search import SearchConfig, configure

    base = SearchConfig(beam=3, topk=1)
    assert configure(base, beam=5, topk=9).topk == 5 and configure(base, beam=None).beam == 3
    for bad in (dict(beam=0), dict(max_len=1000), dict(colour="red"), dict(length_penalty=float("nan"))):
        with pytest.raises(CaptionerError):
            configure(base, **bad)


# ----------------------------------------------------------------------------------------- bundle, captioner ------
def make_model(path: Path, cell: str = "lstm", attributes: int = 0, fp16: bool = False, seed: int = 0) -> Path:
    """A tiny random checkpoint on the `pixels` encoder (conftest.make_tiny_model's kind), optionally a GRU, with
    the ImageNet attributes path, or with fp16 weights (as `captioner export` stores the shipped model)."""
    from captioner.model.checkpoint import save_checkpoint
    from captioner.model.decoder import Decoder, DecoderConfig
    from captioner.model.search import SearchConfig
    from captioner.model.vocab import SPECIALS

    torch.manual_seed(seed)
    itos = list(SPECIALS) + ["a", "red", "blue", "circle", "square", "above", "the", "dog", "on", "grass"]
    cfg = DecoderConfig(vocab_size=len(itos), feat_dim=192, feat_proj=32, embed_dim=16, hidden_dim=32, attn_dim=16,
                        dropout=0.0, cell=cell, attributes=attributes)
    dec = Decoder(cfg)
    with torch.no_grad():
        dec.L_o.weight.mul_(8.0)
        dec.L_o.bias[2] = -2.0
    state = {k: (v.half() if fp16 else v) for k, v in dec.state_dict().items()}
    save_checkpoint(path, {"config": {"encoder": {"name": "pixels", "pretrained": False, "grid": 7},
                                      "decoder": cfg.to_dict(),
                                      "search": SearchConfig(beam=3, max_len=8, no_repeat_words=True).__dict__},
                           "vocab": itos, "decoder": state})
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """name -> (checkpoint, bundle folder), exported through the CLI once for the module."""
    from captioner.cli.main import main

    root = tmp_path_factory.mktemp("bundles")
    made = {}
    for name, kwargs, flags in [("lstm", {}, []), ("gru", {"cell": "gru", "seed": 1}, []),
                                ("imagenet", {"attributes": 1000, "seed": 2}, []),
                                ("fp16-exact", {"fp16": True, "seed": 3}, []), ("fp16-all", {"seed": 3}, ["--fp16"])]:
        ckpt = make_model(root / f"{name}.pt", **kwargs)
        assert main(["export-onnx", str(ckpt), str(root / name), "-q", *flags]) == 0
        made[name] = (ckpt, root / name)
    return made


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from conftest import picture

    folder = tmp_path_factory.mktemp("lite-pictures")
    paths = []
    for i, size in enumerate([(64, 48), (200, 90), (33, 120), (320, 240), (57, 57)]):
        paths.append(folder / f"p{i}.png")
        picture(i, size).save(paths[-1])
    return paths


def test_bundle_files_and_manifest(bundles):
    from captioner.lite.bundle import FILES, read_bundle
    from captioner.pipeline.captioner import Captioner

    ckpt, folder = bundles["imagenet"]
    b = read_bundle(folder)
    data = [f["data"]["file"] for f in b.manifest["files"].values() if "data" in f]
    assert data and sorted(p.name for p in folder.iterdir()) == sorted([*FILES.values(), *data, "model.json"])
    cap = Captioner.load(ckpt)
    assert b.model_id == cap.model_id and b.itos == cap.vocab.itos and b.grid == 7 and b.input == (3, 56, 56)
    assert b.content_mask.tolist() == cap.vocab.content_mask() and b.search == cap.search_cfg
    assert len(b.imagenet_categories) == 1000 and b.manifest["decoder"]["init_outputs"][-1] == "imagenet"
    assert read_bundle(bundles["lstm"][1]).imagenet_categories == []


def _graphs_only(folder: Path, to: Path) -> Path:
    """A copy of a bundle without its data files, beside it (model.json names its checkpoint by a relative path)."""
    import shutil

    to.mkdir()
    for p in folder.iterdir():
        if not p.name.endswith(".data"):
            shutil.copyfile(p, to / p.name)
    return to


def test_a_bundle_without_its_data_files_rebuilds_them_from_the_checkpoint(bundles, pictures, tmp_path, monkeypatch):
    """The data files (the large tensors) are rebuilt byte for byte from the checkpoint the bundle was exported from,
    once: into the bundle's folder, or where that is read-only into the user cache, which later loads reuse."""
    from captioner.lite import bundle as lite_bundle
    from captioner.lite.captioner import LiteCaptioner

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    ckpt, folder = bundles["imagenet"]
    files = read_bundle_files(folder)
    assert files and all(d["rebuildable"] and all(t["from"] for t in d["tensors"]) for d in files.values())
    copy = _graphs_only(folder, folder.parent / "imagenet-graphs")
    try:
        assert LiteCaptioner.load(copy, threads=1).bundle.folder == copy
        assert all((copy / n).read_bytes() == (folder / n).read_bytes() for n in files)
        want = [c.text for c in LiteCaptioner.load(folder, threads=1).caption(pictures)]
        for n in files:
            (copy / n).unlink()
        real_write = lite_bundle._write_all

        def read_only(where, written):  # the package folder of a system-wide install
            if where == copy:
                raise PermissionError(13, "Permission denied")
            real_write(where, written)

        monkeypatch.setattr(lite_bundle, "_write_all", read_only)
        cached = lite_bundle.read_bundle(copy).folder
        assert cached.is_relative_to(tmp_path / "cache") and not any((copy / n).exists() for n in files)
        assert all((cached / n).read_bytes() == (folder / n).read_bytes() for n in files)
        monkeypatch.setattr(lite_bundle, "build_data", lambda *a: pytest.fail("rebuilt again"))
        lite = LiteCaptioner.load(copy, threads=1)
        assert lite.bundle.folder == cached and [c.text for c in lite.caption(pictures)] == want
    finally:
        import shutil

        shutil.rmtree(copy)


def test_data_files_left_from_another_version_are_rebuilt_unless_they_cannot_be(bundles, monkeypatch, tmp_path, caplog):
    """After an update (git pull) the untracked data files of the bundle before are still there, of the same sizes
    but other bytes: they are rebuilt from the sources, not refused as damaged. One that no recipe rebuilds is."""
    import logging
    import shutil

    from captioner.errors import CaptionerError
    from captioner.lite.bundle import read_bundle

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    ckpt, folder = bundles["imagenet"]
    files = read_bundle_files(folder)
    copy = _graphs_only(folder, folder.parent / "imagenet-stale")

    def stale(name: str) -> None:
        raw = bytearray((folder / name).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (copy / name).write_bytes(bytes(raw))

    try:
        for name in files:
            stale(name)
        with caplog.at_level(logging.INFO, logger="captioner"):
            assert read_bundle(copy).folder == copy
        assert "weights rebuilt" in caplog.text
        assert all((copy / n).read_bytes() == (folder / n).read_bytes() for n in files)
        manifest = json.loads((copy / "model.json").read_text())
        for f in manifest["files"].values():
            f.get("data", {})["rebuildable"] = False
        (copy / "model.json").write_text(json.dumps(manifest))
        name = sorted(files)[0]
        stale(name)
        with pytest.raises(CaptionerError, match=f"{name} is damaged"):
            read_bundle(copy)
    finally:
        shutil.rmtree(copy)


def read_bundle_files(folder: Path) -> dict[str, dict]:
    """data file name -> its model.json entry."""
    manifest = json.loads((folder / "model.json").read_text())
    return {f["data"]["file"]: f["data"] for f in manifest["files"].values() if "data" in f}


def test_rebuilding_from_another_checkpoint_or_without_recipes_is_one_error(bundles, tmp_path, monkeypatch):
    from captioner.errors import CaptionerError
    from captioner.lite.bundle import read_bundle

    monkeypatch.setenv("CAPTIONER_CACHE", str(tmp_path / "cache"))
    ckpt, folder = bundles["lstm"]
    root = tmp_path / "moved"
    root.mkdir()
    copy = _graphs_only(folder, root / folder.name)
    make_model(root / ckpt.name, seed=7)  # where model.json says the checkpoint is: another model's
    with pytest.raises(CaptionerError, match="not the file this model bundle was made from"):
        read_bundle(copy)
    (root / ckpt.name).unlink()
    with pytest.raises(CaptionerError, match="which does not exist"):
        read_bundle(copy)
    manifest = json.loads((copy / "model.json").read_text())
    for f in manifest["files"].values():
        f.get("data", {})["rebuildable"] = False
    (copy / "model.json").write_text(json.dumps(manifest))
    with pytest.raises(CaptionerError, match="cannot be rebuilt"):
        read_bundle(copy)


def torch_captions(ckpt: Path, images, backend: str = "onnx", **options):
    from captioner.pipeline.captioner import Captioner

    return Captioner.load(ckpt, backend=backend).caption(images, **options)


@pytest.mark.parametrize("name", ["lstm", "gru", "imagenet", "fp16-exact"])
@pytest.mark.parametrize("options", [dict(beam=1), dict(beam=3, topk=3), dict(beam=5, no_repeat_ngram=2, min_len=3),
                                     dict(beam=3, length_penalty=0.5, no_repeat_words=False, max_len=4)])
def test_lite_captioner_gives_the_torch_captioners_captions(bundles, pictures, name, options):
    from captioner.lite.captioner import LiteCaptioner

    ckpt, folder = bundles[name]
    lite = LiteCaptioner.load(folder, threads=1)
    got = lite.caption(pictures, **options)
    want = torch_captions(ckpt, [str(p) for p in pictures], **options)
    for g, w in zip(got, want, strict=True):
        assert g.text == w.text and g.words == w.words
        assert g.score == pytest.approx(w.score, abs=1e-4)
        assert g.attention.shape == w.attention.shape == (len(w.words), 7, 7)
        np.testing.assert_allclose(g.attention, w.attention, atol=1e-4)
        assert [t for t, _ in g.alternatives] == [t for t, _ in w.alternatives]
        assert np.allclose([s for _, s in g.alternatives], [s for _, s in w.alternatives], atol=1e-4)


def test_lite_captioner_features_labels_and_inputs(bundles, pictures):
    from captioner.errors import CaptionerError
    from captioner.lite.captioner import LiteCaptioner
    from captioner.pipeline.captioner import Captioner

    ckpt, folder = bundles["imagenet"]
    lite, cap = LiteCaptioner.load(folder, threads=1), Captioner.load(ckpt)
    images = [Image.open(p) for p in pictures]
    batch = lite.preprocess(images)
    assert np.array_equal(batch, cap.preprocess([to_rgb(im.copy()) for im in images]).numpy())
    feats = lite.encode(batch)
    np.testing.assert_allclose(feats, cap.encode(torch.from_numpy(batch)).numpy(), atol=1e-5)
    labels, want = lite.imagenet_labels(feats, k=2), cap.imagenet_labels(torch.from_numpy(feats), k=2)
    assert [[n for n, _ in row] for row in labels] == [[n for n, _ in row] for row in want]
    assert lite.caption([]) == [] and lite.caption_batch(batch[:0]) == [] and lite.input_size() == (56, 56)
    with pytest.raises(CaptionerError, match="beam=0"):
        lite.caption(images, beam=0)
    with pytest.raises(CaptionerError, match="images, not"):
        lite.encode(np.zeros((1, 3, 10, 10), np.float32))
    with pytest.raises(CaptionerError, match="missing.png"):
        lite.caption([pictures[0].parent / "missing.png"])


def test_fp16_storage(bundles, pictures):
    """Weights that are fp16 numbers are stored as fp16 with no change to any output; --fp16 rounds the others
    (smaller files), and the sessions still take and give float32."""
    from captioner.lite.bundle import read_bundle
    from captioner.lite.captioner import LiteCaptioner

    exact = read_bundle(bundles["fp16-exact"][1]).manifest["files"]
    assert exact["decoder_step"]["fp16_initializers"] > 0 and exact["decoder_step"]["rounded_to_fp16"] == 0
    assert exact["encoder"]["fp16_initializers"] == 0  # the pixels encoder has no weights to store
    plain = read_bundle(bundles["lstm"][1]).manifest["files"]
    assert plain["decoder_step"]["fp16_initializers"] == 0  # random fp32 weights: kept as they are
    rounded = read_bundle(bundles["fp16-all"][1]).manifest["files"]
    assert rounded["decoder_step"]["rounded_to_fp16"] > 0
    size = lambda f: f["bytes"] + f.get("data", {}).get("bytes", 0)  # noqa: E731 - the graph and its data file
    assert size(rounded["decoder_step"]) < 0.8 * size(plain["decoder_step"])  # the same network, stored fp32
    lite = LiteCaptioner.load(bundles["fp16-all"][1], threads=1)
    session = lite.session("decoder_step")
    assert {i.type for i in session.get_inputs() if i.name != "words"} == {"tensor(float)"}
    assert all(len(c.words) >= 1 for c in lite.caption(pictures))


def test_export_and_load_errors_are_one_line(bundles, tmp_path, capsys):
    from captioner.cli.main import main
    from captioner.errors import CaptionerError
    from captioner.lite.captioner import LiteCaptioner

    ckpt, folder = bundles["lstm"]
    assert main(["export-onnx", str(ckpt), str(folder)]) == 2  # an existing bundle, no --overwrite
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    with pytest.raises(CaptionerError, match="does not exist"):
        LiteCaptioner.load(tmp_path / "nowhere")
    with pytest.raises(CaptionerError, match="has no model.json"):
        LiteCaptioner.load(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folder.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = bytearray((broken / "decoder_step.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "decoder_step.onnx").write_bytes(bytes(data))
    with pytest.raises(CaptionerError, match="decoder_step.onnx is damaged"):
        LiteCaptioner.load(broken)
    (broken / "encoder.onnx").unlink()
    with pytest.raises(CaptionerError, match="encoder.onnx is missing"):
        LiteCaptioner.load(broken)


# ------------------------------------------------------------------------------------------------ no torch ------
NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'timm'):
            raise ImportError(f'No module named {name!r} (blocked: the light install has no torch)')
        return None
sys.meta_path.insert(0, NoTorch())
"""

USE_LITE = """
import json, pkgutil, sys
try:
    import torch
except ImportError as exc:
    blocked = str(exc)
else:
    raise SystemExit('torch was importable')
import captioner, captioner.lite
from captioner.lite.captioner import LiteCaptioner
for mod in pkgutil.iter_modules(captioner.lite.__path__):
    __import__('captioner.lite.' + mod.name)
cap = LiteCaptioner.load(sys.argv[1], threads=1)
out = [{'text': c.text, 'score': c.score, 'attention': list(c.attention.shape), 'alternatives': c.alternatives}
       for c in cap.caption(sys.argv[2:], beam=3, topk=2)]
print(json.dumps({'blocked': blocked, 'torch_loaded': any(m.split('.')[0] == 'torch' for m in sys.modules),
                  'captions': out}))
"""


def test_the_light_core_runs_where_torch_cannot_be_imported(bundles, pictures):
    from captioner.lite.captioner import LiteCaptioner

    folder = bundles["lstm"][1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", NO_TORCH + USE_LITE, str(folder), *map(str, pictures)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert "blocked" in report["blocked"] and report["torch_loaded"] is False
    want = LiteCaptioner.load(folder, threads=1).caption(pictures, beam=3, topk=2)
    assert [c["text"] for c in report["captions"]] == [c.text for c in want]
    assert [c["attention"] for c in report["captions"]] == [list(c.attention.shape) for c in want]
    assert all(len(c["alternatives"]) == 2 for c in report["captions"])


def test_the_blocker_blocks():
    """The finder above does make `import torch` fail (else the test before proves nothing)."""
    run = subprocess.run([sys.executable, "-c", NO_TORCH + "import torch"], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "blocked: the light install has no torch" in run.stderr


# ------------------------------------------------------------------------------------------- shipped model ------
def test_shipped_model_bundle_is_compact_and_captions_as_the_onnx_path(tmp_path):
    """The shipped model as a bundle: within the issue's 40 MB with fp32 numbers (its decoder's weights are fp16
    numbers already), and the example photos get today's `--backend onnx` captions."""
    from captioner.lite.captioner import LiteCaptioner
    from captioner.training.bundle import export_bundle

    manifest = export_bundle(None, tmp_path / "shipped")
    files = manifest["files"]
    assert sum(f["bytes"] for f in files.values()) <= 40e6
    assert files["encoder"]["rounded_to_fp16"] == files["decoder_step"]["rounded_to_fp16"] == 0
    assert files["decoder_step"]["fp16_initializers"] > 0 and files["decoder_init"]["fp16_initializers"] > 0
    lite = LiteCaptioner.load(tmp_path / "shipped", threads=1)
    got = lite.caption(EXAMPLES)
    want = torch_captions(None, EXAMPLES)
    assert [c.text for c in got] == [c.text for c in want]
    assert np.allclose([c.score for c in got], [c.score for c in want], atol=1e-3)
    assert "cat" in got[[Path(p).name for p in EXAMPLES].index("chelsea.jpg")].text


def test_torch_files_read_without_torch_equal_torch_load(tmp_path):
    """lite/torchfile.py: the legacy stream (the Lite0 package) and the zip archive (a checkpoint) give torch.load's
    tensors, bit for bit; anything but tensors and plain containers is refused, as weights_only does."""
    from captioner.errors import CaptionerError
    from captioner.lite.torchfile import read_torch_file
    from captioner.lite.weights import lite_weights_path

    ckpt = make_model(tmp_path / "m.pt", fp16=True)
    torch.save({"x": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(), "n": torch.tensor(7)},
               tmp_path / "view.pt")  # a transposed view: strides
    for path in (lite_weights_path("efficientnet_lite0"), ckpt, tmp_path / "view.pt"):
        want, got = torch.load(path, map_location="cpu", weights_only=True), read_torch_file(path)
        tensors = {k: v for k, v in (want.get("decoder", want)).items() if torch.is_tensor(v)}
        mine = got.get("decoder", got)
        assert tensors and set(tensors) == set(mine)
        for k, v in tensors.items():
            assert mine[k].dtype == v.numpy().dtype and mine[k].shape == tuple(v.shape), k
            assert mine[k].tobytes() == v.contiguous().numpy().tobytes(), k
    torch.save({"bad": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(CaptionerError, match="not a tensor or a plain container"):
        read_torch_file(tmp_path / "module.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CaptionerError, match="not a torch weights file"):
        read_torch_file(tmp_path / "junk.pt")
