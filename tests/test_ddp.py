"""Data-parallel training (torchrun / DDP over gloo on this CPU): two processes with half a batch each produce the
gradient one process computes on the whole batch, and every epoch gives each rank a disjoint shard."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from captioner.training.data import CaptionPairs, TextPairs
from captioner.model.decoder import Decoder, DecoderConfig, attention_penalty
from captioner.training.train import TrainConfig, epoch_loader

CFG = DecoderConfig(40, 24, feat_proj=16, embed_dim=16, hidden_dim=32, attn_dim=16, dropout=0.0)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 10, 24, generator=g)
    caps = torch.randint(4, 40, (16, 9), generator=g)  # 2 captions per image, all of one length
    caps[:, 0], caps[:, -1] = 1, 2
    return feats, caps, torch.arange(8).repeat_interleave(2)


def _loss(model: nn.Module, feats, caps, index) -> torch.Tensor:
    logits, alphas = model(feats, caps, index)
    ce = nn.functional.cross_entropy(logits.reshape(-1, 40), caps[:, 1:].reshape(-1), ignore_index=0)
    return ce + 0.1 * attention_penalty(alphas, (caps[:, 1:] != 0).float())


def _grads(decoder: Decoder) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in decoder.named_parameters() if p.grad is not None}


def _rank(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    decoder = Decoder(CFG)
    model = nn.parallel.DistributedDataParallel(decoder)
    feats, caps, index = _batch()
    half = slice(rank * 8, rank * 8 + 8)  # captions of images 4*rank .. 4*rank+3
    _loss(model, feats[rank * 4:rank * 4 + 4], caps[half], index[half] - rank * 4).backward()
    out[rank] = _grads(decoder)
    dist.destroy_process_group()


def test_two_processes_average_the_gradient_of_the_whole_batch():
    torch.manual_seed(0)
    single = Decoder(CFG)
    _loss(single, *_batch()).backward()
    expected = _grads(single)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, port, out), nprocs=2, join=True)
    for rank in (0, 1):
        got = out[rank]
        assert got.keys() == expected.keys()
        for k in expected:  # all-reduced: the same on both ranks, and the whole batch's up to float rounding
            assert torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-6), k
        assert all(torch.equal(got[k], out[0][k]) for k in got)


def test_every_epoch_gives_each_rank_a_disjoint_shard():
    feats = [torch.zeros(12, 2, 3, dtype=torch.float16).numpy()]
    pairs = CaptionPairs(feats, [[[1, 5, 2]]] * 12, per_image=True)
    text = TextPairs([], (2, 3))
    cfg = TrainConfig(batch_size=1, seed=3)
    for epoch in (1, 2):
        seen = [list(epoch_loader(pairs, text, 0, cfg, epoch, 0, rank, 2).sampler) for rank in (0, 1)]
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))
    assert seen != [list(epoch_loader(pairs, text, 0, cfg, 1, 0, r, 2).sampler) for r in (0, 1)]  # reshuffled
