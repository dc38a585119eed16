"""End-to-end chat turn against the model's bare generation, in the same run.

A turn is timed by stage (store, retrieve, assemble, first token, full reply) on a pod
holding ``memories`` memories; the baseline is the same model, loaded once more so that
neither shares the other's prefix cache, answering the bare message with no memory. The
overhead of memory is the ratio of time to first token. The first text a user sees
comes later than the first token: the safety filter holds back the reply's last
characters until they are checked; that is reported apart, as ``turn_first_text``.
After each reply the assistant reads the next prompt's opening (system text,
preferences, recent turns) into its prefix cache in the background; the benchmark lets
that finish before the next turn, as the time a user takes to read a reply would.
"""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory

__all__ = ["run"]

_PROMPTS = ["what should I cook tonight?", "any plans for the weekend?", "how was your day?",
            "do you remember where my sister lives?", "tell me something fun",
            "I need ideas for a birthday present", "what music do I like?", "good morning!"]


def _pct(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}


def _fill(pod: Any, count: int, rng: np.random.Generator) -> None:
    topics = ["sister", "garden", "cello", "Lisbon", "coffee", "marathon", "dentist", "cat",
              "pasta", "jazz", "train", "book club", "birthday", "hiking", "office"]
    texts = [f"Note {i}: the {rng.choice(topics)} and the {rng.choice(topics)} on "
             f"day {int(rng.integers(1, 28))}" for i in range(count)]
    with pod.store.transaction() as c:
        for text in texts:
            pod.memories.insert(c, text, "note", {"source": "bench"})


def _timed_reply(generator: Any, messages: list[Any], params: Any) -> tuple[float, float]:
    """Seconds to the first piece and to the whole reply of ``generator``."""
    t0 = time.perf_counter()
    pieces = generator.stream_chat(messages, params)
    next(iter(pieces), None)
    first = time.perf_counter() - t0
    for _ in pieces:
        pass
    return first, time.perf_counter() - t0


def run(quick: bool = False) -> dict[str, Any]:
    """Time turns with memory against bare generation."""
    from covey.device import Pod, PromptParts, assemble, open_assistant
    from covey.models import ChatMessage, SamplingParams, create_generator

    turns, memories = (8, 200) if quick else (40, 1000)
    params = SamplingParams(max_tokens=32, temperature=0.0)
    rng = np.random.default_rng(0)
    stages: dict[str, list[float]] = {k: [] for k in ("retrieve_s", "assemble_s",
                                                      "first_token_s", "reply_s")}
    turn_first: list[float] = []
    turn_text: list[float] = []
    bare_first: list[float] = []
    bare_full: list[float] = []
    floor_first: list[float] = []
    prompt_tokens: list[int] = []
    cached_tokens: list[int] = []
    with temporary_directory("covey-bench-") as tmp:
        pod = Pod.create(Path(tmp) / "pod", secrets.token_urlsafe(12))
        try:
            assistant = open_assistant(pod)
            print(f"  [turn] storing {memories} memories", file=sys.stderr, flush=True)
            _fill(pod, memories, rng)
            session = assistant.new_session()
            bare = create_generator("onnx")
            floor_gen = create_generator("onnx")  # its own: bare's cache state stays as it was
            for i in range(turns):
                prompt = _PROMPTS[i % len(_PROMPTS)]
                first, full = _timed_reply(bare, [ChatMessage("user", prompt)], params)
                bare_first.append(first)
                bare_full.append(full)
                t0 = time.perf_counter()
                turn = assistant.respond(session, prompt, sampling=params)
                asked = time.perf_counter() - t0
                it = iter(turn)
                next(it, None)
                turn_text.append(time.perf_counter() - t0)
                for _ in it:
                    pass
                turn_first.append(asked + turn.timings["first_token_s"])
                # The next prompt's opening is read after the reply, while the user reads
                # it; it is done before the next message comes (and before the baseline).
                assistant.settle()
                # The floor: the same model reading only what a turn must read after the
                # message arrives (the recalled memories and the message), no recall.
                recalled = [(m["id"], found.text, m["score"])
                            for m in turn.explanation.memories
                            if (found := pod.memories.get(m["id"])) is not None]
                messages, _ = assemble(PromptParts(message=prompt, memories=recalled),
                                       assistant.config.budget, assistant.count)
                # Without the system text: it is in the turn's prefix cache.
                floor_first.append(_timed_reply(floor_gen, messages[1:], params)[0])
                usage = getattr(assistant.generator, "usage", {})
                prompt_tokens.append(int(usage.get("prompt_tokens", 0)))
                cached_tokens.append(int(usage.get("cached_tokens", 0)))
                for key in stages:
                    stages[key].append(turn.timings.get(key, 0.0))
        finally:
            pod.close()
    ratio = float(np.median(turn_first) / np.median(bare_first))
    results: dict[str, Any] = {
        "stages": {k: _pct(v) for k, v in stages.items()},
        "turn_first_token": _pct(turn_first), "turn_first_text": _pct(turn_text),
        "bare_first_token": _pct(bare_first), "bare_full_reply": _pct(bare_full),
        "bare_with_recalled_first_token": _pct(floor_first),
        "recalled_floor_ratio": round(float(np.median(floor_first) / np.median(bare_first)), 3),
        "prompt_tokens_mean": round(float(np.mean(prompt_tokens)), 1),
        "cached_prompt_tokens_mean": round(float(np.mean(cached_tokens)), 1),
        "first_token_overhead_ratio": round(ratio, 3)}
    summary = [
        f"turn on {memories} memories: retrieve p50 {results['stages']['retrieve_s']['p50_ms']}"
        f" ms, assemble p50 {results['stages']['assemble_s']['p50_ms']} ms, prompt "
        f"{results['prompt_tokens_mean']} tokens of which {results['cached_prompt_tokens_mean']}"
        " from the prefix cache",
        f"first token with memory p50 {results['turn_first_token']['p50_ms']} ms vs bare "
        f"{results['bare_first_token']['p50_ms']} ms: ratio {ratio:.2f}; first text shown"
        f" (after the safety holdback) p50 {results['turn_first_text']['p50_ms']} ms",
        f"floor: bare generation reading the recalled memories and the message p50 "
        f"{results['bare_with_recalled_first_token']['p50_ms']} ms, "
        f"{results['recalled_floor_ratio']}x the message alone",
    ]
    config = {"turns": turns, "memories": memories, "max_tokens": 32, "sampling": "greedy"}
    return {"config": config, "results": results, "summary": summary}
