"""Core: vocabulary, encoder, decoder, search, checkpoints, CLI errors."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_model, shared_or_skip
from PIL import Image

from captioner.cli.main import main
from captioner.model.decoder import Decoder, DecoderConfig, attention_penalty
from captioner.model.encoder import Encoder, EncoderConfig, image_transform, rename_lite_keys
from captioner.errors import CaptionerError
from captioner.pipeline.captioner import Captioner
from captioner.model.checkpoint import load_checkpoint, save_checkpoint
from captioner.model.search import SearchConfig, beam_search, greedy, search
from captioner.model.vocab import Vocab, tokenize


def test_tokenize_and_vocab_roundtrip():
    assert tokenize("A dog, running; on the GRASS.") == ["a", "dog", "running", "on", "the", "grass"]
    v = Vocab.build(["a red circle", "a red square", "a blue thing"], min_count=2)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and set(v.itos[4:]) == {"a", "red"}
    ids = v.encode("a red zebra")
    assert ids[0] == v.start and ids[-1] == v.end and ids[3] == v.unk
    assert v.decode(ids) == "a red <unk>"
    assert Vocab.from_dict(v.to_dict()).itos == v.itos


@pytest.fixture(scope="module")
def lite0():
    return Encoder(EncoderConfig())


def test_default_encoder_loads_strictly_offline_and_classifies_cat(lite0):
    import timm
    from captioner.model.encoder import lite_weights_path

    state = torch.load(lite_weights_path("efficientnet_lite0"), weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0")
    renamed = rename_lite_keys(state, [len(s) for s in model.blocks])
    assert len(renamed) == 296 and set(renamed) == set(model.state_dict())
    photo = shared_or_skip("photos", "chelsea.png")
    x = image_transform()(Image.open(photo).convert("RGB"))[None]
    feats, logits = lite0(x)
    assert feats.shape == (1, 49, 1280)
    assert int(logits.argmax()) in range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    fast, fast_logits = lite0.encode(x)  # channels_last + bf16 where the CPU has it
    assert torch.nn.functional.cosine_similarity(fast.flatten(), feats.flatten(), dim=0) > 0.99


@pytest.mark.parametrize("grid", [7, 14])
def test_prepared_encoder_matches_the_plain_one(grid):
    """prepare_inference folds every BatchNorm into its convolution (and keeps bf16 weights where the CPU has
    fast bf16): features and ImageNet logits stay those of the plain fp32 network, to bf16 rounding."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224).clamp(-1, 1)
    plain = Encoder(EncoderConfig(grid=grid))
    feats, logits = plain(x)
    prepared = Encoder(EncoderConfig(grid=grid)).prepare_inference(torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.net.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.net.modules()) > 40
    fast, fast_logits = prepared.encode(x)
    cos = torch.nn.functional.cosine_similarity(fast.flatten(1), feats.flatten(1))
    assert cos.min() > 0.995, cos
    assert torch.equal(fast_logits.argmax(1), logits.argmax(1))
    assert prepared.cache_identity() != plain.cache_identity()  # their features are cached apart


def test_encoder_grid14(lite0):
    enc = Encoder(EncoderConfig(grid=14))
    feats, _ = enc(torch.zeros(1, 3, 224, 224))
    assert feats.shape == (1, 196, 112)


def test_unknown_encoder_and_offline_torchvision(tmp_path, monkeypatch):
    with pytest.raises(CaptionerError, match="unknown encoder"):
        Encoder(EncoderConfig("vgg-nonexistent"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CAPTIONER_OFFLINE", "1")
    with pytest.raises(CaptionerError, match=r"mobilenet_v3_large-.*\.pth.*" + str(tmp_path)):
        Encoder(EncoderConfig("mobilenet_v3_large"))


def test_torchvision_encoder_from_hub_cache(tmp_path, monkeypatch):
    """With the weights file in the torch hub cache, a torchvision backbone loads offline."""
    import torchvision

    weights = torchvision.models.MobileNet_V3_Large_Weights.DEFAULT
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), folder / weights.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CAPTIONER_OFFLINE", "1")
    enc = Encoder(EncoderConfig("mobilenet_v3_large"))
    assert enc(torch.zeros(1, 3, 224, 224))[0].shape == (1, 49, 960)


def _decoder(seed=0, vocab=30, end_bias=0.0):
    torch.manual_seed(seed)
    dec = Decoder(DecoderConfig(vocab, 24, feat_proj=16, embed_dim=16, hidden_dim=32, attn_dim=16, dropout=0.0)).eval()
    with torch.no_grad():
        dec.L_o.bias[2] = end_bias
    return dec


def test_decoder_shapes_and_penalty():
    dec = _decoder()
    caps = torch.randint(4, 30, (3, 7))
    logits, alphas = dec(torch.randn(3, 10, 24), caps)
    assert logits.shape == (3, 6, 30) and alphas.shape == (3, 6, 10)
    assert torch.allclose(alphas.sum(-1), torch.ones(3, 6), atol=1e-5)
    assert attention_penalty(alphas, torch.ones(3, 6)) >= 0
    gru = Decoder(DecoderConfig(30, 24, cell="gru", feat_proj=0))
    assert gru(torch.randn(2, 10, 24), caps[:2])[0].shape == (2, 6, 30)


def test_teacher_forcing_skips_padding_and_shares_images():
    """Decoder.forward with captions of different lengths, several per image (image_index), gives the logits
    and attention of a plain step-by-step loop over each caption alone, and exact zeros past each caption's end;
    gradients flow only from the real positions."""
    dec = _decoder(3)
    feats = torch.randn(2, 10, 24)
    lengths = [7, 3, 5, 2, 6]  # <start> + words + <end>, padded with 0 to 7
    index = torch.tensor([0, 0, 1, 1, 0])
    caps = torch.zeros(5, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        caps[i, :n] = torch.randint(4, 30, (n,))
    logits, alphas = dec(feats, caps, index, pad=0)
    assert logits.shape == (5, 6, 30) and alphas.shape == (5, 6, 10)
    for i, n in enumerate(lengths):
        a, keys, state = dec.prepare(feats[index[i]].unsqueeze(0))
        for t in range(n - 1):
            out, state, alpha = dec.step(caps[i, t].view(1), a, keys, state)
            assert torch.allclose(logits[i, t], out[0], atol=1e-5)
            assert torch.allclose(alphas[i, t], alpha[0], atol=1e-6)
        assert not logits[i, n - 1:].any() and not alphas[i, n - 1:].any()
    feats.requires_grad_(True)
    logits, _ = dec(feats, caps[:1, :4], torch.tensor([1]))
    logits.sum().backward()
    assert not feats.grad[0].any() and feats.grad[1].abs().sum() > 0  # image 0 has no caption in this batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam1_equals_greedy(seed):
    dec, feats = _decoder(seed), torch.randn(5, 10, 24)
    cfg = SearchConfig(beam=1, max_len=12)
    g = greedy(dec, feats, cfg)
    b = beam_search(dec, feats, cfg)
    assert [h[0].tokens for h in g] == [h[0].tokens for h in b]
    assert [round(h[0].logprob, 4) for h in g] == [round(h[0].logprob, 4) for h in b]


@pytest.mark.parametrize("beam", [2, 3, 5])
def test_batched_beam_equals_one_by_one(beam):
    dec, feats = _decoder(3), torch.randn(6, 10, 24)
    cfg = SearchConfig(beam=beam, max_len=12, topk=beam, length_penalty=0.7)
    batched = beam_search(dec, feats, cfg)
    for i in range(6):
        alone = beam_search(dec, feats[i:i + 1], cfg)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], abs=1e-4)
        assert all(a.score >= b.score for a, b in zip(batched[i], batched[i][1:]))


def test_beam_without_end_token_never_crashes_and_respects_limits():
    dec = _decoder(4, end_bias=-1e4)  # <end> is never chosen
    feats = torch.randn(3, 10, 24)
    for hyps in beam_search(dec, feats, SearchConfig(beam=4, max_len=9, topk=4)):
        assert len(hyps) == 4 and all(len(h.tokens) == 9 for h in hyps)
        assert all(h.attention.shape == (9, 10) for h in hyps)
        assert all(3 not in h.tokens and 0 not in h.tokens for h in hyps)  # no <unk>, no <pad>
    eager = _decoder(4, end_bias=50.0)  # <end> always wins unless forbidden
    for cfg in (SearchConfig(beam=3, min_len=4), SearchConfig(beam=1, min_len=4)):
        assert all(len(h[0].tokens) == 4 for h in (beam_search if cfg.beam > 1 else greedy)(eager, feats, cfg))


def test_no_repeat_ngram():
    dec = _decoder(5, end_bias=-1e4)
    for search in (greedy, beam_search):
        for hyp in search(dec, torch.randn(4, 10, 24), SearchConfig(beam=3, max_len=15, no_repeat_ngram=2)):
            toks = hyp[0].tokens
            bigrams = list(zip(toks, toks[1:]))
            assert len(bigrams) == len(set(bigrams))


def test_checkpoint_roundtrip_and_bad_files(tmp_path, tiny_model):
    cap = Captioner.load(tiny_model)
    out = cap.caption([Image.new("RGB", (90, 60), "red"), Image.new("L", (40, 40), 128).convert("RGB")], beam=3, topk=2)
    assert len(out) == 2 and out[0].text and len(out[0].alternatives) == 2
    assert out[0].attention.shape == (len(out[0].words), 7, 7)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_model.read_bytes()[:500])
    with pytest.raises(CaptionerError, match="corrupt or truncated"):
        load_checkpoint(truncated)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "captioner/1", "x": Evil()}, evil)
    with pytest.raises(CaptionerError, match="refused"):
        load_checkpoint(evil)
    plain_pickle = tmp_path / "pickle.pt"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CaptionerError):
        load_checkpoint(plain_pickle)

    ckpt = load_checkpoint(tiny_model)
    ckpt["vocab"] = ckpt["vocab"] + ["extra"]
    mismatch = tmp_path / "mismatch.pt"
    save_checkpoint(mismatch, {k: v for k, v in ckpt.items() if k != "format"})
    with pytest.raises(CaptionerError, match="inconsistent"):
        Captioner.load(mismatch)
    with pytest.raises(CaptionerError, match="not found"):
        Captioner.load(tmp_path / "missing.pt")


@pytest.mark.parametrize("cmd", [[], ["caption"], ["video"], ["train"], ["evaluate"], ["export"]])
def test_cli_help(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*cmd, "--help"])
    assert exc.value.code == 0
    assert "usage: captioner" in capsys.readouterr().out


def test_cli_errors_are_one_line_without_traceback(tmp_path, tiny_model):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(img)
    cases = [["caption", str(img), "--model", str(tmp_path / "missing.pt")],
             ["caption", str(img), "--model", str(bad)],
             ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "run")],
             ["train", "--data", str(tmp_path), "--encoder", "nonexistent-net"],
             ["train", "--data", str(tmp_path), "--init", str(tmp_path / "missing.pt"), "--scst", "true"],
             ["train", "--data", str(tmp_path), "--init", str(bad)],
             ["train", "--data", str(tmp_path), "--scst", "true", "--scst-samples", "1"]]
    for args in cases:
        res = subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0, args
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("captioner: error")]
        assert len(lines) == 1 and "Traceback" not in res.stderr, (args, res.stderr)


@pytest.mark.parametrize("beam", [1, 3])
def test_no_repeat_words_never_repeats_a_content_word(beam):
    """A decoder that loves one content word ("dog") says it once with no_repeat_words; function words may
    repeat. Without the option it repeats it."""
    from captioner.model.vocab import Vocab

    words = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "on", "grass"] + [f"w{i}" for i in range(22)]
    vocab = Vocab(words)
    dec = _decoder(6, vocab=len(words), end_bias=-1e4)
    with torch.no_grad():
        dec.L_o.bias[5] = 30.0  # "dog" always wins
        dec.L_o.bias[4] = 20.0  # then "a"
    feats = torch.randn(2, 10, 24)
    mask = torch.tensor(vocab.content_mask())
    assert mask.tolist()[4:8] == [False, True, False, True]
    plain = search(dec, feats, SearchConfig(beam=beam, max_len=6), repeat_mask=mask)
    assert all(h[0].tokens.count(5) > 1 for h in plain)
    blocked = search(dec, feats, SearchConfig(beam=beam, max_len=6, no_repeat_words=True), repeat_mask=mask)
    for hyps in blocked:
        content = [t for t in hyps[0].tokens if mask[t]]
        assert content.count(5) == 1 and len(content) == len(set(content))
        assert hyps[0].tokens.count(4) > 1  # "a" is a function word: it may repeat
