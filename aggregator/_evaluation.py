"""Evaluation of a global adapter: perplexity and next-token accuracy on held-out text.

The aggregator evaluates each new version on the public share's held-out users (never on
a pod's data); simulations also evaluate on the federated users' test messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from covey.models import Tally

__all__ = ["AdapterEvaluator", "adapter_tally", "public_evaluator"]

Batches = Sequence[tuple["np.ndarray", "np.ndarray"]]
#: Tallies ``(adapter bytes, parts)`` -> one tally per part, each part elsewhere.
Spread = Callable[[bytes, Sequence[Batches]], Sequence["Tally"]]


def adapter_tally(model: Any, adapter_bytes: bytes, batches: Batches) -> Tally:
    """``model`` with the adapter folded into its base weights (so the LoRA products of
    every layer are skipped), tallied over ``batches``."""
    from covey.models import Adapter, tally, torch_scored

    merged = Adapter.from_bytes(adapter_bytes).merged_into(model)
    merged.set_adapters(False)
    return tally(torch_scored(merged), batches)


class AdapterEvaluator:
    """Quality of the base model with an adapter on a fixed list of examples.

    ``spread``: tallies parts of the examples elsewhere (a simulation's worker processes,
    ``parts`` of them, one thread each), instead of on ``threads`` threads here.
    """

    def __init__(self, examples: Sequence[Any], threads: int = 1,
                 model: Any = None, tok: Any = None, spread: Spread | None = None,
                 parts: int = 1) -> None:

        from covey.models import examples_to_batches, load_model

        self.threads, self.spread = threads, spread
        if model is None or tok is None:
            model, tok, _ = load_model()
        self.model, self.tok = model, tok
        # Spread: smaller batches, dealt to the parts by tokens.
        size = {} if spread is None else {"batch_tokens": 1024}
        self.batches = examples_to_batches(self.tok, list(examples), self.model.cfg.context,
                                           **size)
        self.parts = _deal(self.batches, parts) if spread is not None else []
        self.examples = len(examples)

    def __call__(self, adapter_bytes: bytes) -> dict[str, float]:
        import torch

        from covey.models import Adapter, Tally

        Adapter.from_bytes(adapter_bytes).load_into(self.model)  # what callers find loaded
        if self.spread is not None:
            total = sum(self.spread(adapter_bytes, self.parts), Tally())
        else:
            torch.set_num_threads(self.threads)
            total = adapter_tally(self.model, adapter_bytes, self.batches)
        q = total.quality(self.examples)
        return {"perplexity": round(q.perplexity, 4), "top1": round(q.top1, 4),
                "top3": round(q.top3, 4)}

    def initial_adapter(self, seed: int = 0) -> bytes:
        """A run's first global adapter: fresh LoRA matrices (B zero: no change)."""
        import torch

        from covey.models import Adapter, TinyLM

        torch.manual_seed(seed)
        return Adapter.zeros_like(TinyLM(self.model.cfg)).to_bytes()


def public_evaluator(examples: int = 200, threads: int = 1) -> AdapterEvaluator:
    """The aggregator's evaluator: the first ``examples`` public held-out examples."""
    from covey.models import load_corpus

    return AdapterEvaluator(load_corpus().public_eval[:examples], threads)


def _deal(batches: Batches, parts: int) -> list[Batches]:
    """``batches`` in ``parts`` lists of about equal tokens (the biggest batch first, each
    to the lightest list)."""
    dealt: list[list[Any]] = [[] for _ in range(max(1, parts))]
    load = [0] * len(dealt)
    for batch in sorted(batches, key=lambda b: -b[0].size):
        i = load.index(min(load))
        dealt[i].append(batch)
        load[i] += batch[0].size
    return [d for d in dealt if d]
