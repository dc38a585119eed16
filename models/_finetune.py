"""Training a LoRA adapter on a few (context, reply) examples: what a pod does in a round.

Only the LoRA matrices train; the base weights stay frozen. The loss is the next-token
cross-entropy of the reply tokens (the context is conditioning only), as in evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covey.models._adapter import Adapter
from covey.models._data import Example
from covey.models._evaluate import examples_to_batches
from covey.models._model import TinyLM
from covey.models._tokenizer import ChatTokenizer

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune_adapter", "reply_loss"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Local training of an adapter: epochs over the examples, AdamW on LoRA only."""

    epochs: int = 1
    lr: float = 5e-3
    batch_tokens: int = 2048
    max_examples: int = 256
    seed: int = 0
    threads: int = 1
    measure_loss: bool = True  # the loss on the examples before and after (two passes)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_tokens < 16 or self.max_examples < 1:
            raise ValueError("epochs, batch_tokens and max_examples must be positive")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")


@dataclass(frozen=True)
class FinetuneResult:
    """The trained adapter and what training measured (no example text)."""

    adapter: Adapter
    examples: int
    tokens: int
    loss_before: float
    loss_after: float


def _batches(tok: ChatTokenizer, examples: Sequence[Example], context: int, batch_tokens: int
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for ids, targets in examples_to_batches(tok, examples, context, batch_tokens):
        t = torch.from_numpy(targets)
        out.append((torch.from_numpy(ids), torch.where(t < 0, -100, t)))
    return out


def reply_loss(model: TinyLM, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Token-weighted mean cross-entropy over the reply tokens of ``batches``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, targets in batches:
            n = int((targets != -100).sum())
            if n:
                total += float(model.loss(ids, targets)) * n
                count += n
    return total / count if count else math.nan


def finetune_adapter(model: TinyLM, tok: ChatTokenizer, examples: Sequence[Example],
                     adapter: Adapter, cfg: FinetuneConfig) -> FinetuneResult:
    """Start from ``adapter``, train it on ``examples`` and return the trained adapter.

    Deterministic for a given seed. The model's LoRA parameters are overwritten (they
    end holding the trained adapter); its base weights are not changed.
    """
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    chosen = list(examples)
    if len(chosen) > cfg.max_examples:
        keep = sorted(rng.choice(len(chosen), size=cfg.max_examples, replace=False))
        chosen = [chosen[i] for i in keep]
    adapter.load_into(model)
    batches = _batches(tok, chosen, model.cfg.context, cfg.batch_tokens)
    tokens = int(sum(int((t != -100).sum()) for _, t in batches))
    before = reply_loss(model, batches) if cfg.measure_loss else math.nan
    lora = [p for n, p in model.named_parameters() if ".lora_" in n]
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    opt = torch.optim.AdamW(lora, lr=cfg.lr, weight_decay=0.0)
    model.train()
    try:
        for _ in range(cfg.epochs):
            for i in rng.permutation(len(batches)):
                ids, targets = batches[i]
                loss = model.loss(ids, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    after = reply_loss(model, batches) if cfg.measure_loss else math.nan
    return FinetuneResult(Adapter.from_model(model), len(chosen), tokens, before, after)
