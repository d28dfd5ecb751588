"""Soft-attention LSTM decoder of "Show, Attend and Tell" (Xu et al. 2015, sec. 3.1).

Per step t, with annotation vectors a_1..a_L and previous word y_{t-1}:
  e_ti  = w^T tanh(W_a a_i + W_h h_{t-1})          (MLP attention)
  alpha = softmax(e_t);   z_t = beta_t * sum_i alpha_ti a_i,  beta_t = sigmoid(f_beta(h_{t-1}))
  h_t, c_t = LSTM([E y_{t-1}; z_t], (h_{t-1}, c_{t-1}))
  p(y_t) = softmax(L_o(E y_{t-1} + L_h h_t + L_z z_t))  (deep output layer)
h_0, c_0 come from the mean annotation vector (or are learned constants: init_state). The doubly stochastic regulariser
lambda * sum_i (1 - sum_t alpha_ti)^2, or its per-cell form, is computed by `attention_penalty`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]  # (h, c); for a GRU c is unused (zeros)


INIT_STATES = ("image", "learned")


@dataclass
class DecoderConfig:
    vocab_size: int
    feat_dim: int
    feat_proj: int = 512  # project annotation vectors to this size first (0: keep feat_dim)
    embed_dim: int = 256
    hidden_dim: int = 512
    attn_dim: int = 256
    dropout: float = 0.5
    cell: str = "lstm"  # lstm | gru
    tie_weights: bool = True  # share the word embedding with the output layer L_o
    attributes: int = 0  # >0: condition h0/c0 on the encoder's ImageNet class probabilities (Yao et al. 2017)
    init_state: str = "image"  # h0/c0 from the mean annotation (image) or learned constants (learned): then the image reaches the LSTM only through attention

    def to_dict(self) -> dict:
        return asdict(self)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', not {cfg.cell!r}")
        if cfg.init_state not in INIT_STATES:
            raise ValueError(f"init_state must be one of {INIT_STATES}, not {cfg.init_state!r}")
        self.cfg = cfg
        d = cfg.feat_proj or cfg.feat_dim
        self.proj = nn.Sequential(nn.Linear(cfg.feat_dim, d), nn.ReLU(), nn.Dropout(cfg.dropout)) if cfg.feat_proj else nn.Identity()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.att_feat = nn.Linear(d, cfg.attn_dim)
        self.att_hid = nn.Linear(cfg.hidden_dim, cfg.attn_dim)
        self.att_out = nn.Linear(cfg.attn_dim, 1)
        self.f_beta = nn.Linear(cfg.hidden_dim, d)
        self.init_h = nn.Linear(d, cfg.hidden_dim)
        self.init_c = nn.Linear(d, cfg.hidden_dim)
        cell = nn.LSTMCell if cfg.cell == "lstm" else nn.GRUCell
        self.rnn = cell(cfg.embed_dim + d, cfg.hidden_dim)
        self.L_h = nn.Linear(cfg.hidden_dim, cfg.embed_dim)
        self.L_z = nn.Linear(d, cfg.embed_dim)
        self.L_o = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        if cfg.tie_weights:
            self.L_o.weight = self.embed.weight
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if cfg.attributes:  # frozen copy of the encoder's classifier: pooled features -> class logits
            self.classifier = nn.Linear(cfg.feat_dim, cfg.attributes).requires_grad_(False)
            self.attr_h = nn.Linear(cfg.attributes, cfg.hidden_dim)
            self.attr_c = nn.Linear(cfg.attributes, cfg.hidden_dim)

    # -- pieces shared by teacher forcing and search ---------------------------------
    def prepare(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, State]:
        """feats (B, L, feat_dim) -> projected annotations, their attention keys, (h0, c0)."""
        a = self.proj(feats)
        keys = self.att_feat(a)
        mean = a.mean(1) if self.cfg.init_state == "image" else torch.zeros_like(a[:, 0])  # learned: the biases alone
        h, c = self.init_h(mean), self.init_c(mean)
        if self.cfg.attributes:
            probs = self.drop(torch.softmax(self.classifier(feats.mean(1)), dim=1))
            h, c = h + self.attr_h(probs), c + self.attr_c(probs)
        h, c = torch.tanh(h), torch.tanh(c) if self.cfg.cell == "lstm" else torch.zeros_like(h)
        return a, keys, (h, c)

    def step(self, words: torch.Tensor, a: torch.Tensor, keys: torch.Tensor, state: State
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One step: previous words (N,) -> logits (N, V), new state, attention (N, L)."""
        h, c = state
        e = self.att_out(torch.tanh(keys + self.att_hid(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(e, dim=1)
        z = torch.sigmoid(self.f_beta(h)) * torch.bmm(alpha.unsqueeze(1), a).squeeze(1)
        emb = self.drop(self.embed(words))
        x = torch.cat([emb, z], dim=1)
        if self.cfg.cell == "lstm":
            h, c = self.rnn(x, (h, c))
        else:
            h = self.rnn(x, h)
        out = emb + self.L_h(self.drop(h)) + self.L_z(z)
        return self.L_o(self.drop(torch.tanh(out))), (h, c), alpha

    def forward(self, feats: torch.Tensor, captions: torch.Tensor, image_index: torch.Tensor | None = None,
                pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. feats (N, L, feat_dim); captions (B, T) start with <start>, padded with `pad`;
        image_index (B,) maps each caption to its image row (None: caption i is image i's). Returns logits
        (B, T-1, V) predicting captions[:, 1:], and attention (B, T-1, L); positions past a caption's end are zero.

        Each image is projected once for all its captions (ruotianluo's seq_per_img), and the captions are sorted
        by length so that finished ones drop out of the batch as sgrvinod's tutorial does; but only once a quarter
        of the rows have finished, since each drop costs a zero-filled gradient the size of the annotations."""
        a, keys, (h, c) = self.prepare(feats)
        steps = (captions != pad).sum(1) - 1  # words to predict per caption
        order = steps.argsort(descending=True, stable=True)
        rows = order if image_index is None else image_index[order]
        a, keys, h, c, caps = a[rows], keys[rows], h[rows], c[rows], captions[order]
        running = steps[order]
        total, length = captions.shape
        logits, alphas = [], []
        n = total
        for t in range(length - 1):
            alive = running[:n] > t
            live = int(alive.sum())
            if live <= 0.75 * n:
                n, alive = live, alive[:live]
                a, keys, h, c = a[:n], keys[:n], h[:n], c[:n]
            out, (h, c), alpha = self.step(caps[:n, t], a, keys, (h, c))
            keep = alive.unsqueeze(1)
            logits.append(nn.functional.pad(out * keep, (0, 0, 0, total - n)))
            alphas.append(nn.functional.pad(alpha * keep, (0, 0, 0, total - n)))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(total, device=order.device)
        return torch.stack(logits, 1)[inverse], torch.stack(alphas, 1)[inverse]


PENALTIES = ("mean", "sum")


def attention_penalty(alphas: torch.Tensor, mask: torch.Tensor, form: str = "sum") -> torch.Tensor:
    """Doubly stochastic regulariser, mean over captions, counting only real (non-pad) steps. alphas (B, T, L),
    mask (B, T). sum: sum_i (1 - sum_t alpha_ti)^2 (Xu et al. eq. 14); mean: mean_i (T/L - sum_t alpha_ti)^2."""
    coverage = (alphas * mask.unsqueeze(2)).sum(1)
    if form == "sum":
        return ((1.0 - coverage) ** 2).sum(1).mean()
    # per cell, target T/L (all a T-word caption can give each cell): sum = L*mean + L(1-T/L)^2, a constant no map lowers
    target = mask.sum(1, keepdim=True) / alphas.shape[2]
    return ((target - coverage) ** 2).mean(1).mean()
