"""Training a LoRA adapter on a few (context, reply) examples: what a pod does in a round.

Only the LoRA matrices train; the base weights stay frozen. The loss is the next-token
cross-entropy of the reply tokens (the context is conditioning only), as in evaluation.

Many adapters can train at once (:func:`finetune_adapters`, what a simulation does with
the pods of a round): each job keeps its own examples, batch order and AdamW state, and
step ``s`` of every job runs in one pass through the shared frozen base, the jobs' rows
regrouped by length into padded sub-batches, each row carrying its job's LoRA matrices.
Padding changes no result (right padding under a causal
mask, ignored targets), so each adapter equals the one training alone would give,
within float rounding; one big pass per step is cheaper than many small ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, Self

import numpy as np
import torch
from torch.nn import functional as F

from covey.models._adapter import Adapter
from covey.models._data import Example
from covey.models._evaluate import examples_to_batches
from covey.models._model import LoRALinear, TinyLM
from covey.models._precision import check_precision
from covey.models._tokenizer import PAD, ChatTokenizer

__all__ = ["FinetuneConfig", "FinetuneJob", "FinetuneResult", "finetune_adapter",
           "finetune_adapters"]


class RoundTraining(Protocol):
    """The local training settings a round message carries."""

    @property
    def local_epochs(self) -> int: ...

    @property
    def lr(self) -> float: ...

    @property
    def max_examples(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def precision(self) -> str: ...


#: Spreads the seeds of a round's simulated pods (a prime above any pod count).
_POD_SEED_STRIDE = 100_003


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
    precision: str = "fp32"  # or "bf16": see covey.models._precision

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_tokens < 16 or self.max_examples < 1:
            raise ValueError("epochs, batch_tokens and max_examples must be positive")
        if not 0 < self.lr < 1:
            raise ValueError("lr must be in (0, 1)")
        check_precision(self.precision)

    @classmethod
    def for_round(cls, round: RoundTraining, pod: int | None = None,
                  measure_loss: bool = True) -> Self:
        """The local training ``round`` asks of a pod.

        A real pod trains with the round's seed. The simulated pods of one process share
        the round's seed, so ``pod`` (a simulated pod's 1-based index) gives each its own,
        from (seed, pod) alone, whichever process or engine trains it. ``measure_loss``:
        simulations skip the two loss passes.
        """
        seed = round.seed if pod is None else round.seed * _POD_SEED_STRIDE + pod
        return cls(epochs=round.local_epochs, lr=round.lr, max_examples=round.max_examples,
                   seed=seed, measure_loss=measure_loss, precision=round.precision)


@dataclass(frozen=True)
class FinetuneResult:
    """The trained adapter and what training measured (no example text)."""

    adapter: Adapter
    examples: int
    tokens: int
    loss_before: float
    loss_after: float


@dataclass(frozen=True)
class FinetuneJob:
    """One adapter to train: the examples, the adapter to start from, the settings."""

    examples: Sequence[Example]
    adapter: Adapter
    cfg: FinetuneConfig


def _batches(tok: ChatTokenizer, examples: Sequence[Example], context: int, batch_tokens: int
             ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for ids, targets in examples_to_batches(tok, examples, context, batch_tokens):
        t = torch.from_numpy(targets)
        out.append((torch.from_numpy(ids), torch.where(t < 0, -100, t)))
    return out


# torch.optim.AdamW's defaults, which one adapter trained alone used.
BETAS, EPS = (0.9, 0.999), 1e-8
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Plan:
    """One job's examples as batches, and the order its steps visit them."""

    examples: int
    batches: list[Batch]
    order: list[int]  # batch index of each step, over all epochs
    tokens: int


def _plan(tok: ChatTokenizer, job: FinetuneJob, context: int) -> _Plan:
    cfg = job.cfg
    rng = np.random.default_rng(cfg.seed)
    chosen = list(job.examples)
    if len(chosen) > cfg.max_examples:
        keep = sorted(rng.choice(len(chosen), size=cfg.max_examples, replace=False))
        chosen = [chosen[i] for i in keep]
    batches = _batches(tok, chosen, context, cfg.batch_tokens)
    order = [int(i) for _ in range(cfg.epochs) for i in rng.permutation(len(batches))]
    tokens = int(sum(int((t != -100).sum()) for _, t in batches))
    return _Plan(len(chosen), batches, order, tokens)


def _rows(batch: Batch) -> list[Batch]:
    """The rows of a right-padded batch, without their padding."""
    ids, targets = batch
    scored = (targets != -100).int()
    out = []
    for i in range(ids.shape[0]):
        # A row ends at its last scored token; after it, only padding.
        width = int(scored[i].nonzero().max()) + 1 if bool(scored[i].any()) else ids.shape[1]
        out.append((ids[i, :width], targets[i, :width]))
    return out


def _regroup(parts: Sequence[tuple[int, Batch]], budget: int) -> list[tuple[Batch, torch.Tensor]]:
    """Batches of several jobs as new batches of rows of similar length, each row
    tagged with its job: [((ids, targets), owner)], padded width x rows <= ``budget``."""
    rows = sorted(((r, k) for k, batch in parts for r in _rows(batch)),
                  key=lambda item: item[0][0].shape[0])
    groups: list[tuple[Batch, torch.Tensor]] = []
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and (j - i + 1) * rows[j][0][0].shape[0] <= budget:
            j += 1
        chunk = rows[i:j]
        width = chunk[-1][0][0].shape[0]
        ids = torch.full((len(chunk), width), PAD, dtype=torch.int64)
        targets = torch.full((len(chunk), width), -100, dtype=torch.int64)
        for n, ((row_ids, row_targets), _) in enumerate(chunk):
            ids[n, : row_ids.shape[0]] = row_ids
            targets[n, : row_targets.shape[0]] = row_targets
        groups.append(((ids, targets), torch.tensor([k for _, k in chunk])))
        i = j
    return groups


class _Stacked:
    """K adapters as stacked leaf tensors (K, ...), installed in the model's LoRA layers."""

    def __init__(self, model: TinyLM, adapters: Sequence[Adapter], bf16: bool = False) -> None:
        self.model, self.bf16 = model, bf16
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        self.params: dict[str, torch.Tensor] = {}
        for name in self.layers:
            for part in ("lora_A", "lora_B"):
                key = f"{name}.{part}"
                values = []
                for adapter in adapters:
                    if key not in adapter.tensors:
                        raise ValueError(f"adapter lacks tensor {key}")
                    values.append(torch.from_numpy(np.asarray(adapter.tensors[key], np.float32)))
                self.params[key] = torch.stack(values).requires_grad_(True)

    def _passes(self, parts: Sequence[tuple[int, Batch]], budget: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The reply-token cross-entropy (N,) and the job of each token (N,), one pass
        at a time over the batches ``parts`` gives as (job, batch); one job's batch
        runs as it is, several jobs' rows are regrouped by length."""
        if len(parts) == 1:
            job, batch = parts[0]
            groups = [(batch, torch.full((batch[0].shape[0],), job))]
        else:
            groups = _regroup(parts, budget)
        for (ids, targets), owner in groups:
            for name, layer in self.layers.items():
                a, b = self.params[f"{name}.lora_A"], self.params[f"{name}.lora_B"]
                if len(parts) == 1:  # one adapter for every row: the plain path
                    layer.external = (a[parts[0][0]], b[parts[0][0]])
                else:
                    layer.external = (a[owner], b[owner])  # (rows, r, in), (rows, out, r)
            keep = targets != -100
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model.scored_logits(ids, keep)  # (N, V), scored positions only
            yield (F.cross_entropy(logits.float(), targets[keep], reduction="none"),
                   owner[:, None].expand_as(targets)[keep])

    def losses(self, parts: Sequence[tuple[int, Batch]], budget: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reply-token cross-entropy and token count of every job."""
        k = next(iter(self.params.values())).shape[0]
        sums = torch.zeros(k)
        counts = torch.zeros(k, dtype=torch.int64)
        for nll, owner in self._passes(parts, budget):
            sums = sums.index_add(0, owner, nll)
            counts += torch.bincount(owner, minlength=k)
        return sums, counts

    def gradients(self, parts: Sequence[tuple[int, Batch]], budget: int
                  ) -> list[torch.Tensor | None]:
        """The gradient of the sum of every job's mean reply loss (each job's own
        gradient in its rows), taken pass by pass: only one pass's activations are alive
        at a time, so memory does not grow with the number of jobs."""
        params = list(self.params.values())
        counts = torch.zeros(params[0].shape[0], dtype=torch.int64)
        for job, (_, targets) in parts:
            counts[job] += int((targets != -100).sum())
        weight = 1.0 / counts.clamp(min=1).float()
        total: list[torch.Tensor | None] = [None] * len(params)
        for nll, owner in self._passes(parts, budget):
            grads = torch.autograd.grad((nll * weight[owner]).sum(), params, allow_unused=True)
            total = [t if g is None else g if t is None else t + g
                     for t, g in zip(total, grads, strict=True)]
        return total

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.external = None

    def adapter(self, k: int) -> Adapter:
        return Adapter({n: p[k].detach().numpy().astype(np.float32, copy=True)
                        for n, p in self.params.items()})


def _mean_losses(plans: Sequence[_Plan], stacked: _Stacked, budget: int) -> list[float]:
    """Token-weighted mean reply loss of every job over its own batches."""
    k = len(plans)
    sums, counts = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.int64)
    with torch.no_grad():
        for j in range(max((len(p.batches) for p in plans), default=0)):
            s, c = stacked.losses([(i, p.batches[j]) for i, p in enumerate(plans)
                                   if j < len(p.batches)], budget)
            sums += s.double()
            counts += c
    return [float(s / c) if c else math.nan for s, c in zip(sums, counts, strict=True)]


def finetune_adapters(model: TinyLM, tok: ChatTokenizer, jobs: Sequence[FinetuneJob]
                      ) -> list[FinetuneResult]:
    """Train one adapter per job, all at once; each equals training it alone.

    Deterministic for the jobs' seeds. The model's base weights are not changed; its
    LoRA parameters end holding the last job's trained adapter.
    """
    if not jobs:
        return []
    cfg0 = jobs[0].cfg
    if any(job.cfg.precision != cfg0.precision for job in jobs):
        raise ValueError("jobs trained together must share one precision")
    torch.manual_seed(cfg0.seed)  # only dropout draws from it
    torch.set_num_threads(cfg0.threads)
    plans = [_plan(tok, job, model.cfg.context) for job in jobs]
    budget = max(job.cfg.batch_tokens for job in jobs)
    stacked = _Stacked(model, [job.adapter for job in jobs], cfg0.precision == "bf16")
    measure = any(job.cfg.measure_loss for job in jobs)
    lr = torch.tensor([job.cfg.lr for job in jobs], dtype=torch.float32)
    moments = {n: (torch.zeros_like(p), torch.zeros_like(p)) for n, p in stacked.params.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        before = _mean_losses(plans, stacked, budget) if measure else [math.nan] * len(jobs)
        model.train()
        for step in range(max((len(p.order) for p in plans), default=0)):
            active = [i for i, p in enumerate(plans) if step < len(p.order)]
            grads = stacked.gradients(
                [(i, plans[i].batches[plans[i].order[step]]) for i in active], budget)
            rows = torch.tensor(active)
            _adamw_step(stacked.params, moments, grads, rows, lr[rows], step + 1)
        model.eval()
        after = _mean_losses(plans, stacked, budget) if measure else [math.nan] * len(jobs)
    finally:
        model.eval()
        stacked.remove()
        for p in model.parameters():
            p.requires_grad_(True)
    results = [FinetuneResult(stacked.adapter(k), plan.examples, plan.tokens,
                              before[k] if job.cfg.measure_loss else math.nan,
                              after[k] if job.cfg.measure_loss else math.nan)
               for k, (job, plan) in enumerate(zip(jobs, plans, strict=True))]
    results[-1].adapter.load_into(model)
    return results


def _adamw_step(params: dict[str, torch.Tensor],
                moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
                grads: Sequence[torch.Tensor | None], rows: torch.Tensor, lr: torch.Tensor,
                step: int) -> None:
    """One AdamW step (no weight decay) of the adapters in ``rows``, as torch's AdamW
    takes it: every active job is at the same step, since all start together."""
    b1, b2 = BETAS
    bias1, bias2 = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    with torch.no_grad():
        for (name, p), g in zip(params.items(), grads, strict=True):
            if g is None:
                continue
            g = g[rows]
            m, v = moments[name]
            m_rows = m[rows].lerp_(g, 1 - b1)
            v_rows = v[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
            m[rows], v[rows] = m_rows, v_rows
            size = (lr / bias1).view(-1, *([1] * (p.dim() - 1)))
            p[rows] -= size * m_rows / (v_rows.sqrt() / bias2 + EPS)


def finetune_adapter(model: TinyLM, tok: ChatTokenizer, examples: Sequence[Example],
                     adapter: Adapter, cfg: FinetuneConfig) -> FinetuneResult:
    """Start from ``adapter``, train it on ``examples`` and return the trained adapter.

    Deterministic for a given seed. The model's LoRA parameters are overwritten (they
    end holding the trained adapter); its base weights are not changed.
    """
    return finetune_adapters(model, tok, [FinetuneJob(examples, adapter, cfg)])[0]
