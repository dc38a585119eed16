"""Quality of a language model on reply tokens: perplexity and top-1 / top-3 accuracy.

Every model is measured the same way: for each (context, reply) example, the tokens of
the reply and its closing ``<|eos|>`` are predicted given everything before them. The
baseline is an interpolated bigram model fitted on the same public pretraining stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from covey.models._data import Example
from covey.models._tokenizer import PAD, ChatTokenizer

__all__ = ["BigramModel", "Quality", "Tally", "evaluate", "examples_to_batches", "scored", "tally",
           "torch_scored"]

# Logits of the scored positions of a right-padded batch: (B, T) ids and (B, T) mask ->
# (N, V), N the mask's true count. Right padding needs no attention mask in a causal
# model: a real token never attends to the pads after it.
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def scored(full: Callable[[np.ndarray], np.ndarray]) -> LogitsFn:
    """A LogitsFn from a function giving logits at every position, (B, T) -> (B, T, V)."""
    return lambda ids, mask: full(ids)[mask]


def torch_scored(model: Any) -> LogitsFn:
    """The torch model's logits at the scored positions only: the vocabulary projection
    of context tokens, a third of the work, is skipped."""
    def logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.scored_logits(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

    return logits


@dataclass(frozen=True)
class Quality:
    """Next-token quality over reply tokens."""

    perplexity: float
    top1: float
    top3: float
    tokens: int
    examples: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready, rounded."""
        return {"perplexity": round(self.perplexity, 3), "top1": round(self.top1, 4),
                "top3": round(self.top3, 4), "tokens": self.tokens, "examples": self.examples}


def examples_to_batches(tok: ChatTokenizer, examples: Sequence[Example], context: int,
                        batch_tokens: int = 8192) -> list[tuple[np.ndarray, np.ndarray]]:
    """Right-padded (ids, target) batches; targets are -1 outside reply tokens.

    Examples longer than the context keep their last ``context`` tokens.
    """
    rows: list[tuple[list[int], list[int]]] = []
    for ex in examples:
        ids, start = tok.example(ex.context, ex.reply)
        targets = [-1] * (start - 1) + ids[start:]  # target of position i is ids[i + 1]
        ids = ids[:-1]
        if len(ids) > context:
            ids, targets = ids[-context:], targets[-context:]
        rows.append((ids, targets))
    rows.sort(key=lambda r: len(r[0]))  # similar lengths together: little padding
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    i = 0
    while i < len(rows):
        width = len(rows[i][0])
        j = i
        while j < len(rows) and (j - i + 1) * len(rows[j][0]) <= batch_tokens:
            width = len(rows[j][0])
            j += 1
        j = max(j, i + 1)
        width = max(len(r[0]) for r in rows[i:j])
        batch_ids = np.full((j - i, width), PAD, dtype=np.int64)
        batch_tgt = np.full((j - i, width), -1, dtype=np.int64)
        for k, (a, b) in enumerate(rows[i:j]):
            batch_ids[k, : len(a)] = a
            batch_tgt[k, : len(b)] = b
        batches.append((batch_ids, batch_tgt))
        i = j
    return batches


@dataclass(frozen=True)
class Tally:
    """Sums over scored tokens, which add up across batches (and processes)."""

    nll: float = 0.0  # summed log-loss, in double
    hit1: int = 0
    hit3: int = 0
    tokens: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.nll + other.nll, self.hit1 + other.hit1, self.hit3 + other.hit3,
                     self.tokens + other.tokens)

    def quality(self, examples: int) -> Quality:
        """Perplexity and accuracies of the tokens tallied (of ``examples`` examples)."""
        if self.tokens == 0:
            return Quality(float("nan"), 0.0, 0.0, 0, examples)
        return Quality(math.exp(self.nll / self.tokens), self.hit1 / self.tokens,
                       self.hit3 / self.tokens, self.tokens, examples)


def tally(logits_fn: LogitsFn, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> Tally:
    """Log-loss and top-1 / top-3 hits of ``logits_fn`` over the batches' target tokens."""
    nll = 0.0
    hit1 = hit3 = count = 0
    for ids, tgt in batches:
        mask = tgt >= 0
        sel = torch.from_numpy(np.ascontiguousarray(logits_fn(ids, mask)))  # (N, V) scored
        y = torch.from_numpy(tgt[mask])
        target = sel.gather(1, y[:, None])  # (N, 1)
        # float32 logsumexp (max-shifted, so exact to ~1e-7 per token), summed in double.
        nll += float((sel.logsumexp(dim=1) - target[:, 0]).double().sum())
        hit1 += int((sel.argmax(dim=1) == y).sum())
        hit3 += int(((sel > target).sum(dim=1) < 3).sum())  # fewer than 3 strictly better
        count += len(y)
    return Tally(nll, hit1, hit3, count)


def evaluate(logits_fn: LogitsFn, batches: Sequence[tuple[np.ndarray, np.ndarray]],
             examples: int) -> Quality:
    """Perplexity and top-k accuracy of ``logits_fn`` over the batches' target tokens."""
    return tally(logits_fn, batches).quality(examples)


class BigramModel:
    """P(next | previous) = (1 - lam) * bigram + lam * add-one unigram, fitted on a stream."""

    def __init__(self, stream: np.ndarray, vocab_size: int, lam: float = 0.1) -> None:
        v = vocab_size
        counts = np.bincount(stream[:-1] * v + stream[1:], minlength=v * v).reshape(v, v)
        unigram = (np.bincount(stream, minlength=v) + 1.0) / (len(stream) + v)
        rows = counts.sum(axis=1, keepdims=True)
        bigram = np.divide(counts, rows, out=np.tile(unigram, (v, 1)), where=rows > 0)
        self.log_probs = np.log((1 - lam) * bigram + lam * unigram[None, :]).astype(np.float32)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Log-probabilities as logits: (B, T) -> (B, T, V)."""
        return self.log_probs[ids]
