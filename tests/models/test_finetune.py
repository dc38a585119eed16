"""Adapter training: many pods' adapters trained in one batched pass equal each trained
alone, and pretraining trains the base only."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from covey.models._adapter import Adapter
from covey.models._data import Example
from covey.models._finetune import (
    FinetuneConfig,
    FinetuneJob,
    finetune_adapter,
    finetune_adapters,
)
from covey.models._model import TinyLM
from covey.models._tokenizer import ChatTokenizer
from covey.models._train import TrainConfig, pretrain
from tests.models.conftest import TEXTS


def _examples(start: int, count: int) -> list[Example]:
    return [Example(TEXTS[i % 6], TEXTS[(i + 1) % 6] * (1 + i % 3), f"2024-01-{i % 28 + 1:02d}")
            for i in range(start, start + count)]


def _jobs(start: Adapter) -> list[FinetuneJob]:
    # Different sizes, epochs and learning rates: jobs take different numbers of steps.
    return [FinetuneJob(_examples(k, n), start, FinetuneConfig(
        epochs=e, lr=lr, batch_tokens=96, seed=k, measure_loss=True))
        for k, (n, e, lr) in enumerate([(3, 1, 5e-3), (9, 2, 1e-2), (5, 3, 5e-3), (1, 1, 2e-2)])]


def test_batched_adapters_equal_each_trained_alone(model: TinyLM,
                                                   tokenizer: ChatTokenizer) -> None:
    start = Adapter.from_model(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    jobs = _jobs(start)
    together = finetune_adapters(model, tokenizer, jobs)
    alone = [finetune_adapter(model, tokenizer, j.examples, start, j.cfg) for j in jobs]
    for a, b in zip(together, alone, strict=True):
        moved = np.abs(b.adapter.flat() - start.flat()).max()
        assert moved > 1e-3  # training changed the adapter ...
        np.testing.assert_allclose(a.adapter.flat(), b.adapter.flat(), rtol=1e-4, atol=1e-6)
        assert (a.examples, a.tokens) == (b.examples, b.tokens)
        # The same loss, up to float32 rounding: which rows share a product changes how
        # a kernel sums them, and kernels differ between CPUs (AVX2 / AVX-512).
        assert a.loss_before == pytest.approx(b.loss_before, rel=1e-5)
        assert a.loss_after < a.loss_before  # ... and it learned its own examples
    # The base weights never change; the model ends holding the last job's adapter.
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base[name])
    np.testing.assert_array_equal(Adapter.from_model(model).flat(), alone[-1].adapter.flat())


def test_a_pods_adapter_does_not_depend_on_its_group(model: TinyLM,
                                                     tokenizer: ChatTokenizer) -> None:
    start = Adapter.from_model(model)
    jobs = _jobs(start)
    full = finetune_adapters(model, tokenizer, jobs)
    pair = finetune_adapters(model, tokenizer, jobs[1:3])
    for a, b in zip(full[1:3], pair, strict=True):
        np.testing.assert_allclose(a.adapter.flat(), b.adapter.flat(), rtol=1e-4, atol=1e-6)


def test_pretraining_trains_the_base_and_leaves_the_adapter(model: TinyLM) -> None:
    adapter = Adapter.from_model(model).flat()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    stream = np.random.default_rng(0).integers(0, model.cfg.vocab_size, 400)
    losses = pretrain(model, stream, TrainConfig(steps=3, batch_size=2, seq_len=16,
                                                 compile=False))
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert not torch.equal(model.tok.weight, before["tok.weight"])
    np.testing.assert_array_equal(Adapter.from_model(model).flat(), adapter)
    # Adapters are back on after pretraining: the (non-zero) adapter changes the output.
    ids = torch.arange(8)[None]
    with torch.no_grad():
        on = model(ids)[0]
        model.set_adapters(False)
        off = model(ids)[0]
        model.set_adapters(True)
    assert not torch.allclose(on, off)


def test_bf16_training_follows_fp32_and_batches_alike(model: TinyLM,
                                                      tokenizer: ChatTokenizer) -> None:
    start = Adapter.from_model(model)
    fp32 = finetune_adapters(model, tokenizer, _jobs(start))
    bf16_jobs = [FinetuneJob(j.examples, start, replace(j.cfg, precision="bf16"))
                 for j in _jobs(start)]
    together = finetune_adapters(model, tokenizer, bf16_jobs)
    alone = [finetune_adapter(model, tokenizer, j.examples, start, j.cfg) for j in bf16_jobs]
    for exact, a, b in zip(fp32, together, alone, strict=True):
        # bf16 products move the update a little, not its direction or its learning ...
        want, got = exact.adapter.flat() - start.flat(), a.adapter.flat() - start.flat()
        cosine = want @ got / (np.linalg.norm(want) * np.linalg.norm(got))
        assert cosine > 0.98, cosine
        assert a.loss_after < a.loss_before
        assert abs(a.loss_before - exact.loss_before) < 0.02 * exact.loss_before
        # ... and a pod trained in a batch is the pod trained alone up to bf16 rounding
        # (which rows share a product changes how it rounds; AdamW magnifies that
        # where gradients are tiny).
        apart = np.linalg.norm(a.adapter.flat() - b.adapter.flat()) / np.linalg.norm(got)
        assert apart < 0.05, apart
    mixed = [bf16_jobs[0], _jobs(start)[1]]
    with pytest.raises(ValueError, match="one precision"):
        finetune_adapters(model, tokenizer, mixed)
    with pytest.raises(ValueError, match="precision"):
        FinetuneConfig(precision="fp8")


@pytest.mark.parametrize(("forced", "auto"), [("0", "fp32"), ("1", "bf16")])
def test_auto_precision_follows_the_override(monkeypatch: pytest.MonkeyPatch, forced: str,
                                             auto: str) -> None:
    """COVEY_NATIVE_BF16 makes `auto` what it is on a CPU with (1) or without (0) native
    bf16, whatever this CPU has: how the suite is run as on an AVX2-only machine."""
    from covey.models._precision import native_bf16, resolve_precision

    monkeypatch.setenv("COVEY_NATIVE_BF16", forced)
    native_bf16.cache_clear()
    try:
        assert resolve_precision("auto") == auto
        assert resolve_precision("fp32") == "fp32"
    finally:
        native_bf16.cache_clear()


def test_a_round_sets_the_local_training_and_simulated_pods_their_own_seed() -> None:
    from covey.privacy import DPConfig
    from covey.protocols import RoundMessage

    message = RoundMessage("run", 1, 3, DPConfig(), {}, b"", b"", 2, 1e-3, 64, 7, "bf16")
    pod = FinetuneConfig.for_round(message)
    assert (pod.epochs, pod.lr, pod.max_examples, pod.seed, pod.precision,
            pod.measure_loss) == (2, 1e-3, 64, 7, "bf16", True)
    simulated = FinetuneConfig.for_round(message, pod=5, measure_loss=False)
    assert (simulated.seed, simulated.measure_loss) == (7 * 100_003 + 5, False)
