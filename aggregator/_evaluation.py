"""Evaluation of a global adapter: perplexity and next-token accuracy on held-out text.

The aggregator evaluates each new version on the public share's held-out users (never on
a pod's data); simulations also evaluate on the federated users' test messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["AdapterEvaluator", "public_evaluator"]


class AdapterEvaluator:
    """Quality of the base model with an adapter on a fixed list of examples."""

    def __init__(self, examples: Sequence[Any], threads: int = 1,
                 model: Any = None, tok: Any = None) -> None:

        from covey.models import load_model
        from covey.models._evaluate import examples_to_batches

        self.threads = threads
        if model is None or tok is None:
            model, tok, _ = load_model()
        self.model, self.tok = model, tok
        self.batches = examples_to_batches(self.tok, list(examples), self.model.cfg.context)
        self.examples = len(examples)

    def __call__(self, adapter_bytes: bytes) -> dict[str, float]:
        import torch

        from covey.models import Adapter
        from covey.models._evaluate import evaluate, torch_scored

        adapter = Adapter.from_bytes(adapter_bytes)
        adapter.load_into(self.model)  # what callers find loaded afterwards
        # Folded into the base weights: the LoRA products of every layer are skipped.
        merged = adapter.merged_into(self.model)
        merged.set_adapters(False)
        torch.set_num_threads(self.threads)
        q = evaluate(torch_scored(merged), self.batches, self.examples)
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
