"""Pretraining the base model on the public share: deterministic from a seed."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from covey.models._model import ModelConfig, TinyLM
from covey.models._tokenizer import ASSISTANT, BOS, EOS, USER, ChatTokenizer

__all__ = ["TrainConfig", "pretrain", "token_stream"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of pretraining."""

    seed: int = 1234
    steps: int = 2300
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    threads: int = 2
    # bfloat16 autocast (weights and optimizer stay fp32) and a compiled training step:
    # together about 1.9x the tokens per second of fp32 eager on this machine's CPU.
    bf16: bool = True
    compile: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("steps, batch_size and seq_len must be positive")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


def token_stream(tok: ChatTokenizer, dialogues: Sequence[Sequence[tuple[str, str]]]
                 ) -> np.ndarray:
    """All dialogues rendered as chats (every turn closed by ``<|eos|>``) and concatenated."""
    texts = [text for dialogue in dialogues for _, text in dialogue]
    encoded = iter(tok.encode_batch(texts))
    stream: list[int] = []
    for dialogue in dialogues:
        stream.append(BOS)
        for role, _ in dialogue:
            stream.append(USER if role == "user" else ASSISTANT)
            stream.extend(next(encoded))
            stream.append(EOS)
    return np.asarray(stream, dtype=np.int64)


def pretrain(model: TinyLM, stream: np.ndarray, cfg: TrainConfig,
             on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train the base weights (LoRA frozen) on random windows of ``stream``; returns losses."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" not in n)
    decay = [p for p in base if p.dim() >= 2]
    no_decay = [p for p in base if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    model.train()
    model.set_adapters(False)  # the adapters are zero while the base trains

    def eager_loss(batch: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            return model.window_loss(batch[:, :-1], batch[:, 1:])

    loss_fn = torch.compile(eager_loss) if cfg.compile else eager_loss
    # The compiled backward would otherwise scatter-add embedding gradients with atomics
    # across threads, in a different order each run; this costs no measurable speed.
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        losses = _train_steps(model, stream, cfg, opt, loss_fn, eager_loss, base, on_step)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    model.eval()
    model.set_adapters(True)
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def _train_steps(model: TinyLM, stream: np.ndarray, cfg: TrainConfig,
                 opt: torch.optim.Optimizer, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                 eager_loss: Callable[[torch.Tensor], torch.Tensor],
                 base: list[torch.nn.Parameter],
                 on_step: Callable[[int, float], None] | None) -> list[float]:
    rng = np.random.default_rng(cfg.seed)
    window = cfg.seq_len + 1
    losses: list[float] = []
    for step in range(cfg.steps):
        starts = rng.integers(0, len(stream) - window, size=cfg.batch_size)
        batch = torch.from_numpy(np.stack([stream[s:s + window] for s in starts]))
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        try:
            loss = loss_fn(batch)
        except Exception as exc:  # no C++ compiler, or a backend failure: train eagerly
            if loss_fn is eager_loss or step > 0:
                raise
            warnings.warn(f"compiling the training step failed ({type(exc).__name__}); "
                          "training eagerly, slower and with different rounding", stacklevel=2)
            loss_fn = eager_loss
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base, cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def new_model(cfg: ModelConfig, seed: int) -> TinyLM:
    """A freshly initialised model (the same for the same seed)."""
    torch.manual_seed(seed)
    return TinyLM(cfg)
