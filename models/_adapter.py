"""LoRA adapters as plain arrays: what a pod trains, sends, receives and applies.

An :class:`Adapter` holds one ``lora_A`` (r, in) and ``lora_B`` (out, r) per adapted
projection, named like the torch parameters (``blocks.0.attn.q.lora_A``). Its bytes are
what a pod sends in a federated round. Adapters are applied to the torch model by
loading them into its LoRA parameters, to the ONNX model by feeding them as inputs, or
merged into the base weights for a model without LoRA.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Adapter"]


@dataclass(frozen=True)
class Adapter:
    """A set of LoRA matrices, by parameter name."""

    tensors: Mapping[str, np.ndarray]

    @classmethod
    def from_model(cls, model: Any) -> Adapter:
        """The adapter currently inside a torch model."""
        return cls({n: p.detach().cpu().numpy().astype(np.float32, copy=True)
                    for n, p in model.named_parameters() if ".lora_" in n})

    @classmethod
    def zeros_like(cls, model: Any) -> Adapter:
        """An adapter that changes nothing (every ``lora_B`` zero), shaped for ``model``."""
        tensors = cls.from_model(model).tensors
        return cls({n: (np.zeros_like(a) if n.endswith("lora_B") else a)
                    for n, a in tensors.items()})

    @property
    def num_parameters(self) -> int:
        """Number of scalars."""
        return int(sum(a.size for a in self.tensors.values()))

    @property
    def nbytes(self) -> int:
        """Size of the raw float32 values."""
        return int(sum(a.nbytes for a in self.tensors.values()))

    def load_into(self, model: Any) -> None:
        """Copy these matrices into a torch model's LoRA parameters.

        Raises:
            ValueError: a name or shape the model does not have.
        """
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.tensors.items():
                if name not in params or tuple(params[name].shape) != value.shape:
                    raise ValueError(f"adapter tensor {name} {value.shape} does not fit the model")
                params[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))

    def merged_into(self, model: Any) -> Any:
        """A copy of ``model`` with this adapter folded into the base weights (LoRA zeroed)."""
        import copy

        import torch

        merged = copy.deepcopy(model)
        modules = dict(merged.named_modules())
        with torch.no_grad():
            for name, value in self.tensors.items():
                if not name.endswith(".lora_A"):
                    continue
                prefix = name[: -len(".lora_A")]
                layer = modules[prefix]
                a = torch.from_numpy(np.asarray(value, dtype=np.float32))
                b = torch.from_numpy(np.asarray(self.tensors[f"{prefix}.lora_B"], np.float32))
                layer.weight += (b @ a) * layer.scale  # (out, r) @ (r, in)
                layer.lora_B.zero_()
        return merged

    def flat(self) -> np.ndarray:
        """All values as one float32 vector, in name order (for clipping and noise)."""
        return np.concatenate([self.tensors[n].ravel() for n in sorted(self.tensors)])

    def with_flat(self, vector: np.ndarray) -> Adapter:
        """An adapter of the same shapes holding ``vector`` (the inverse of :meth:`flat`)."""
        if vector.size != self.num_parameters:
            raise ValueError(f"expected {self.num_parameters} values, got {vector.size}")
        out, at = {}, 0
        for name in sorted(self.tensors):
            shape = self.tensors[name].shape
            size = int(np.prod(shape))
            out[name] = vector[at:at + size].astype(np.float32).reshape(shape)
            at += size
        return Adapter(out)

    def to_bytes(self) -> bytes:
        """Serialize (NumPy ``.npz``, no pickle)."""
        buffer = io.BytesIO()
        arrays: dict[str, Any] = {n: np.asarray(a, np.float32) for n, a in self.tensors.items()}
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        """Deserialize what :meth:`to_bytes` wrote.

        Raises:
            ValueError: not an adapter file, or a non-float32 or non-finite value.
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                tensors = {n: archive[n] for n in archive.files}
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"not an adapter: {type(exc).__name__}") from None
        for name, array in tensors.items():
            if ".lora_" not in name or array.dtype != np.float32:
                raise ValueError(f"not an adapter tensor: {name}")
            if not np.isfinite(array).all():
                raise ValueError(f"adapter tensor {name} has non-finite values")
        return cls(tensors)
