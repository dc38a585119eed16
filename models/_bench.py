"""Benchmark of the built-in model: ONNX int8 against torch eager fp32, same weights.

Figures: time to first token for a 64-token prompt (p50 / p95 / p99), decode tokens per
second, each at one and two threads; the time to apply a new adapter; and the peak
resident memory of a process holding each generator. Every speed figure comes with the
ratio against torch measured in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import numpy as np

__all__ = ["bench_language_model"]

PROMPT_TOKENS = 64


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _prompt(tokenizer: Any) -> np.ndarray:
    text = ("hey! I just got back from a long walk by the river and it was so nice out. "
            "what have you been up to this week? anything fun planned for the weekend? "
            "I was thinking about trying that new place downtown, the one with the tacos")
    ids = tokenizer.encode(text)
    while len(ids) < PROMPT_TOKENS:
        ids = ids + ids
    return np.asarray([ids[:PROMPT_TOKENS]], dtype=np.int64)


def _measure(step: Any, prompt: np.ndarray, runs: int, decode_tokens: int) -> dict[str, Any]:
    first: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        logits, _ = step(prompt, None)
        int(np.argmax(logits[0, -1]))
        first.append(time.perf_counter() - t0)
    logits, cache = step(prompt, None)
    token = int(np.argmax(logits[0, -1]))
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        logits, cache = step(np.asarray([[token]], dtype=np.int64), cache)
        token = int(np.argmax(logits[0, -1]))
    per_second = decode_tokens / (time.perf_counter() - t0)
    return {"time_to_first_token": _percentiles(first),
            "decode_tokens_per_second": round(per_second, 1)}


_RSS_SCRIPT = """
import json, resource, sys
from covey.models._generate import SamplingParams, create_generator
from covey.models._tokenizer import ChatMessage
gen = create_generator(sys.argv[1])
text = "".join(gen.stream_chat([ChatMessage("user", "hello there")],
                               SamplingParams(max_tokens=16, temperature=0.0)))
print(json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


# Linux carries a process's peak RSS into a child made by fork and exec, so a child of
# this (large) process would report at least our peak; a bare launcher starts small.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def _peak_rss(backend: str) -> float:
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, sys.executable, "-c", _RSS_SCRIPT,
                          backend], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    return round(float(json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]), 1)


def _adapter_swap(onnx_gen: Any, prompt: np.ndarray) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    tensors = {n: rng.normal(0, 0.02, a.shape).astype(np.float32)
               for n, a in onnx_gen.lm._lora.items()}
    before = onnx_gen.lm.logits(prompt)
    t0 = time.perf_counter()
    onnx_gen.set_adapter(tensors)
    seconds = time.perf_counter() - t0
    changed = float(np.abs(onnx_gen.lm.logits(prompt) - before).max())
    onnx_gen.set_adapter({})
    return {"apply_seconds": seconds, "logits_changed_by": round(changed, 4),
            "adapter_bytes": int(sum(a.nbytes for a in tensors.values()))}


def bench_language_model(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns config, results and summary lines."""
    import torch

    from covey.models._runtime import load_onnx_generator, load_torch_generator

    runs, decode = (10, 16) if quick else (100, 128)
    results: dict[str, Any] = {}
    summary: list[str] = []
    for threads in (1, 2):
        onnx_gen = load_onnx_generator(threads=threads)
        torch_gen = load_torch_generator(threads=threads)
        prompt = _prompt(onnx_gen.tokenizer)
        row = {"onnx_int8": _measure(onnx_gen._step, prompt, runs, decode),
               "torch_fp32": _measure(torch_gen._step, prompt, runs, decode)}
        row["decode_speedup"] = round(row["onnx_int8"]["decode_tokens_per_second"]
                                      / row["torch_fp32"]["decode_tokens_per_second"], 2)
        row["ttft_p95_speedup"] = round(
            row["torch_fp32"]["time_to_first_token"]["p95_ms"]
            / row["onnx_int8"]["time_to_first_token"]["p95_ms"], 2)
        results[f"threads_{threads}"] = row
        o, t = row["onnx_int8"], row["torch_fp32"]
        summary.append(
            f"{threads} thread(s): TTFT p50/p95/p99 onnx int8 "
            f"{o['time_to_first_token']['p50_ms']}/{o['time_to_first_token']['p95_ms']}/"
            f"{o['time_to_first_token']['p99_ms']} ms, torch "
            f"{t['time_to_first_token']['p50_ms']}/{t['time_to_first_token']['p95_ms']}/"
            f"{t['time_to_first_token']['p99_ms']} ms; decode {o['decode_tokens_per_second']} "
            f"vs {t['decode_tokens_per_second']} tok/s ({row['decode_speedup']}x)")
        if threads == 1:
            results["adapter_swap"] = _adapter_swap(onnx_gen, prompt)
    torch.set_num_threads(2)
    results["peak_rss_mib"] = {"onnx_int8": _peak_rss("onnx"), "torch_fp32": _peak_rss("torch")}
    swap = results["adapter_swap"]
    summary.append(f"adapter apply {swap['apply_seconds'] * 1e6:.0f} us "
                   f"({swap['adapter_bytes']:,} bytes)")
    summary.append(f"peak RSS onnx {results['peak_rss_mib']['onnx_int8']} MiB, torch "
                   f"{results['peak_rss_mib']['torch_fp32']} MiB")
    config = {"prompt_tokens": PROMPT_TOKENS, "runs": runs, "decode_tokens": decode,
              "sampling": "greedy"}
    return {"config": config, "results": results, "summary": summary}
