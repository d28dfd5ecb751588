"""Self-critical sequence training (Rennie et al. 2017): after teacher forcing, train on the decoder's own
samples with their CIDEr-D as the reward, so it is optimised for whole captions, as it is used, instead of for
next words given perfect histories.

Per image, k captions are sampled; each one's baseline is the mean reward of the other k - 1 (Luo 2020, "A
better variant of self-critical sequence training"; no greedy decode needed), and the loss is
-(reward - baseline) * log p(caption) over the words up to and including <end>.

    captioner train --data ... --init runs/general/best.pt --scst true --lr 5e-5 --out runs/general-scst
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from ..model.decoder import Decoder
from ..model.vocab import Vocab
from .metrics import CiderD, coco_bleu

NEG = float("-inf")


def sample(decoder: Decoder, feats: torch.Tensor, k: int, max_len: int, vocab: Vocab,
           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k captions per image drawn from the decoder's distribution (<pad>, <start>, <unk> excluded, <end> forced
    after max_len words). Returns words (B*k, T), their log-probabilities (B*k, T, with gradients) and a mask of
    the steps that count (words up to and including <end>). Rows i*k .. i*k+k-1 belong to image i."""
    a, keys, (h, c) = decoder.prepare(feats)
    expand = lambda x: x.repeat_interleave(k, 0)  # noqa: E731
    a, keys, state = expand(a), expand(keys), (expand(h), expand(c))
    n = a.shape[0]
    banned = torch.zeros(decoder.cfg.vocab_size, dtype=torch.bool, device=a.device)
    banned[[vocab.pad, vocab.start, vocab.unk]] = True
    only_end = torch.ones_like(banned)
    only_end[vocab.end] = False
    words = torch.full((n,), vocab.start, dtype=torch.long, device=a.device)
    done = torch.zeros(n, dtype=torch.bool, device=a.device)
    out_words, out_logp, out_mask = [], [], []
    for t in range(max_len + 1):
        logits, state, _ = decoder.step(words, a, keys, state)
        logp = torch.log_softmax(logits.float().masked_fill(only_end if t == max_len else banned, NEG), dim=1)
        with torch.no_grad():
            words = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        out_words.append(words)
        out_logp.append(logp.gather(1, words.unsqueeze(1)).squeeze(1))
        out_mask.append(~done)
        done = done | (words == vocab.end)
        if bool(done.all()):
            break
    return torch.stack(out_words, 1), torch.stack(out_logp, 1), torch.stack(out_mask, 1).float()


def rewards(words: torch.Tensor, images: Sequence[int], k: int, vocab: Vocab, cider: CiderD,
            bleu_weight: float = 0.0, end: bool = False) -> torch.Tensor:
    """CIDEr-D (+ bleu_weight x sentence BLEU-4) of each sampled caption (rows of `words`, k per image) against
    its image's references (cider.refs' token lists). end: <end> is a word of a caption that ended (the
    references must then end with it too: train.py builds `cider` so), so that n-grams ending a caption count
    and a fragment that stops early ("a man with a") is not rewarded; BLEU is scored without it."""
    out = []
    for row, ids in enumerate(words.tolist()):
        ended = vocab.end in ids
        ids = ids[: ids.index(vocab.end)] if ended else ids
        tokens, image = [vocab.itos[i] for i in ids], images[row // k]
        r = cider.score(tokens + [vocab.itos[vocab.end]] if end and ended else tokens, image)
        if bleu_weight:
            refs = [ref[:-1] if end and ref and ref[-1] == vocab.itos[vocab.end] else ref for ref in cider.tokens[image]]
            r += bleu_weight * coco_bleu([tokens], [refs])[3]
        out.append(r)
    return torch.tensor(out).view(-1, k)


def scst_epoch(decoder: Decoder, loader: DataLoader, optim: torch.optim.Optimizer, cider: CiderD, vocab: Vocab,
               k: int, max_len: int, grad_clip: float, device: torch.device, desc: str, show: bool,
               generator: torch.Generator, ema: AveragedModel | None = None, bleu_weight: float = 0.0,
               dropout: bool = False, end: bool = True, tuned: Sequence[nn.Parameter] = (),
               head: Callable | None = None) -> float:
    """One pass over the training images; returns the mean reward of the samples. dropout: sample with dropout on
    (off by default: the samples are then the captions the model writes, not a noisier model's); end: see
    rewards; tuned and head: fine-tuned encoder stages, which turn the cached trunk activations into features
    and train with the decoder."""
    from tqdm import tqdm

    decoder.train(dropout)  # eval mode switches dropout off; the gradients flow all the same
    total, count = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show)
    for feats, images in bar:
        feats = feats.to(device).float()
        feats = head(feats) if head is not None else feats
        words, logp, mask = sample(decoder, feats, k, max_len, vocab, generator)
        r = rewards(words, images.tolist(), k, vocab, cider, bleu_weight, end)
        baseline = (r.sum(1, keepdim=True) - r) / (k - 1)  # the mean of the other samples of the same image
        advantage = (r - baseline).view(-1, 1).to(device)
        loss = -(advantage * logp * mask).sum() / mask.sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([*decoder.parameters(), *tuned], grad_clip)
        optim.step()
        if ema is not None:
            ema.update_parameters(decoder)
        total, count = total + float(r.sum()), count + r.numel()
        bar.set_postfix(reward=f"{total / count:.3f}")
    return total / max(count, 1)
