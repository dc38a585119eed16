"""`covey models build`: tokenizer, base model, ONNX int8, metrics and model card.

Deterministic from the seed: the same data, seed and settings give the same weights.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from covey._tempdirs import temporary_directory
from covey.models._artifacts import ARTIFACT_FILES, CARD, sha256_file
from covey.models._data import Corpus, load_corpus
from covey.models._evaluate import (
    BigramModel,
    evaluate,
    examples_to_batches,
    scored,
    torch_scored,
)
from covey.models._model import ModelConfig, TinyLM
from covey.models._onnx import OnnxLM, export_onnx, quantize_int8
from covey.models._tokenizer import ChatTokenizer, train_tokenizer
from covey.models._train import TrainConfig, new_model, pretrain, token_stream

__all__ = ["GREETINGS", "build", "save_weights"]

GREETINGS = ("hi", "hello! how are you?", "what do you like to do for fun?")
Progress = Callable[[str, int, int], None]  # (stage, done, total)


def save_weights(model: TinyLM, path: Path) -> None:
    """Save the base weights (no LoRA) as safetensors."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if ".lora_" not in k}
    # The output head is tied to the token embedding: stored once.
    save_file(state, str(path), metadata={"config": json.dumps(model.cfg.to_dict())})


def _federated_test(corpus: Corpus) -> list[Any]:
    return [ex for user in corpus.federated for ex in user.test]


def _quality(model: TinyLM, lm_int8: OnnxLM, bigram: BigramModel, tok: ChatTokenizer,
             examples: list[Any]) -> dict[str, Any]:

    batches = examples_to_batches(tok, examples, model.cfg.context)
    return {
        "model_fp32": evaluate(torch_scored(model), batches, len(examples)).to_dict(),
        "model_int8_onnx": evaluate(scored(lm_int8.logits), batches, len(examples)).to_dict(),
        "bigram_baseline": evaluate(scored(bigram.logits), batches, len(examples)).to_dict(),
    }


def _onnx_agreement(model: TinyLM, fp32_path: Path, tok: ChatTokenizer,
                    corpus: Corpus) -> float:
    import torch

    session = OnnxLM(fp32_path)
    worst = 0.0
    for ids, _ in examples_to_batches(tok, list(corpus.public_eval[:200]), model.cfg.context):
        with torch.no_grad():
            ref = model(torch.from_numpy(ids))[0].numpy()
        worst = max(worst, float(np.abs(session.logits(ids) - ref).max()))
    return worst


def _greedy_reply(model: TinyLM, tok: ChatTokenizer, prompt: str, max_tokens: int = 24) -> str:
    from covey.models._generate import SamplingParams, TorchGenerator
    from covey.models._tokenizer import ChatMessage

    gen = TorchGenerator(model, tok)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return "".join(gen.stream_chat([ChatMessage("user", prompt)], params)).strip()


def build(out: Path, model_cfg: ModelConfig | None = None, train_cfg: TrainConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Build every artifact into ``out`` and return the model card."""
    import torch

    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    report = progress or (lambda stage, done, total: None)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    report("data", 0, 1)
    corpus = load_corpus()
    report("tokenizer", 0, 1)
    tok = ChatTokenizer(train_tokenizer(corpus.public_texts(), model_cfg.vocab_size))
    tok.save(out / "tokenizer.json")
    stream = token_stream(tok, corpus.public_dialogues)

    model = new_model(model_cfg, train_cfg.seed)
    t0 = time.perf_counter()
    losses = pretrain(model, stream, train_cfg,
                      on_step=lambda step, _: report("train", step + 1, train_cfg.steps))
    train_seconds = time.perf_counter() - t0
    save_weights(model, out / "base.safetensors")

    report("export", 0, 1)
    with temporary_directory("covey-build-") as tmp:
        fp32 = Path(tmp) / "lm-fp32.onnx"
        export_onnx(model, fp32)
        quantize_int8(fp32, out / "lm-int8.onnx")
        max_diff = _onnx_agreement(model, fp32, tok, corpus)
        fp32_bytes = fp32.stat().st_size

    report("evaluate", 0, 2)
    torch.set_num_threads(train_cfg.threads)
    int8 = OnnxLM(out / "lm-int8.onnx", threads=train_cfg.threads)
    bigram = BigramModel(stream, model_cfg.vocab_size)
    public = _quality(model, int8, bigram, tok, list(corpus.public_eval))
    report("evaluate", 1, 2)
    federated = _quality(model, int8, bigram, tok, _federated_test(corpus))
    report("evaluate", 2, 2)

    lora = model.num_parameters(lora=True)
    card: dict[str, Any] = {
        "name": "covey-tiny-lm",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "built_on": {"python": platform.python_version(), "torch": torch.__version__,
                     "machine": platform.machine()},
        "model": model_cfg.to_dict(),
        "parameters": {"base": model.num_parameters(), "lora": lora, "lora_bytes_fp32": 4 * lora},
        "training": {**asdict(train_cfg), "tokens_seen": train_cfg.steps * train_cfg.batch_size
                     * train_cfg.seq_len, "stream_tokens": len(stream),
                     "final_loss": round(float(np.mean(losses[-20:])), 4),
                     "seconds": round(train_seconds, 1)},
        "data": corpus.statistics(),
        "metrics": {
            "public_heldout": public,
            "federated_test": federated,
            "onnx_fp32_max_abs_logit_diff": max_diff,
            "int8_perplexity_ratio": {
                name: round(q["model_int8_onnx"]["perplexity"] / q["model_fp32"]["perplexity"], 4)
                for name, q in (("public_heldout", public), ("federated_test", federated))
            },
        },
        "samples": [{"prompt": p, "greedy_reply": _greedy_reply(model, tok, p)}
                    for p in GREETINGS],
        "onnx": {"opset": 17, "fp32_bytes": fp32_bytes, "quantization": "dynamic int8 "
                 "(weights QInt8 per tensor, activations quantized at run time); LoRA inputs fp32"},
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    card["files"] = {name: {"sha256": sha256_file(out / name),
                            "bytes": (out / name).stat().st_size} for name in ARTIFACT_FILES}
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card
