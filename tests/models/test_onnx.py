"""ONNX export: same logits as torch (with a cache and an adapter), int8, adapter swaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covey.models._adapter import Adapter
from covey.models._generate import OnnxGenerator, SamplingParams
from covey.models._model import TinyLM
from covey.models._onnx import OnnxLM, export_onnx, quantize_int8
from covey.models._tokenizer import ChatMessage, ChatTokenizer
from tests.models.conftest import SMALL


@pytest.fixture
def exported(model: TinyLM, tmp_path: Path) -> tuple[TinyLM, Path, Path]:
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "m-int8.onnx"
    export_onnx(model, fp32)
    quantize_int8(fp32, int8)
    return model, fp32, int8


def test_fp32_matches_torch_with_cache_and_adapter(exported) -> None:
    model, fp32, _ = exported
    lm = OnnxLM(fp32)
    lm.set_adapter(Adapter.from_model(model).tensors)
    ids = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 30))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids))[0].numpy()
    first, cache = lm.step(ids[:, :1], lm.empty_cache(2))
    rest, cache = lm.step(ids[:, 1:], cache)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), ref, atol=1e-4)
    assert cache[0].shape == (2, SMALL.n_head, 30, SMALL.head_size)


def test_adapter_swap_changes_the_model(exported) -> None:
    model, fp32, int8 = exported
    ids = np.arange(12)[None] % SMALL.vocab_size
    for path in (fp32, int8):
        lm = OnnxLM(path)
        base = lm.logits(ids)
        lm.set_adapter(Adapter.from_model(model).tensors)
        adapted = lm.logits(ids)
        assert np.abs(adapted - base).max() > 1e-3
        lm.set_adapter({})
        np.testing.assert_allclose(lm.logits(ids), base, atol=1e-6)


def test_int8_is_smaller_and_close(exported) -> None:
    _, fp32, int8 = exported
    assert int8.stat().st_size < fp32.stat().st_size
    ids = np.arange(20)[None] % SMALL.vocab_size
    a, b = OnnxLM(fp32).logits(ids), OnnxLM(int8).logits(ids)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_bad_adapter_is_refused(exported) -> None:
    _, fp32, _ = exported
    lm = OnnxLM(fp32)
    with pytest.raises(ValueError, match="no adapter input"):
        lm.set_adapter({"nope.lora_A": np.zeros((1, 1), np.float32)})
    name = lm.lora_names[0]
    with pytest.raises(ValueError, match="shape"):
        lm.set_adapter({name: np.zeros((1, 1), np.float32)})


def test_prefix_cache_matches_a_full_read_and_follows_the_adapter(
        exported, tokenizer: ChatTokenizer) -> None:
    """A prompt read after a cached prefix gives the logits of reading it whole (fp32);
    changing the adapter drops the cache, whose keys and values it changed."""
    model, fp32, _ = exported
    gen = OnnxGenerator(OnnxLM(fp32), tokenizer, context=SMALL.context)
    earlier = [ChatMessage("user", "hello there"), ChatMessage("assistant", "I am fine")]
    now = [*earlier, ChatMessage("user", "what do you like to do for fun?")]
    ids = tokenizer.render(now)
    full, _, reused = gen._prefill(ids)
    assert reused == 0
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    "".join(gen.stream_chat(earlier, greedy))
    part, _, reused = gen._prefill(ids)
    assert reused >= len(tokenizer.render(earlier, reply=False))
    np.testing.assert_allclose(part[:, -1], full[:, -1], atol=1e-4)
    gen.set_adapter(Adapter.from_model(model).tensors)
    adapted, _, reused = gen._prefill(ids)
    assert reused == 0
    assert np.abs(adapted[:, -1] - full[:, -1]).max() > 1e-3
