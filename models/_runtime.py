"""Loading the shipped model for inference: the ONNX and torch generators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covey.models._artifacts import Artifacts
from covey.models._generate import OnnxGenerator, TorchGenerator
from covey.models._onnx import OnnxLM
from covey.models._tokenizer import ChatTokenizer

if TYPE_CHECKING:  # torch is loaded only by the torch paths: an ONNX pod never pays for it
    from covey.models._model import ModelConfig, TinyLM

__all__ = ["load_model", "load_onnx_generator", "load_torch_generator"]


def _config(card: dict[str, Any]) -> ModelConfig:
    from covey.models._model import ModelConfig

    spec = dict(card["model"])
    spec["lora_targets"] = tuple(spec.get("lora_targets", ()))
    spec["dropout"] = 0.0  # inference
    return ModelConfig(**spec)


def load_model(folder: Path | None = None) -> tuple[TinyLM, ChatTokenizer, Artifacts]:
    """The fp32 torch model with its tokenizer, from verified artifacts."""
    from safetensors.torch import load_file

    from covey.models._model import TinyLM

    artifacts = Artifacts.load(folder)
    model = TinyLM(_config(artifacts.card))
    state = load_file(str(artifacts.path("base.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(".lora_" not in m for m in missing):
        raise ValueError(f"weights do not fit the model: {missing} {unexpected}")
    model.eval()
    tokenizer = ChatTokenizer.from_file(artifacts.path("tokenizer.json"))
    return model, tokenizer, artifacts


def load_onnx_generator(folder: Path | None = None, threads: int = 1) -> OnnxGenerator:
    """The int8 ONNX generator (the pod's default), from verified artifacts."""
    artifacts = Artifacts.load(folder)
    lm = OnnxLM(artifacts.path("lm-int8.onnx"), threads=threads)
    tokenizer = ChatTokenizer.from_file(artifacts.path("tokenizer.json"))
    return OnnxGenerator(lm, tokenizer, context=int(artifacts.card["model"]["context"]))


def load_torch_generator(folder: Path | None = None, threads: int | None = None
                         ) -> TorchGenerator:
    """The fp32 torch generator (the reference)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    model, tokenizer, _ = load_model(folder)
    return TorchGenerator(model, tokenizer)


def card_summary(folder: Path | None = None) -> str:
    """The model card as pretty JSON."""
    return json.dumps(Artifacts.load(folder).card, indent=2)
