"""Server-side evaluation of a global adapter on the public share's held-out users."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PublicEvaluator"]


class PublicEvaluator:
    """Perplexity and top-1 accuracy of the base model with an adapter, on a fixed slice
    of the public held-out examples (users the base model never trained on)."""

    def __init__(self, examples: int = 200, threads: int = 1) -> None:
        import torch

        from covey.models import load_corpus, load_model
        from covey.models._evaluate import examples_to_batches

        torch.set_num_threads(threads)
        self.model, self.tok, _ = load_model()
        held_out = list(load_corpus().public_eval[:examples])
        self.batches = examples_to_batches(self.tok, held_out, self.model.cfg.context)
        self.examples = len(held_out)

    def __call__(self, adapter_bytes: bytes) -> dict[str, float]:
        import torch

        from covey.models import Adapter
        from covey.models._evaluate import evaluate

        Adapter.from_bytes(adapter_bytes).load_into(self.model)

        def logits(ids: np.ndarray) -> Any:
            with torch.no_grad():
                return self.model(torch.from_numpy(ids))[0].numpy()

        q = evaluate(logits, self.batches, self.examples)
        return {"perplexity": round(q.perplexity, 4), "top1": round(q.top1, 4)}

    def initial_adapter(self, seed: int = 0) -> bytes:
        """The run's first global adapter: fresh LoRA matrices (B zero: no change)."""
        import torch

        from covey.models import Adapter, TinyLM

        torch.manual_seed(seed)
        fresh = TinyLM(self.model.cfg)
        return Adapter.zeros_like(fresh).to_bytes()
