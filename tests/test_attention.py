"""Attention: the sharpness figures evaluate reports, the doubly stochastic penalty's two forms, the EMA warm-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from captioner.model.decoder import attention_penalty
from captioner.training.metrics import attention_stats
from captioner.training.train import ema_warmup_fn


def test_uniform_maps_give_peak_one_over_l_and_entropy_log_l():
    maps = [np.ones((3, 7, 7)), np.full((5, 7, 7), 0.5), np.zeros((0, 7, 7))]  # not normalised; an empty caption
    s = attention_stats(maps)
    assert s["attention_peak"] == pytest.approx(1 / 49)
    assert s["attention_entropy"] == pytest.approx(math.log(49))


def test_one_hot_and_mixed_maps():
    one_hot = np.zeros((2, 4))
    one_hot[:, 1] = 1.0
    assert attention_stats([one_hot]) == {"attention_peak": 1.0, "attention_entropy": 0.0}
    # per word, then the mean over all words of all captions: (1 + 0.5) / 2 and (0 + log 2) / 2
    s = attention_stats([one_hot[:1], np.array([[0.5, 0.5, 0, 0]])])
    assert s["attention_peak"] == pytest.approx(0.75)
    assert s["attention_entropy"] == pytest.approx(math.log(2) / 2)


def test_no_words_gives_nan():
    assert all(math.isnan(v) for v in attention_stats([np.zeros((0, 49))]).values())


def _alphas(b: int = 4, t: int = 6, cells: int = 49, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    alphas = torch.softmax(3 * torch.randn(b, t, cells, generator=g), 2)
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return alphas * mask.unsqueeze(2), mask


def test_mean_penalty_is_zero_at_even_coverage_and_sum_is_not():
    mask = torch.ones(2, 11)
    uniform = torch.full((2, 11, 49), 1 / 49)
    assert float(attention_penalty(uniform, mask, "mean")) == pytest.approx(0, abs=1e-12)
    assert float(attention_penalty(uniform, mask, "sum")) == pytest.approx((49 - 11) ** 2 / 49, rel=1e-5)


def test_sum_is_l_times_mean_plus_a_constant_so_same_gradient_direction():
    """sum_i (1-c_i)^2 = sum_i (T/L-c_i)^2 + L(1-T/L)^2 since sum_i c_i = T: the forms differ by a constant and the
    factor L, so `mean` at lambda is the old form at lambda / L (the change is the scale, not the direction)."""
    alphas, mask = _alphas()
    logits = alphas.clamp_min(1e-9).log().requires_grad_(True)
    grads = {}
    for form in ("sum", "mean"):
        logits.grad = None
        attention_penalty(torch.softmax(logits, 2) * mask.unsqueeze(2), mask, form).backward()
        grads[form] = logits.grad.clone()
    torch.testing.assert_close(grads["sum"], 49 * grads["mean"], rtol=1e-4, atol=1e-7)
    t = mask.sum(1)
    const = (49 * (1 - t / 49) ** 2).mean()
    gap = attention_penalty(alphas, mask, "sum") - 49 * attention_penalty(alphas, mask, "mean")
    assert float(gap) == pytest.approx(float(const), rel=1e-4)


def test_ema_warmup_decay():
    """Decay min(d, (1+n)/(10+n)): the second update already moves 9/11 of the way; later updates use d."""
    model = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(0.99), use_buffers=True)
    values = [0.0, 1.0, 2.0, 3.0]
    e = None
    for n, v in enumerate(values):
        model.weight.data.fill_(v)
        ema.update_parameters(model)
        e = v if n == 0 else min(0.99, (1 + n) / (10 + n)) * e + (1 - min(0.99, (1 + n) / (10 + n))) * v
        assert float(ema.module.weight.detach()) == pytest.approx(e)


def _peak_in_box(att: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """The centre of the map's largest cell lies inside the box (fractions of the image side)."""
    grid = att.shape[-1]
    i, j = np.unravel_index(int(att.argmax()), att.shape)
    x, y = (j + 0.5) / grid, (i + 0.5) / grid
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def test_a_model_trained_on_scenes_looks_at_the_object_it_names(tmp_path):
    """One coloured shape on a grey background, captioned "a red circle": a small decoder on the pixel grid
    (no CNN) puts its peak attention cell inside the object's box for >= 80% of colour and shape words (with the
    per-cell penalty at 0.1; docs/attention.md gives the other settings tried)."""
    from PIL import Image
    from synth import COLOURS, SHAPES, make_object_dataset

    from captioner.pipeline.captioner import Captioner
    from captioner.training.train import TrainConfig, train

    data, boxes = make_object_dataset(tmp_path / "scenes", n_train=600, n_val=40, n_test=60)
    best = train(TrainConfig(data=[str(data)], out=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"),
                             encoder="pixels", pretrained=False, feat_proj=64, embed_dim=32, hidden_dim=64,
                             attn_dim=32, dropout=0.0, min_count=1, lr=3e-3, batch_size=32, beam=1, epochs=8,
                             patience=8, num_workers=0, seed=0, alpha_c=0.1, penalty="mean"))
    cap = Captioner.load(best)
    tests = sorted(name for name in boxes if name.startswith("test_"))
    caps = cap.caption([Image.open(data.parent / name).convert("RGB") for name in tests], beam=1)
    hits = [_peak_in_box(c.attention[k], boxes[name]) for name, c in zip(tests, caps)
            for k, w in enumerate(c.words) if w in COLOURS or w in SHAPES]
    print(f"{sum(hits)}/{len(hits)} object words with the peak inside the box; {caps[0].text!r}")
    assert len(hits) >= len(tests)  # it names them
    assert sum(hits) >= 0.8 * len(hits)


def test_learned_initial_state_does_not_see_the_image():
    """--init-state learned: h0/c0 are the same for every image (the image reaches the LSTM through attention
    only); the default still starts from the mean annotation, and a config without the field loads as before."""
    from captioner.model.decoder import Decoder, DecoderConfig

    torch.manual_seed(0)
    feats = torch.rand(2, 49, 32)
    for init, same in (("learned", True), ("image", False)):
        dec = Decoder(DecoderConfig(20, 32, 16, 8, 16, 8, init_state=init)).eval()
        _, _, (h, c) = dec.prepare(feats)
        assert torch.equal(h[0], h[1]) == same and torch.equal(c[0], c[1]) == same
    assert DecoderConfig(20, 32).init_state == "image"
    with pytest.raises(ValueError, match="init_state"):
        Decoder(DecoderConfig(20, 32, init_state="zeros"))
