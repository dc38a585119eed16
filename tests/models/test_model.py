"""The language model: causality, the key/value cache, LoRA adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from covey.models._adapter import Adapter
from covey.models._model import ModelConfig, TinyLM
from tests.models.conftest import SMALL


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, SMALL.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def test_causal(model: TinyLM) -> None:
    a, b = _ids(12), _ids(12, seed=1)
    b[:, :6] = a[:, :6]
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :6], lb[:, :6])
    assert not torch.allclose(la[:, 6:], lb[:, 6:])


def test_cache_equals_full_forward(model: TinyLM) -> None:
    ids = _ids(20)
    with torch.no_grad():
        full = model(ids)[0]
        out = model(ids[:, :7])
        pieces, cache = [out[0]], out[1:]
        for t in range(7, 20):
            out = model(ids[:, t:t + 1], *cache)
            pieces.append(out[0])
            cache = out[1:]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache[0].shape == (2, SMALL.n_head, 20, SMALL.head_size)


def test_zero_adapter_is_the_base_model(model: TinyLM) -> None:
    ids = _ids(10)
    Adapter.zeros_like(model).load_into(model)
    with torch.no_grad():
        with_lora = model(ids)[0]
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.lora_A.zero_()  # now both factors are zero
        without = model(ids)[0]
    torch.testing.assert_close(with_lora, without)


def test_merge_matches_the_adapted_model(model: TinyLM) -> None:
    ids = _ids(10)
    adapter = Adapter.from_model(model)
    merged = adapter.merged_into(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)[0], model(ids)[0], atol=1e-5, rtol=1e-4)
    assert not np.any(Adapter.from_model(merged).tensors["blocks.0.attn.q.lora_B"])


def test_adapter_bytes_round_trip(model: TinyLM) -> None:
    adapter = Adapter.from_model(model)
    back = Adapter.from_bytes(adapter.to_bytes())
    assert back.tensors.keys() == adapter.tensors.keys()
    assert all(np.array_equal(back.tensors[n], adapter.tensors[n]) for n in adapter.tensors)
    assert adapter.nbytes == 4 * adapter.num_parameters
    flat = adapter.flat()
    assert np.array_equal(adapter.with_flat(flat).flat(), flat)
    # Only the configured projections carry an adapter (q, v, o, fc here).
    assert {n.split(".")[-2] for n in adapter.tensors} == {"q", "v", "o", "fc"}


def test_adapter_rejects_bad_bytes(model: TinyLM) -> None:
    with pytest.raises(ValueError):
        Adapter.from_bytes(b"not an npz")
    bad = dict(Adapter.from_model(model).tensors)
    bad["blocks.0.attn.q.lora_A"] = bad["blocks.0.attn.q.lora_A"] * np.nan
    with pytest.raises(ValueError, match="non-finite"):
        Adapter.from_bytes(Adapter(bad).to_bytes())
    wrong = {"blocks.0.attn.q.lora_A": np.zeros((1, 1), np.float32)}
    with pytest.raises(ValueError, match="does not fit"):
        Adapter(wrong).load_into(model)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        ModelConfig(d_model=30, n_head=4)
    with pytest.raises(ValueError):
        ModelConfig(lora_targets=("q", "nope"))
