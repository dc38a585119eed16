"""covey's built-in language model: a small decoder-only transformer with LoRA adapters.

Read top to bottom: config, LoRA linear layer, attention, MLP, block, model. The shapes
in comments use B batch, T new tokens, P cached (past) tokens, C model width, nh heads,
hs head size, V vocabulary, r LoRA rank.

Why these choices, for a phone-class CPU:
- pre-LayerNorm blocks, GELU MLP, learned positions, tied input/output embeddings:
  the nanoGPT recipe, which trains stably at this size with a plain AdamW.
- an explicit key/value cache in and out of ``forward``, so the ONNX graph exported
  from this module decodes one token at a time without recomputing the prompt.
- LoRA on the attention projections (q, k, v, o) and optionally the MLP: the federated
  and personal parts of the model are these small matrices, never the base weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LoRALinear", "ModelConfig", "TinyLM"]

LORA_TARGETS = ("q", "k", "v", "o", "fc", "proj")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the model and of its LoRA adapters."""

    vocab_size: int = 4096
    context: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 192
    dropout: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = field(default=("q", "k", "v", "o"))

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.d_model % self.n_head:
            raise ValueError("d_model must be a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; known: {LORA_TARGETS}")

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {**asdict(self), "lora_targets": list(self.lora_targets)}


class LoRALinear(nn.Linear):
    """A linear layer with an optional low-rank update: ``W x + (alpha/r) B A x``.

    ``lora_B`` starts at zero, so a fresh adapter leaves the base model unchanged.
    ``external`` may hold one adapter per batch row, A (B, r, in) and B (B, out, r), so
    that many pods' adapters train in one pass.
    """

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, bias: bool = True):
        super().__init__(d_in, d_out, bias=bias)
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # Set only while tracing for ONNX: the matrices then come from graph inputs.
        self.external: tuple[Tensor, Tensor] | None = None
        # Off while pretraining the base: the adapter is zero then, and skipping it
        # saves its two matrix products per call.
        self.adapter_on = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.adapter_on:
            return super().forward(x)
        a, b = self.external if self.external is not None else (self.lora_A, self.lora_B)
        if a.dim() == 3:  # one adapter per batch row: A (B, r, in), B (B, out, r)
            low = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))  # (B, T, out)
            return super().forward(x) + low * self.scale
        return super().forward(x) + (x @ a.T @ b.T) * self.scale


def _linear(cfg: ModelConfig, name: str, d_in: int, d_out: int) -> nn.Linear:
    if name in cfg.lora_targets:
        return LoRALinear(d_in, d_out, cfg.lora_rank, cfg.lora_alpha)
    return nn.Linear(d_in, d_out)


class Attention(nn.Module):
    """Causal multi-head self-attention over the cached and the new tokens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.d_model
        self.q = _linear(cfg, "q", c, c)
        self.k = _linear(cfg, "k", c, c)
        self.v = _linear(cfg, "v", c, c)
        self.o = _linear(cfg, "o", c, c)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``mask`` (T, P+T) says which keys each new token sees; None: no cache, causal."""
        B, T, C = x.shape
        nh, hs = self.cfg.n_head, self.cfg.head_size
        low = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        if low:  # cast once for q, k, v and their adapters, not once per product
            x = x.to(torch.bfloat16)
        q = self.q(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, nh, hs).transpose(1, 2)
        v = self.v(x).view(B, T, nh, hs).transpose(1, 2)
        if past_k.shape[2]:  # (an empty cache would only cost a copy)
            k = torch.cat([past_k, k], dim=2)  # (B, nh, P+T, hs)
            v = torch.cat([past_v, v], dim=2)
        if low and mask is None:
            y = _causal_attention_bf16(q, k, v)
        else:
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(  # (B, nh, T, hs)
                    q.float(), k.float(), v.float(), attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o(y), k, v


_CAUSAL: dict[int, Tensor] = {}


def _causal_attention_bf16(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of bf16 q, k, v (B, nh, T, hs) for training under bf16 autocast:
    the two products in bf16, the softmax of the scaled, masked scores in fp32.

    For the short rows of chat examples this is about twice as fast, forward and backward,
    as CPU's fp32 flash attention (and its bf16 flash attention is slower still): the
    batched products are many small ones, and bf16 halves what they move.
    """
    T = q.shape[2]
    if T not in _CAUSAL:  # -inf above the diagonal: token t sees tokens 0..t
        _CAUSAL[T] = torch.full((T, T), float("-inf")).triu(1)
    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, nh, T, T), bf16
    weights = torch.softmax(torch.add(_CAUSAL[T], scores.float(), alpha=q.shape[-1] ** -0.5), -1)
    return torch.matmul(weights.to(torch.bfloat16), v)


class MLP(nn.Module):
    """Position-wise feed-forward, four times wider than the model."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = _linear(cfg, "fc", cfg.d_model, 4 * cfg.d_model)
        self.proj = _linear(cfg, "proj", 4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, past_k: Tensor, past_v: Tensor, mask: Tensor | None,
                mlp: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """The block's output; ``mlp`` False: stop after attention (see :meth:`finish`)."""
        a, k, v = self.attn(self.ln1(x), past_k, past_v, mask)
        x = x + a
        return (self.finish(x) if mlp else x), k, v

    def finish(self, x: Tensor) -> Tensor:
        """The MLP half of the block, position by position."""
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """The whole model: embeddings, blocks, final norm, tied output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.apply(self._init)
        # GPT-2's scaled init of residual projections keeps early activations small.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def empty_cache(self, batch: int = 1) -> list[Tensor]:
        """A zero-length key/value cache: ``[k0, v0, k1, v1, ...]``, each (B, nh, 0, hs)."""
        shape = (batch, self.cfg.n_head, 0, self.cfg.head_size)
        return [torch.zeros(shape) for _ in range(2 * self.cfg.n_layer)]

    def forward(self, idx: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        """Logits of the new tokens and the grown cache.

        Args:
            idx: (B, T) token ids.
            past: the cache, ``k0, v0, k1, v1, ...``, each (B, nh, P, hs); P may be 0.

        Returns:
            ``(logits, k0, v0, ...)``: logits (B, T, V), each cache tensor (B, nh, P+T, hs).
        """
        x, present = self._hidden(idx, past)
        logits = x @ self.tok.weight.T  # (B, T, V)
        return (logits, *present)

    def _hidden(self, idx: Tensor, past: tuple[Tensor, ...], last_mlp: bool = True
                ) -> tuple[Tensor, list[Tensor]]:
        """Final-normed hidden states (B, T, C) of the new tokens, and the grown cache;
        ``last_mlp`` False: the residual stream before the last block's MLP, not normed."""
        if not past:
            past = tuple(self.empty_cache(idx.shape[0]))
        T = idx.shape[1]
        P = past[0].shape[2]
        positions = torch.arange(T, device=idx.device) + P  # (T,)
        x = self.drop(self.tok(idx) + self.pos(positions)[None])  # (B, T, C)
        # Token t (at position P+t) sees cached tokens and new tokens up to itself;
        # without a cache that is the plain causal mask, which attention skips computing.
        mask = None
        if P:
            keys = torch.arange(P + T, device=idx.device)[None, :]
            mask = keys <= (torch.arange(T, device=idx.device)[:, None] + P)  # (T, P+T)
        present: list[Tensor] = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, past[2 * i], past[2 * i + 1], mask, last_mlp or i < last)
            present += [k, v]
        return (self.ln_f(x) if last_mlp else x), present

    def scored_logits(self, idx: Tensor, mask: Tensor) -> Tensor:
        """Logits (N, V) of the positions where ``mask`` (B, T) is true, in order.

        The last block's MLP runs on those positions only (the others feed no logit),
        unless it holds one adapter per batch row, which needs the rows.
        """
        last = cast(Block, self.blocks[-1])
        per_row = any(isinstance(m, LoRALinear) and m.external is not None
                      and m.external[0].dim() == 3 for m in last.mlp.modules())
        if per_row:
            x, _ = self._hidden(idx, ())
            return x[mask] @ self.tok.weight.T
        x, _ = self._hidden(idx, (), last_mlp=False)
        return self.ln_f(last.finish(x[mask])) @ self.tok.weight.T  # (N, V)

    def window_loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over windows where every position has a target.

        The pretraining loss: no masking, so it compiles to one graph.
        """
        x, _ = self._hidden(idx, ())
        logits = x @ self.tok.weight.T  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def set_adapters(self, on: bool) -> None:
        """Use (or skip) every LoRA adapter in the forward pass."""
        for module in self.modules():
            if isinstance(module, LoRALinear):
                module.adapter_on = on

    def num_parameters(self, lora: bool = False) -> int:
        """Parameters of the base model, or of the LoRA adapter."""
        return sum(p.numel() for n, p in self.named_parameters() if ("lora_" in n) == lora)
