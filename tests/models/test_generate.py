"""Generation: sampling rules, streaming, stop sequences, cancellation, truncation."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from covey.errors import InvalidInputError
from covey.models._generate import (
    SamplingParams,
    TorchGenerator,
    _StopScanner,
    create_generator,
    pick_token,
)
from covey.models._model import TinyLM
from covey.models._tokenizer import ChatMessage, ChatTokenizer

HELLO = [ChatMessage("user", "hello there")]


@pytest.fixture
def gen(model: TinyLM, tokenizer: ChatTokenizer) -> TorchGenerator:
    return TorchGenerator(model, tokenizer)


def test_pick_token_rules() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 1.0, 2.9])
    assert pick_token(logits, SamplingParams(temperature=0.0, repetition_penalty=1.0), rng, []) == 1
    top1 = SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.0)
    assert {pick_token(logits, top1, rng, []) for _ in range(20)} == {1}
    # A repeated token loses to its close rival under the penalty.
    greedy_pen = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert pick_token(logits, greedy_pen, rng, [1]) == 3
    nucleus = SamplingParams(temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0)
    assert {pick_token(logits, nucleus, rng, []) for _ in range(30)} <= {1, 3}


def test_greedy_and_seeded_sampling_are_reproducible(gen: TorchGenerator) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    assert "".join(gen.stream_chat(HELLO, greedy)) == "".join(gen.stream_chat(HELLO, greedy))
    seeded = SamplingParams(temperature=1.0, max_tokens=12, seed=7)
    assert "".join(gen.stream_chat(HELLO, seeded)) == "".join(gen.stream_chat(HELLO, seeded))


def test_max_tokens(gen: TorchGenerator) -> None:
    for n in (1, 5):
        "".join(gen.stream_text("hello", SamplingParams(temperature=1.0, max_tokens=n, seed=1)))
        assert gen.usage["completion_tokens"] <= n
    assert gen.usage["prompt_tokens"] > 0


def test_stop_scanner_holds_back_partial_stops() -> None:
    scanner = _StopScanner(["END"])
    assert scanner.feed("abc E") == "abc "
    assert scanner.feed("abc EN") == ""
    assert scanner.feed("abc ENX") == "ENX"
    assert scanner.feed("abc ENX then END and more") == " then "
    assert scanner.stopped


def test_stop_sequence_in_generation(gen: TorchGenerator) -> None:
    sampled = SamplingParams(temperature=1.0, top_k=0, max_tokens=30, seed=11)
    free = "".join(gen.stream_chat(HELLO, sampled))
    assert len(free) > 6
    stop = free.strip()[3:5]
    cut = "".join(gen.stream_chat(HELLO, SamplingParams(**{**sampled.__dict__, "stop": (stop,)})))
    assert stop not in cut and free.startswith(cut)
    assert gen.finish_reason == "stop"


def test_cancellation(gen: TorchGenerator) -> None:
    cancel = threading.Event()
    pieces = []
    for piece in gen.stream_text("hello", SamplingParams(temperature=1.0, max_tokens=40,
                                                         seed=3), cancel):
        pieces.append(piece)
        cancel.set()
    assert len(pieces) == 1
    assert gen.finish_reason == "cancelled"


def test_long_prompt_is_truncated_from_the_left(gen: TorchGenerator,
                                                caplog: pytest.LogCaptureFixture) -> None:
    long = [ChatMessage("user", "hello there " * 200)]
    with caplog.at_level(logging.WARNING):
        text = "".join(gen.stream_chat(long, SamplingParams(temperature=0.0, max_tokens=8)))
    assert "truncated from the left" in caplog.text
    assert isinstance(text, str)


def test_params_validation_and_registry() -> None:
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": ("",)},
                {"repetition_penalty": 0.5}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(InvalidInputError, match="known: onnx, torch, openai"):
        create_generator("gpt-17")


def _chat(*texts: str) -> list[ChatMessage]:
    return [ChatMessage("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)]


def test_prefix_cache_reads_only_the_new_tokens_and_changes_nothing(
        model: TinyLM, tokenizer: ChatTokenizer) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    cached = TorchGenerator(model, tokenizer)
    first = "".join(cached.stream_chat(_chat("hello there", "I am fine", "what about you?"),
                                       greedy))
    follow = _chat("hello there", "I am fine", "what about you?", first, "do you have pets?")
    reply = "".join(cached.stream_chat(follow, greedy))
    usage = cached.usage
    # Everything up to the previous reply was read already; the new turn is read now.
    assert usage["cached_tokens"] >= len(tokenizer.render(follow[:3], reply=False))
    assert usage["cached_tokens"] < usage["prompt_tokens"]
    assert reply == "".join(TorchGenerator(model, tokenizer).stream_chat(follow, greedy))


def test_primed_opening_is_not_read_again_and_changes_nothing(
        model: TinyLM, tokenizer: ChatTokenizer) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    head = [ChatMessage("system", "Be kind."), *_chat("hi", "hello")]
    prompt = [*head, ChatMessage("system", "I have a cat."), ChatMessage("user", "my pet?")]
    primed = TorchGenerator(model, tokenizer)
    opening = tokenizer.render(head, reply=False)
    assert primed.prime(head) == len(opening)
    assert primed.prime(head) == 1  # already read: only the last token is read again
    reply = "".join(primed.stream_chat(prompt, greedy))
    assert primed.usage["cached_tokens"] == len(opening)
    assert reply == "".join(TorchGenerator(model, tokenizer).stream_chat(prompt, greedy))

