"""A small random model and tokenizer for fast tests of the model code."""

from __future__ import annotations

import pytest
import torch

from covey.models._model import ModelConfig, TinyLM
from covey.models._tokenizer import ChatTokenizer, train_tokenizer

SMALL = ModelConfig(vocab_size=300, context=64, n_layer=2, n_head=2, d_model=32,
                    lora_rank=4, lora_targets=("q", "v", "o", "fc"))

TEXTS = [
    "hello there, how are you doing today?", "I am fine thanks, and you?",
    "what do you like to do for fun?", "I like hiking and reading books",
    "the weather is nice today", "do you have any pets? I have a cat named Ana",
] * 20


@pytest.fixture(scope="session")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer(train_tokenizer(TEXTS, SMALL.vocab_size))


@pytest.fixture
def model() -> TinyLM:
    torch.manual_seed(0)
    m = TinyLM(SMALL).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)  # a non-trivial adapter
    return m
