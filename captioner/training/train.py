"""Training: teacher forcing on cached encoder features, early stopping on validation BLEU-4
from real (beam) decoding, atomic resumable checkpoints, optional DDP via torchrun.

    captioner train --data ../shared/data/ucm-captions --out runs/ucm
    torchrun --nproc_per_node=2 -m captioner train --data ... --out ...
    captioner train --data ... --init runs/ucm/best.pt --scst true --lr 5e-5 --out runs/ucm-scst  (scst.py)
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import (
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Subset,
)

from ..errors import CaptionerError, UsageProblem
from ..model.checkpoint import build_decoder, load_checkpoint, save_checkpoint
from ..model.decoder import PENALTIES, Decoder, DecoderConfig, attention_penalty
from ..model.encoder import Encoder, EncoderConfig, augment_transform
from ..model.search import SearchConfig, search
from ..model.vocab import END, Vocab, tokenize
from ..runtime.workers import WORKER_TIMEOUT, warn_if_more_than_cpus
from ..runtime.workers import context as worker_context
from ..runtime.workers import quiet_handover
from .data import (
    CaptionPairs,
    ImageViews,
    Item,
    TextPairs,
    cache_features,
    collate,
    load_dataset,
    load_text_only,
)
from .metrics import CiderD, attention_stats, score_captions
from .scst import scst_epoch

log = logging.getLogger("captioner")


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # dataset specs, see data.load_dataset
    out: str = "runs/model"  # output folder: best.pt, last.pt, log.jsonl
    encoder: str = "efficientnet_lite0"  # efficientnet_lite0/1/2 (offline) or a torchvision backbone
    pretrained: bool = True  # ImageNet weights for the encoder
    grid: int = 7  # annotation grid: 7 (7x7 from the last stage) or 14 (stride-16 stage)
    resize: str = "crop"  # how images become the square input, in training and in every later use of the model: crop (short side, centre crop) or squash (whole image, aspect ignored)
    finetune: int = 0  # fine-tune the encoder's last N stages on cached trunk activations (0: frozen)
    finetune_lr: float = 0.1  # encoder LR = lr * finetune_lr
    views: int = 1  # cached feature sets per training image: centre crop, mirror, random crops
    text_ratio: float = 0.0  # per epoch, add this many text-only captions (training entries whose image is missing) per image caption
    min_count: int = 2  # words seen fewer times in the training captions become <unk>
    max_len: int = 20  # longest caption in words (longer ones are cut)
    feat_proj: int = 512  # project annotation vectors to this size (0: keep the encoder's)
    embed_dim: int = 256  # word embedding size
    hidden_dim: int = 512  # LSTM/GRU state size
    attn_dim: int = 256  # attention MLP size
    dropout: float = 0.5  # dropout on embeddings, features, states and the output layer
    cell: str = "lstm"  # lstm or gru
    tie_weights: bool = True  # share the word embedding with the output layer
    attributes: bool = False  # condition on ImageNet class probabilities (needs a classifier head, grid 7)
    init_state: str = "image"  # the LSTM's first state: from the mean annotation vector (image) or learned constants (learned: the image reaches the decoder through attention only)
    epochs: int = 30  # at most this many epochs
    batch_size: int = 64  # captions per batch (per process under torchrun)
    per_image: bool = True  # batches of whole images with all their captions (each image projected once), not of single captions
    ram_gb: float = 1.0  # copy the cached training views into RAM if they total at most this many GB, else stream them from the cache files, read ahead (same batches either way; streaming ran at 90-100% of the RAM copy's speed in bench/train_scale.py, and the copy adds its size to the RSS)
    lr: float = 4e-4  # Adam learning rate
    weight_decay: float = 0.0  # Adam weight decay
    alpha_c: float = 1.0  # doubly stochastic attention regularisation (lambda)
    penalty: str = "mean"  # its form: mean (lambda x mean over the L cells of (T/L - sum_t alpha_ti)^2, T the caption's words) or sum (lambda x sum_i (1 - sum_t alpha_ti)^2, the form of the models trained before it: L x mean plus a constant, so its lambda weighs L times as much)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    grad_clip: float = 5.0  # clip the gradient norm to this
    ema: float = 0.0  # validate and save an exponential moving average of the weights with this decay per step (0: off)
    ema_warmup: bool = False  # EMA decay min(ema, (1+n)/(10+n)) at update n, so the average forgets the first steps' weights
    lr_factor: float = 0.5  # LR decay on a validation BLEU-4 plateau
    lr_patience: int = 1  # epochs without a better validation BLEU-4 that are tolerated: the LR decays on the next one (torch ReduceLROnPlateau)
    patience: int = 4  # early stopping: epochs without a better validation BLEU-4
    beam: int = 3  # validation decoding
    length_penalty: float = 0.0  # validation decoding: beam scores divided by length**this
    seed: int = 0  # same seed, same data and settings: same weights
    device: str = "cpu"  # cpu, cuda, cuda:1 (AMP on CUDA)
    cache_dir: str = "cache"  # where encoder features are cached
    num_workers: int = 2  # image-loading processes while caching features
    threads: int = 0  # torch threads (0: torch's default, one per core); a run is bit-reproducible at the same count
    time_limit_min: float = 0.0  # stop after this many minutes (0: no limit)
    init: str = ""  # start from this checkpoint: its weights, vocabulary, encoder and decoder settings (the flags for those are not used)
    scst: bool = False  # self-critical training on sampled captions with a CIDEr-D reward (Rennie et al. 2017), after --init from a teacher-forced model
    scst_samples: int = 5  # captions sampled per image under --scst; a batch is batch-size // this images
    scst_bleu: float = 0.0  # under --scst the reward is CIDEr-D + this x sentence BLEU-4
    scst_dropout: bool = False  # under --scst, sample with dropout on (off: the captions the model would write)
    scst_end: bool = True  # under --scst, <end> counts as a word of every caption and reference in the reward (Rennie et al.: a fragment that stops early is not rewarded)
    select: str = "bleu4"  # the validation figure that picks best.pt, decays the LR and stops early: bleu4 or cider (CIDEr-D; what --scst optimises)

    def to_dict(self) -> dict:
        return asdict(self)


def _dist() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def gather_items(specs: Sequence[str]) -> list[Item]:
    if not specs:
        raise CaptionerError("no training data: pass --data PATH (or kind:PATH) at least once")
    items = [it for spec in specs for it in load_dataset(spec)]
    for split in ("train", "val"):
        if not any(it.split == split for it in items):
            raise CaptionerError(f"the data has no {split!r} images")
    return items


def split_features(items: list[Item], split: str, encoder: Encoder, cfg: TrainConfig, views: int = 1) -> list[np.ndarray]:
    """The split's cached views (encoded first where missing; under torchrun each rank encodes a shard)."""
    paths = [it.image for it in items if it.split == split]
    rank, world = _dist()
    return [cache_features(paths, encoder, augment_transform(cfg.encoder, v, cfg.resize),
                           Path(cfg.cache_dir), view=v, num_workers=cfg.num_workers, device=cfg.device,
                           rank=rank, world=world)
            for v in range(views)]


def caching_encoder(cfg: TrainConfig) -> Encoder:
    """The encoder that fills the training caches: BatchNorm folded and fp32 on every CPU (3x faster caching than
    the unfolded network, and the same features whatever the ISA); fine-tuning caches the unfolded trunk."""
    encoder = Encoder(EncoderConfig(cfg.encoder, cfg.pretrained, cfg.grid, cfg.finetune, cfg.resize))
    if not cfg.finetune:
        encoder.prepare_inference(torch.device(cfg.device), bf16=False)
    return encoder


def cache_all(cfg: TrainConfig) -> dict[str, list[np.ndarray]]:
    """Every cache train() and evaluate read: cfg.views views of the training split, one of val and test."""
    items, encoder = gather_items(cfg.data), caching_encoder(cfg)
    warn_if_more_than_cpus(cfg.num_workers)
    out = {"train": split_features(items, "train", encoder, cfg, cfg.views), "val": split_features(items, "val", encoder, cfg)}
    if any(it.split == "test" for it in items):
        out["test"] = split_features(items, "test", encoder, cfg)
    return out


@torch.no_grad()
def decode_features(decoder: Decoder, vocab: Vocab, feats: np.ndarray | torch.Tensor, scfg: SearchConfig,
                    device: torch.device, batch_size: int = 100, head: Callable | None = None,
                    maps: list | None = None) -> list[str]:
    """The best caption per image; `maps`, when given, gets each one's attention (words, L)."""
    decoder.eval()
    specials = (vocab.pad, vocab.start, vocab.end, vocab.unk)
    out = []
    for i in range(0, len(feats), batch_size):
        chunk = torch.from_numpy(np.array(feats[i:i + batch_size])).float().to(device)
        chunk = head(chunk) if head is not None else chunk
        hyps = search(decoder, chunk, scfg, specials)
        out += [vocab.decode(h[0].tokens) for h in hyps]
        if maps is not None:
            maps += [h[0].attention for h in hyps]
    return out


def _classifier_size(encoder: Encoder, cfg: TrainConfig) -> int:
    if not cfg.attributes:
        return 0
    head = getattr(encoder.net, "classifier", None)
    if not isinstance(head, nn.Linear) or cfg.grid != 7:
        raise CaptionerError("--attributes needs an EfficientNet-Lite encoder with grid 7")
    return head.out_features


STREAM_PREFETCH = 8  # batches read ahead when the training views are streamed from their cache files


def epoch_loader(dataset: CaptionPairs, text_pairs: TextPairs, n_text: int, cfg: TrainConfig, epoch: int,
                 pad: int, rank: int = 0, world: int = 1) -> DataLoader:
    """The batches of one epoch: the image-caption pairs plus a fresh draw of n_text text-only captions,
    shuffled by a seed of (cfg.seed, epoch) and, under torchrun, sharded by rank. Dropout and the view
    draws are seeded the same way, so a resumed epoch replays exactly."""
    epoch_data: Dataset = dataset
    if n_text:  # the same draw on every rank
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + 1)
        chosen = torch.randperm(len(text_pairs), generator=g)[:n_text].tolist()
        epoch_data = ConcatDataset([dataset, Subset(text_pairs, chosen)])
    if world > 1:
        sampler: Any = DistributedSampler(epoch_data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(epoch_data, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    torch.manual_seed(cfg.seed * 1000 + epoch + 7919 * rank)  # dropout
    dataset.gen.manual_seed(cfg.seed * 1000 + epoch + 7919 * rank)  # which cached view each pair uses
    per_batch = max(1, round(cfg.batch_size * len(dataset) / len(dataset.pairs)))  # items holding ~batch_size captions
    # streamed views: one worker reads the next batches from disk while this process trains on the current one
    # (one worker draws the views in the same order, so the batches are the ones the RAM copy gives)
    workers = 1 if dataset.streamed else 0
    return DataLoader(epoch_data, batch_size=per_batch, sampler=sampler, collate_fn=partial(collate, pad=pad),
                      num_workers=workers, prefetch_factor=STREAM_PREFETCH if workers else None,
                      multiprocessing_context=worker_context() if workers else None, worker_init_fn=quiet_handover,
                      timeout=WORKER_TIMEOUT if workers else 0)


def image_loader(images: ImageViews, cfg: TrainConfig, epoch: int) -> DataLoader:
    """The batches of one self-critical epoch: every training image once, batch-size // scst-samples images a
    batch, shuffled and view-drawn by a seed of (cfg.seed, epoch) as epoch_loader does."""
    sampler = RandomSampler(images, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    torch.manual_seed(cfg.seed * 1000 + epoch)  # dropout
    images.pairs.gen.manual_seed(cfg.seed * 1000 + epoch)
    return DataLoader(images, batch_size=max(1, cfg.batch_size // cfg.scst_samples), sampler=sampler)


def _from_init(cfg: TrainConfig, init: dict[str, Any]) -> TrainConfig:
    """cfg with the encoder settings of the --init checkpoint (its decoder and vocabulary are used as they are).
    From a fine-tuned checkpoint the same stages go on training, on the same cached trunk activations; from a
    frozen one, --finetune starts fine-tuning from the package's weights."""
    try:
        enc = init["config"]["encoder"]
        name, pretrained, grid, resize = enc["name"], enc["pretrained"], enc["grid"], enc.get("resize", "crop")
        tuned = int(enc.get("finetune", 0)) if "encoder" in init else 0
    except (KeyError, TypeError, ValueError):
        raise CaptionerError(f"--init {cfg.init}: not a valid captioner checkpoint (no encoder config)") from None
    if "encoder" in init and not tuned:
        raise CaptionerError(f"--init {cfg.init}: fine-tuned encoder weights but no stage count in its config")
    if tuned and cfg.finetune not in (0, tuned):
        raise CaptionerError(f"--init {cfg.init} has {tuned} fine-tuned encoder stages, not --finetune {cfg.finetune} "
                             "(leave --finetune out to go on with the checkpoint's)")
    return replace(cfg, encoder=name, pretrained=pretrained, grid=grid, finetune=tuned or cfg.finetune, resize=resize)


def _new_decoder(cfg: TrainConfig, vocab_size: int, encoder: Encoder, init: dict[str, Any] | None) -> Decoder:
    """The --init checkpoint's decoder, or a fresh one from cfg (with the encoder's classifier for attributes)."""
    if init is not None:
        decoder, _ = build_decoder(init)
        if decoder.cfg.feat_dim != encoder.dim:
            raise CaptionerError(f"--init {cfg.init}: its decoder expects {decoder.cfg.feat_dim}-d features, "
                                 f"not {encoder.dim}")
        return decoder
    dcfg = DecoderConfig(vocab_size, encoder.dim, cfg.feat_proj, cfg.embed_dim, cfg.hidden_dim, cfg.attn_dim,
                         cfg.dropout, cfg.cell, cfg.tie_weights, attributes=_classifier_size(encoder, cfg),
                         init_state=cfg.init_state)
    decoder = Decoder(dcfg)
    if dcfg.attributes:
        decoder.classifier.load_state_dict(encoder.net.classifier.state_dict())
    return decoder


def ema_warmup_fn(decay: float) -> Callable:
    """AveragedModel's multi_avg_fn for an EMA whose decay at update n is min(decay, (1+n)/(10+n))."""
    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1 - d)
        else:
            for e, p in zip(ema_params, params):
                e.copy_(e * d + p * (1 - d))
    return update


def train_epoch(model: nn.Module, decoder: Decoder, loader: DataLoader, optim: torch.optim.Optimizer,
                criterion: nn.Module, cfg: TrainConfig, pad: int, device: torch.device, desc: str, show: bool,
                tuned: Sequence[nn.Parameter] = (), head: Callable | None = None,
                ema: AveragedModel | None = None) -> float:
    """One pass of teacher forcing with the doubly stochastic attention penalty; returns the mean loss.
    `model` is the decoder or its DDP wrapper; with `tuned` (fine-tuned encoder weights) the cached trunk
    activations go through `head` first."""
    from tqdm import tqdm

    model.train()
    total, steps = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not show)
    for feats, caps, index in bar:
        feats, caps, index = feats.to(device), caps.to(device), index.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if head is not None:
                feats = head(feats)
            logits, alphas = model(feats, caps, index, pad)
        target = caps[:, 1:]
        loss = criterion(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        loss = loss + cfg.alpha_c * attention_penalty(alphas.float(), (target != pad).float(), cfg.penalty)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([*decoder.parameters(), *tuned], cfg.grad_clip)
        optim.step()
        if ema is not None:
            ema.update_parameters(decoder)
        total, steps = total + loss.item(), steps + 1
        bar.set_postfix(loss=f"{total / steps:.3f}")
    return total / max(steps, 1)


def _check(cfg: TrainConfig, distributed: bool) -> None:
    """Settings that do not go together: one CaptionerError before anything is read."""
    if cfg.scst and (distributed or cfg.text_ratio):
        raise CaptionerError("--scst does not go with torchrun or --text-ratio yet")
    if cfg.penalty not in PENALTIES:
        raise CaptionerError(f"--penalty must be one of {', '.join(PENALTIES)}, not {cfg.penalty!r}")
    if cfg.scst and cfg.scst_samples < 2:
        raise CaptionerError("--scst-samples must be at least 2 (each sample's baseline is the mean of the others)")
    if cfg.finetune and distributed:
        raise CaptionerError("--finetune is not supported under torchrun yet (encoder gradients are not synchronised)")


@dataclass
class Run:
    """Everything one training run holds between epochs (built by `_set_up`)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    vocab: Vocab
    encoder: Encoder
    decoder: Decoder
    model: nn.Module  # the decoder, or its DDP wrapper
    optim: torch.optim.Optimizer
    sched: Any
    ema: AveragedModel | None
    tuned: list  # encoder parameters being fine-tuned (empty: frozen)
    head: Any  # the encoder's tuned head that turns cached trunk activations into features, or None
    dataset: CaptionPairs
    images: ImageViews
    sampling: torch.Generator
    text_pairs: TextPairs
    n_text: int
    criterion: nn.Module
    cider: CiderD | None
    scfg: SearchConfig
    val_feats: np.ndarray
    val_items: list[Item]
    config: dict[str, Any]
    ts: dict[str, Any]  # epoch, best, best_epoch, bad_epochs, elapsed: what resumes


# what --resume may change: how long and where it runs, not what it trains (a longer run: --epochs, --patience)
RESUMABLE_CHANGES = frozenset({"out", "init", "epochs", "patience", "lr_patience", "time_limit_min", "threads",
                               "device", "cache_dir", "num_workers", "ram_gb"})


def _check_same_recipe(cfg: TrainConfig, saved: dict[str, Any], last_path: Path) -> None:
    """--resume goes on with the run's own recipe: a flag that differs from the one it was started with would give a
    model of neither recipe, so it is one error (exit 2) naming the differences. Settings the run predates pass."""
    now = cfg.to_dict()
    diffs = [f"--{k.replace('_', '-')} {saved[k]} there, {now[k]} now" for k in now
             if k in saved and k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if diffs:
        raise UsageProblem(f"--resume: {last_path} was trained with other settings ({'; '.join(diffs[:4])}"
                           f"{'; ...' if len(diffs) > 4 else ''}): give its flags again, or a new --out")


def _vocab_and_state(cfg: TrainConfig, init: dict[str, Any] | None, items: list[Item], texts: list[str],
                     last_path: Path, resume: bool) -> tuple[Vocab, dict[str, Any] | None]:
    """The vocabulary (from the run being resumed, the --init model, or the training captions) and, when
    resuming, the last checkpoint."""
    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        _check_same_recipe(cfg, state["config"].get("train", {}), last_path)
        log.info("resuming from %s (epoch %d done)", last_path, state["train_state"]["epoch"])
        return Vocab.from_dict({"itos": state["vocab"]}), state
    if init is not None:
        return Vocab.from_dict({"itos": init["vocab"]}), None
    return Vocab.build([*(c for it in items if it.split == "train" for c in it.captions), *texts], cfg.min_count), None


def _finished(cfg: TrainConfig, state: dict[str, Any] | None) -> bool:
    done = state["train_state"] if state is not None else None
    return done is not None and (done["epoch"] >= cfg.epochs or done["bad_epochs"] >= cfg.patience)


def _set_up(cfg: TrainConfig, vocab: Vocab, items: list[Item], texts: list[str], init: dict[str, Any] | None,
            state: dict[str, Any] | None, device: torch.device, distributed: bool) -> Run:
    """Features cached and opened, the decoder, optimiser, scheduler and EMA built (or restored from `state`)."""
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    encoder = caching_encoder(cfg)
    if init is not None and "encoder" in init:  # the fine-tuned stages start where the --init run left them
        encoder.load_tuned(init["encoder"], f"--init {cfg.init}")
    train_views = split_features(items, "train", encoder, cfg, cfg.views)  # under torchrun: a shard per rank
    val_feats = split_features(items, "val", encoder, cfg)[0]
    val_items = [it for it in items if it.split == "val"]
    train_caps = [[vocab.encode(c, cfg.max_len) for c in it.captions] for it in items if it.split == "train"]

    decoder = _new_decoder(cfg, len(vocab), encoder, init).to(device)
    optim = torch.optim.Adam(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    encoder.to(device)
    tuned = [p for m in encoder.finetune_modules() for p in m.parameters()]
    if tuned:  # BN statistics stay frozen (eval mode); only weights move, at a smaller LR
        for p in tuned:
            p.requires_grad_(True)
        optim.add_param_group({"params": tuned, "lr": cfg.lr * cfg.finetune_lr})
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optim, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience)
    ts = {"epoch": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0, "elapsed": 0.0}
    if state is not None:
        decoder.load_state_dict(state["train_state"].get("raw", state["decoder"]))  # raw weights when EMA is on
        if "encoder" in state:
            encoder.load_tuned(state["encoder"], str(Path(cfg.out) / "last.pt"))
        optim.load_state_dict(state["train_state"]["optimizer"])
        sched.load_state_dict(state["train_state"]["scheduler"])
        ts = {k: state["train_state"][k] for k in ts}
    # Polyak/EMA weights (torch.optim.swa_utils): smoother than the raw weights of any one step
    avg_fn = ema_warmup_fn(cfg.ema) if cfg.ema_warmup else get_ema_multi_avg_fn(cfg.ema)
    ema = AveragedModel(decoder, multi_avg_fn=avg_fn, use_buffers=True) if cfg.ema else None
    if ema is not None and state is not None and "ema" in state["train_state"]:
        ema.load_state_dict(state["train_state"]["ema"])
    model: nn.Module = decoder
    if distributed:
        model = nn.parallel.DistributedDataParallel(decoder, device_ids=[device.index] if device.type == "cuda" else None)

    view_gb = sum(v.nbytes for v in train_views) / 2**30
    log.info("training views: %.1f GB, %s", view_gb, "in RAM" if view_gb <= cfg.ram_gb else "read from the cache files")
    dataset = CaptionPairs(train_views, train_caps, seed=cfg.seed, per_image=cfg.per_image, in_ram=view_gb <= cfg.ram_gb)
    end = [END] if cfg.scst_end else []  # the reward's references end with <end> too (scst.rewards)
    cider = CiderD([[tokenize(c) + end for c in it.captions] for it in items if it.split == "train"]) if cfg.scst else None
    images, sampling = ImageViews(dataset), torch.Generator(device=device)
    text_pairs = TextPairs([vocab.encode(t, cfg.max_len) for t in texts], tuple(train_views[0].shape[1:]))
    n_text = min(len(text_pairs), round(cfg.text_ratio * len(dataset.pairs)))
    criterion = nn.CrossEntropyLoss(ignore_index=vocab.pad, label_smoothing=cfg.label_smoothing)
    scfg = SearchConfig(beam=cfg.beam, max_len=cfg.max_len, length_penalty=cfg.length_penalty)
    config = {"encoder": encoder.config.to_dict(), "decoder": decoder.cfg.to_dict(), "train": cfg.to_dict(),
              "search": asdict(scfg), "data": {"train_images": len(train_caps), "val_images": len(val_items),
                                                    "text_only_captions": len(texts)}}
    return Run(cfg, Path(cfg.out), device, rank, world, vocab, encoder, decoder, model, optim, sched, ema, tuned,
               encoder.head if tuned else None, dataset, images, sampling, text_pairs, n_text, criterion, cider,
               scfg, val_feats, val_items, config, ts)


def _train_one_epoch(run: Run, epoch: int) -> float | None:
    """One epoch of teacher forcing, or of self-critical training under --scst; epoch 0 (after --init) trains
    nothing. Returns the mean loss (or reward)."""
    cfg = run.cfg
    if epoch == 0:
        return None
    if run.cider is not None:
        loader = image_loader(run.images, cfg, epoch)
        run.sampling.manual_seed(cfg.seed * 1000 + epoch)
        return scst_epoch(run.decoder, loader, run.optim, run.cider, run.vocab, cfg.scst_samples, cfg.max_len,
                          cfg.grad_clip, run.device, f"epoch {epoch} (scst)", run.rank == 0, run.sampling, run.ema,
                          bleu_weight=cfg.scst_bleu, dropout=cfg.scst_dropout, end=cfg.scst_end, tuned=run.tuned,
                          head=run.head)
    loader = epoch_loader(run.dataset, run.text_pairs, run.n_text, cfg, epoch, run.vocab.pad, run.rank, run.world)
    return train_epoch(run.model, run.decoder, loader, run.optim, run.criterion, cfg, run.vocab.pad, run.device,
                       f"epoch {epoch}", run.rank == 0, run.tuned, run.head, run.ema)


SELECT = {"bleu4": "BLEU-4", "cider": "CIDEr-D"}  # --select: the metric's name in score_captions


def _validate(run: Run, distributed: bool) -> tuple[float, dict[str, float]]:
    """Validation by real beam decoding of the weights that would be saved (the EMA's when on), on rank 0;
    the --select figure (what selects the best epoch) is shared with every rank."""
    score, metrics = torch.zeros(1), {}
    if run.rank == 0:
        maps: list = []
        hyps = decode_features(_final(run), run.vocab, run.val_feats, run.scfg, run.device, head=run.head, maps=maps)
        metrics = score_captions(hyps, [it.captions for it in run.val_items]) | attention_stats(maps)
        score[0] = metrics[SELECT[run.cfg.select]]
    if distributed:
        dist.broadcast(score, 0)
    return float(score[0]), metrics


def _final(run: Run) -> nn.Module:
    return run.ema.module if run.ema is not None else run.decoder  # the weights that are validated and saved


def _select(run: Run, epoch: int, score: float, started: float) -> bool:
    """LR schedule and model selection on the validation figure of --select: whether this epoch is the best so far."""
    run.sched.step(score)
    improved = score > run.ts["best"]
    run.ts.update(epoch=epoch, elapsed=time.time() - started)
    if improved:
        run.ts.update(best=score, best_epoch=epoch, bad_epochs=0)
    else:
        run.ts["bad_epochs"] += 1
    return improved


def _save(run: Run, epoch: int, loss: float | None, metrics: dict[str, float], improved: bool,
          timing: dict[str, float]) -> None:
    """Rank 0: the epoch's line in log.jsonl, best.pt when it improved, and last.pt (what --resume reads)."""
    figure = "reward" if run.cider is not None else "loss"  # self-critical epochs report their mean reward
    record = {"epoch": epoch, figure: loss, "lr": run.optim.param_groups[0]["lr"],
              "elapsed_s": round(run.ts["elapsed"], 1), **timing,
              **{f"val_{k}": round(v, 4) for k, v in metrics.items()}}
    log.info("epoch %d %s %s val BLEU-4 %.4f CIDEr-D %s attention peak %.3f lr %.1e%s", epoch, figure,
             "-" if loss is None else f"{loss:.3f}", metrics["BLEU-4"], f"{metrics.get('CIDEr-D', float('nan')):.3f}",
             metrics["attention_peak"], record["lr"], " *" if improved else "")
    run.out.mkdir(parents=True, exist_ok=True)
    with (run.out / "log.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    weights = {"vocab": run.vocab.itos, "decoder": {k: v.detach().cpu() for k, v in _final(run).state_dict().items()}}
    if run.tuned:
        weights["encoder"] = run.encoder.finetune_state()
    if improved:
        save_checkpoint(run.out / "best.pt", {"config": {**run.config, "val": record}, **weights})
    extra = {"ema": run.ema.state_dict(), "raw": run.decoder.state_dict()} if run.ema is not None else {}
    save_checkpoint(run.out / "last.pt", {"config": run.config, **weights, "train_state": {
        **run.ts, "optimizer": run.optim.state_dict(), "scheduler": run.sched.state_dict(), **extra}})


def _stop(run: Run, epoch: int) -> bool:
    """Early stopping (no better validation figure of --select for --patience epochs) and --time-limit-min."""
    cfg, ts = run.cfg, run.ts
    if ts["bad_epochs"] >= cfg.patience:
        log.info("early stop: no better validation %s for %d epochs (best %.4f at epoch %d)",
                 SELECT[cfg.select], cfg.patience, ts["best"], ts["best_epoch"])
        return True
    if cfg.time_limit_min and ts["elapsed"] > cfg.time_limit_min * 60:
        log.info("time limit reached after epoch %d", epoch)
        return True
    return False


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train and return the path of the best checkpoint (by validation BLEU-4): set-up, then per epoch train,
    validate, select, save, until the last epoch, early stopping or the time limit."""
    called = time.time()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    device = torch.device(cfg.device if not cfg.device.startswith("cuda") or not distributed
                          else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    best_path = Path(cfg.out) / "best.pt"
    set_seed(cfg.seed)
    _check(cfg, distributed)
    init = load_checkpoint(cfg.init) if cfg.init else None
    if init is not None:
        cfg = _from_init(cfg, init)
    items = gather_items(cfg.data)
    texts = [t for spec in cfg.data for t in load_text_only(spec)] if cfg.text_ratio else []
    vocab, state = _vocab_and_state(cfg, init, items, texts, Path(cfg.out) / "last.pt", resume)
    if _finished(cfg, state):  # `make model` reruns a finished run: nothing to redo
        done = state["train_state"]
        log.info("%s already finished (best validation %s %.4f at epoch %d)", cfg.out, SELECT[cfg.select], done["best"],
                 done["best_epoch"])
        if distributed:
            dist.destroy_process_group()
        return best_path

    run = _set_up(cfg, vocab, items, texts, init, state, device, distributed)
    started = time.time() - run.ts["elapsed"]
    # from --init, "epoch 0" validates the starting weights first: best.pt only changes if training beats them
    first = 0 if init is not None and state is None else run.ts["epoch"] + 1
    for epoch in range(first, cfg.epochs + 1):
        epoch_start = time.time()
        startup = {"startup_s": round(epoch_start - called, 1)} if epoch == first else {}  # caches opened/copied
        loss = _train_one_epoch(run, epoch)
        train_s = time.time() - epoch_start
        score, metrics = _validate(run, distributed)
        improved = _select(run, epoch, score, started)
        if run.rank == 0:
            _save(run, epoch, loss, metrics, improved, {"train_s": round(train_s, 1), **startup})
        if _stop(run, epoch):
            break
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return best_path


def export(src: Path, dst: Path, half: bool = True, search_overrides: dict | None = None) -> Path:
    """Strip training state; store weights in fp16 (half the size, same captions to ~1e-3)."""
    ckpt = load_checkpoint(src)
    build_decoder(ckpt)  # validates
    halve = lambda sd: {k: (v.half() if half and v.is_floating_point() else v) for k, v in sd.items()}  # noqa: E731
    config = dict(ckpt["config"])
    if search_overrides:
        config["search"] = {**config.get("search", {}), **search_overrides}
    extra = {"encoder": halve(ckpt["encoder"])} if "encoder" in ckpt else {}
    save_checkpoint(dst, {"config": config, "vocab": ckpt["vocab"], "decoder": halve(ckpt["decoder"]), **extra})
    return dst


def config_from_args(args: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in args.items() if k in known and v is not None})


