"""The LSTM caption decoder (Show, Attend and Tell style), built around a step function.

Image features enter twice, for different reasons:

* their mean initialises the LSTM state ``(h, c)`` -- the network knows the whole
  picture before it writes the first word (Show and Tell);
* at every step, soft attention over the encoder's spatial map (``R`` regions) gives
  a context vector fed with the word embedding -- each word can look at a different
  part of the picture (Show, Attend and Tell, with its sigmoid gate on the context).
  With ``attention=False`` the context is the pooled feature at every step, which is
  the tutorial's "merge" model with state.

A decoder trained on several datasets may know their **styles** (``cfg.styles``): Flickr8k's
annotators wrote "a man in a red shirt is climbing a rock", COCO's "a kitchen with a stove and
a sink". A learnt offset per style, added to every region of the projected features, says which
way to write: it moves the initial ``(h, c)`` (through the mean) and the context of every step
(attention weights sum to one, and the keys shift alike, so where the decoder looks is unchanged).
Offsets start at zero, so a decoder gains styles without forgetting.

Attention scores are scaled dot products between a query from ``h`` and per-region
keys (Luong's "general" form) rather than SAT's additive MLP: the additive form
materialises an ``(N, R, D)`` tensor at every step, and on CPU that memory traffic,
not the LSTM, dominated the cost of a training step.

``step`` carries ``(h, c)`` so a caption costs one LSTM step per word, never a re-run
over the prefix. All state tensors are batch-first so a beam search can reorder them
with one ``index_select`` each, without knowing what they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from batchcap.config import DecoderConfig

# The decoder state: (h, c, memory, keys), every tensor (N, ...) batch-first.
State = tuple[torch.Tensor, ...]


class CaptionDecoder(nn.Module):
    """Word-by-word caption generator conditioned on image features."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype | None = None) -> None:
        """``dtype``: the weights' (default fp32); bf16 makes a faster search on CPUs with native bf16."""
        super().__init__()
        kw: dict[str, Any] = {"dtype": dtype}
        self.cfg = cfg
        d = cfg.attention_dim
        self.feature_proj = nn.Linear(cfg.feature_dim, d, **kw)
        self.init_h = nn.Linear(d, cfg.num_layers * cfg.hidden_dim, **kw)
        self.init_c = nn.Linear(d, cfg.num_layers * cfg.hidden_dim, **kw)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, **kw)
        if cfg.attention:
            self.att_key = nn.Linear(d, d, **kw)
            self.att_query = nn.Linear(cfg.hidden_dim, d, **kw)
            self.att_gate = nn.Linear(cfg.hidden_dim, d, **kw)
        cells = [nn.LSTMCell(cfg.embed_dim + d, cfg.hidden_dim, **kw)]
        cells += [nn.LSTMCell(cfg.hidden_dim, cfg.hidden_dim, **kw) for _ in range(cfg.num_layers - 1)]
        self.cells = nn.ModuleList(cells)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.deep_output:  # logits = L_o tanh(E y_{t-1} + L_h h_t + L_z z_t), SAT eq. 7
            self.out_h = nn.Linear(cfg.hidden_dim, cfg.embed_dim, **kw)
            self.out_z = nn.Linear(d, cfg.embed_dim, **kw)
            self.out = nn.Linear(cfg.embed_dim, cfg.vocab_size, **kw)
        else:
            self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size, **kw)
        self._scale = d**-0.5
        if cfg.styles:  # (S, D): an offset of every region's projected feature, zero until trained
            self.style_memory = nn.Embedding(len(cfg.styles), d, **kw)
            nn.init.zeros_(self.style_memory.weight)

    # -- state ---------------------------------------------------------------------------
    #: Which tensors of the state are one row per image (memory, keys), shared by all of the
    #: image's hypotheses: beam search keeps them unrepeated (``beam_search(per_image=...)``).
    per_image_state = (False, False, True, True)

    def init_state(
        self, features: torch.Tensor, captions_per_image: int = 1, styles: torch.Tensor | None = None
    ) -> State:
        """Initial state from encoder features ``(M, R, F)`` or pooled ``(M, F)``.

        ``styles`` ``(M,)`` are indices into ``cfg.styles``, one per image; ``None`` (or a
        decoder without styles) adds no offset.

        The state describes ``N = M * captions_per_image`` hypotheses, image-major: the
        memory and keys stay per image ``(M, R, D)`` and only ``h, c`` are per hypothesis,
        so training with all of an image's references costs one projection per image.
        Beam search starts from ``captions_per_image=1`` and repeats only ``h, c`` for its K
        beams (:attr:`per_image_state`).
        """
        features = features.to(self.feature_proj.weight.dtype)  # fp32, or bf16 for a bf16 search
        if features.dim() == 2:
            features = features[:, None, :]  # (M, 1, F)
        memory = F.relu(self.feature_proj(features))  # (M, R, D)
        if styles is not None and self.cfg.styles:
            memory = memory + self.style_memory(styles.to(memory.device))[:, None, :]  # (M, R, D)
        keys = self.att_key(memory) if self.cfg.attention else memory[:, :0]  # (M, R, D) or empty
        mean = memory.mean(dim=1)  # (M, D)
        m, layers, hid = memory.shape[0], self.cfg.num_layers, self.cfg.hidden_dim
        h = torch.tanh(self.init_h(mean)).view(m, layers, hid)  # (M, L, H)
        c = torch.tanh(self.init_c(mean)).view(m, layers, hid)  # (M, L, H)
        if captions_per_image > 1:
            h = h.repeat_interleave(captions_per_image, dim=0)  # (N, L, H)
            c = c.repeat_interleave(captions_per_image, dim=0)  # (N, L, H)
        return (h, c, memory, keys)

    def _context(
        self, h_top: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        m, regions, d = memory.shape
        per_image = h_top.shape[0] // max(1, m)  # C hypotheses share each image's memory
        if not self.cfg.attention:
            return memory.mean(dim=1).repeat_interleave(per_image, dim=0), None  # (N, D)
        query = (self.att_query(h_top) * self._scale).view(m, per_image, d)  # (M, C, D)
        scores = torch.bmm(query, keys.transpose(1, 2))  # (M, C, R)
        alpha = torch.softmax(scores.float(), dim=-1).to(memory.dtype)  # (M, C, R)
        context = torch.bmm(alpha, memory).reshape(m * per_image, d)  # (N, D)
        context = torch.sigmoid(self.att_gate(h_top)) * context  # gated, as in SAT
        return context, alpha.reshape(m * per_image, regions)

    def _advance(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        h, c, memory, keys = state
        context, alpha = self._context(h[:, -1], memory, keys)
        embedded = self.embed(tokens)  # (N, E)
        x = torch.cat([embedded, context], dim=1)  # (N, E + D)
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            h_l, c_l = cell(x, (h[:, layer], c[:, layer]))  # (N, H) each
            hs.append(h_l)
            cs.append(c_l)
            x = self.dropout(h_l) if layer + 1 < len(self.cells) else h_l
        if self.cfg.deep_output:
            x = torch.tanh(embedded + self.out_h(x) + self.out_z(context))  # (N, E)
        logits = self.out(self.dropout(x))  # (N, V)
        return logits, (torch.stack(hs, 1), torch.stack(cs, 1), memory, keys), alpha

    # -- inference -----------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One word for each of N hypotheses: fp32 log-probabilities ``(N, V)`` and new state."""
        logits, state, _ = self._advance(tokens, state)
        return torch.log_softmax(logits.float(), dim=-1), state

    # -- training ------------------------------------------------------------------------
    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        captions_per_image: int = 1,
        styles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced logits ``(N, T-1, V)`` for ``captions`` ``(N, T)`` = ``<start> w1 .. <end> <pad>..``.

        ``N = M * captions_per_image``, image-major. Also returns the attention weights
        ``(N, T-1, R)`` (``None`` without attention), which training uses for the doubly
        stochastic regulariser. ``styles`` ``(M,)``: each image's style (:meth:`init_state`).
        """
        state = self.init_state(features, captions_per_image, styles)
        steps = captions.shape[1] - 1
        logits, alphas = [], []
        for t in range(steps):
            step_logits, state, alpha = self._advance(captions[:, t], state)
            logits.append(step_logits)
            if alpha is not None:
                alphas.append(alpha)
        stacked_alpha = torch.stack(alphas, 1) if alphas else None
        return torch.stack(logits, 1), stacked_alpha
