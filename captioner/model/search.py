"""Greedy and beam search over a torch decoder. The search itself is lite/search.py, the one search (issue 26): the
torch captioner, training's validation decode and the torch-free LiteCaptioner all run it. What stays here is the
torch side: `Decoder.prepare` in torch, and each step through `TorchStep`, which hands the search NumPy arrays.

A decoder that can step on NumPy arrays itself (runtime/onnx_decoder.py's OnnxDecoder: `numpy_step`) is used
directly, with no torch tensors in between."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..lite import search as lite
from ..lite.search import (  # noqa: F401 - re-exported
    LOW_SCORE,
    NEG,
    Hypothesis,
    SearchConfig,
    State,
    Step,
    score_warning,
)


class TorchStep:
    """`decoder.step` as the NumPy search's step, on the decoder's device. The annotations and keys change only when
    the search drops finished rows, so their device copies are kept between steps (a GPU is not sent them again)."""

    def __init__(self, decoder: Any, device: torch.device):
        self.decoder, self.device = decoder, device
        self._held: dict[str, tuple[np.ndarray, torch.Tensor]] = {}

    def _tensor(self, name: str, array: np.ndarray) -> torch.Tensor:
        held = self._held.get(name)
        if held is not None and held[0] is array:
            return held[1]
        tensor = torch.from_numpy(array).to(self.device)
        self._held[name] = (array, tensor)
        return tensor

    @torch.no_grad()
    def __call__(self, words: np.ndarray, a: np.ndarray, keys: np.ndarray, state: State
                 ) -> tuple[np.ndarray, State, np.ndarray]:
        dev = self.device
        h, c = (torch.from_numpy(s).to(dev) for s in state)
        logits, (h, c), alpha = self.decoder.step(torch.from_numpy(words).to(dev), self._tensor("a", a),
                                                  self._tensor("keys", keys), (h, c))
        return (logits.float().cpu().numpy(), (h.float().cpu().numpy(), c.float().cpu().numpy()),
                alpha.float().cpu().numpy())


def _prepared(decoder: Any, feats: torch.Tensor) -> tuple[np.ndarray, np.ndarray, State, Step]:
    """The search's inputs from features: prepare in torch, as float32 arrays, and the step to run."""
    with torch.no_grad():
        a, keys, (h, c) = decoder.prepare(feats)
    arrays = [t.detach().float().cpu().contiguous().numpy() for t in (a, keys, h, c)]
    step = getattr(decoder, "numpy_step", None) or TorchStep(decoder, feats.device)
    return arrays[0], arrays[1], (arrays[2], arrays[3]), step


def _mask(repeat_mask: torch.Tensor | np.ndarray | None) -> np.ndarray | None:
    if repeat_mask is None:
        return None
    if isinstance(repeat_mask, torch.Tensor):
        return repeat_mask.detach().cpu().numpy().astype(bool)
    return np.asarray(repeat_mask, dtype=bool)


def greedy(decoder: Any, feats: torch.Tensor, cfg: SearchConfig, specials=(0, 1, 2, 3),
           repeat_mask: torch.Tensor | np.ndarray | None = None) -> list[list[Hypothesis]]:
    a, keys, state, step = _prepared(decoder, feats)
    return lite.greedy(step, a, keys, state, cfg, specials, _mask(repeat_mask))


def beam_search(decoder: Any, feats: torch.Tensor, cfg: SearchConfig, specials=(0, 1, 2, 3),
                repeat_mask: torch.Tensor | np.ndarray | None = None) -> list[list[Hypothesis]]:
    """Returns, per image, the cfg.topk best hypotheses (best first)."""
    a, keys, state, step = _prepared(decoder, feats)
    return lite.beam_search(step, a, keys, state, cfg, specials, _mask(repeat_mask))


def search(decoder: Any, feats: torch.Tensor, cfg: SearchConfig, specials=(0, 1, 2, 3),
           repeat_mask: torch.Tensor | np.ndarray | None = None) -> list[list[Hypothesis]]:
    """Greedy (beam 1) or beam search over `decoder` (a Decoder, or anything with its `prepare` and `step`) from
    encoder features (B, L, D). `repeat_mask` (V,) bool: the words cfg.no_repeat_words never repeats
    (Vocab.content_mask: the vocabulary minus function words)."""
    a, keys, state, step = _prepared(decoder, feats)
    return lite.search(step, a, keys, state, cfg, specials, _mask(repeat_mask))
