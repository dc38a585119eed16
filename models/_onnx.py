"""ONNX export of the language model, dynamic int8 quantization, and the runtime session.

The exported graph takes the LoRA matrices as *inputs*, not weights: the base weights
are quantized to int8 once, while an adapter (the federated one, or a personal one) is
fed at run time in fp32. Applying a new adapter is then a swap of arrays: no re-export,
no temporary file holding user-derived weights, no restart.

Graph inputs: ``input_ids`` (B, T); ``past_key_i`` / ``past_value_i`` (B, nh, P, hs) for
each layer (P may be 0); one input per LoRA matrix, named like the torch parameter.
Outputs: ``logits`` (B, T, V) and ``present_key_i`` / ``present_value_i`` (B, nh, P+T, hs).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from covey.models._model import TinyLM

__all__ = ["OnnxLM", "export_onnx", "lora_names", "quantize_int8"]


def lora_names(model_state: Mapping[str, object]) -> list[str]:
    """The LoRA parameter names of a model, in graph-input order."""
    return sorted(n for n in model_state if ".lora_" in n)


def export_onnx(model: TinyLM, path: Path, opset: int = 17) -> None:
    """Export a :class:`~covey.models._model.TinyLM` with cache and LoRA inputs to ``path``."""
    import torch

    from covey.models._model import LoRALinear
    cfg = model.cfg
    names = lora_names(dict(model.named_parameters()))
    n_cache = 2 * cfg.n_layer
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}

    class _WithInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, idx: torch.Tensor, *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
            past, lora = rest[:n_cache], dict(zip(names, rest[n_cache:], strict=True))
            for prefix, layer in layers.items():
                layer.external = (lora[f"{prefix}.lora_A"], lora[f"{prefix}.lora_B"])
            try:
                return tuple(self.inner(idx, *past))
            finally:
                for layer in layers.values():
                    layer.external = None

    cache_names = [f"past_{kv}_{i}" for i in range(cfg.n_layer) for kv in ("key", "value")]
    present = [f"present_{kv}_{i}" for i in range(cfg.n_layer) for kv in ("key", "value")]
    params = dict(model.named_parameters())
    # Trace with a non-empty cache and several new tokens so no size is fixed to 0 or 1.
    example = (
        torch.randint(0, cfg.vocab_size, (1, 5)),
        *[torch.randn(1, cfg.n_head, 3, cfg.head_size) for _ in range(n_cache)],
        *[params[n].detach().clone() for n in names],
    )
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    dynamic.update({n: {0: "batch", 2: "past"} for n in cache_names})
    dynamic.update({n: {0: "batch", 2: "total"} for n in present})
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _WithInputs().eval(), example, str(path), dynamo=False, opset_version=opset,
            input_names=["input_ids", *cache_names, *names],
            output_names=["logits", *present], dynamic_axes=dynamic,
        )


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization of the base weights (LoRA inputs stay fp32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings(), _quiet_logs():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)


class _quiet_logs:
    """Silence the quantizer's advice printed through the logging module."""

    def __enter__(self) -> None:
        import logging

        self._root = logging.getLogger()
        self._level = self._root.level
        self._root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self._root.setLevel(self._level)


class OnnxLM:
    """An ONNX Runtime session of the model, with the adapter currently applied."""

    def __init__(self, model: Path | bytes, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache_names = [n for n in inputs if n.startswith("past_")]
        self.lora_names = [n for n in inputs if ".lora_" in n]
        self.output_names = [o.name for o in self.session.get_outputs()]
        first = inputs[self.cache_names[0]]
        self.n_head, self.head_size = int(first.shape[1]), int(first.shape[3])
        self._lora = {n: np.zeros(_static(inputs[n].shape), np.float32) for n in self.lora_names}
        self.adapter_version = 0  # counts set_adapter calls: key/value caches depend on it

    def set_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Use these LoRA matrices from the next call on (missing names mean zero).

        Raises:
            ValueError: an unknown name or a wrong shape.
        """
        fresh = {n: np.zeros_like(a) for n, a in self._lora.items()}
        for name, value in tensors.items():
            if name not in fresh:
                raise ValueError(f"the model has no adapter input {name}")
            array = np.ascontiguousarray(value, dtype=np.float32)
            if array.shape != fresh[name].shape:
                raise ValueError(f"adapter {name} has shape {array.shape}, "
                                 f"expected {fresh[name].shape}")
            fresh[name] = array
        self._lora = fresh  # one assignment: a concurrent step sees old or new, never half
        self.adapter_version += 1

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        """A zero-length cache."""
        shape = (batch, self.n_head, 0, self.head_size)
        return [np.zeros(shape, np.float32) for _ in self.cache_names]

    def step(self, ids: np.ndarray, cache: list[np.ndarray] | None = None
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits of ``ids`` (B, T) after ``cache``; returns (logits, new cache)."""
        cache = cache if cache is not None else self.empty_cache(ids.shape[0])
        feed = {"input_ids": ids.astype(np.int64, copy=False),
                **dict(zip(self.cache_names, cache, strict=True)), **self._lora}
        out = self.session.run(self.output_names, feed)
        return out[0], list(out[1:])

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits of whole sequences (no cache)."""
        return self.step(ids)[0]


def _static(shape: list[Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)  # LoRA inputs have fixed shapes

